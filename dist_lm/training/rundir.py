"""The run directory: the files a run leaves, written by rank 0 only.

    config.json     the full Config of the run (loadable with --config)
    vocab.json      the vocabulary (GluonNLP Vocab JSON)
    run.json        facts of the run the config does not hold (ranks, eval columns,
                    each rank's training columns, whether its numbers depend on the
                    rank count and why: Config.world_size_dependence)
    best.params     parameters with the best validation loss so far
    final.params    parameters at the end of the run
    .lock           locked by the job that writes the directory; names its host and pid

Every file is written to a temporary name in the same directory, fsynced and renamed, so
a crash never leaves a half-written file under a final name. `make_run_dir` is called
once at start-up; ranks other than 0 get a `QuietRunDir` whose writes do nothing. Rank
0's `RunDir` locks the directory before it writes anything there, until `release` (see
`RunDirLock`): a second job in the same directory is refused instead of pruning the
first one's checkpoints and truncating its metrics. Reading a run (eval, generate,
report) takes no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from typing import Callable

from ..errors import RunDirBusy, UsageError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path), fsyncs the file, then renames it to path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)


class RunDirLock:
    """An exclusive lock on a run directory for the life of a job: flock(2) on RUN_DIR/.lock,
    which the kernel drops when the holder ends, however it ends (a killed job leaves the
    file behind, never the lock). The holder writes its host, pid and start time into the
    file, so that a refused job can name it. Raises RunDirBusy when another job holds it."""

    NAME = ".lock"

    def __init__(self, directory: str):
        self.fd = os.open(os.path.join(directory, self.NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._holder() if isinstance(err, BlockingIOError) else None
            os.close(self.fd)
            if holder is None:
                raise UsageError(f"cannot lock run directory {directory}: "
                                 f"{err.strerror}") from None
            raise RunDirBusy(f"run directory {directory} is in use by another job "
                             f"({holder}); stop it or choose another --run-dir") from None
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": since}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        except OSError:
            os.close(self.fd)
            raise

    def _holder(self) -> str:
        """Who holds the lock, as its file says; a holder that has just taken it may not
        have written it yet."""
        for _ in range(10):
            try:
                who = json.loads(os.pread(self.fd, 4096, 0).decode("utf-8"))
                return f"host {who['host']}, pid {who['pid']}, since {who['since']}"
            except (ValueError, KeyError, TypeError):
                time.sleep(0.1)
        return "its host and pid are not recorded"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no stale name for the next holder's refusals
        except OSError:
            pass
        finally:
            os.close(self.fd)         # and with it the lock
            self.fd = None


class RunDir:
    def __init__(self, path: str):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            self.lock = RunDirLock(path)  # before anything in it is written or truncated
        except OSError as err:
            raise UsageError(f"run directory {path} is not writable: {err.strerror}") from None
        try:
            probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
            probe.close()
        except OSError as err:
            self.release()
            raise UsageError(f"run directory {path} is not writable: {err.strerror}") from None

    def release(self) -> None:
        """Unlocks the directory: the job has written its last file there."""
        self.lock.release()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        try:
            write_text(self.file(name), text)
        except OSError as err:
            raise UsageError(f"cannot write {self.file(name)}: {err.strerror}") from None

    def save_params(self, name: str, block) -> None:
        try:
            atomic_write(self.file(name), block.save_parameters)
        except _write_errors() as err:
            raise UsageError(f"cannot write {self.file(name)}: {_reason(err)}") from None

    def save_checkpoint(self, step: int, model, optimizer: dict, hidden, meta: dict,
                        keep: int, protect) -> None:
        from .checkpoint import write_checkpoint

        try:
            write_checkpoint(self.file("checkpoints"), step, model, optimizer, hidden, meta,
                             keep, protect)
        except _write_errors() as err:
            raise UsageError(f"cannot write the checkpoint of step {step} in "
                             f"{self.file('checkpoints')}: {_reason(err)}; the previous "
                             f"checkpoint is intact") from None

    def find_resume(self, spec: str, strict: bool):
        """The checkpoint to resume from (see --resume), or None for a fresh start; a fresh
        run refuses a directory that holds checkpoints."""
        from .checkpoint import find_resume, list_checkpoints

        directory = self.file("checkpoints")
        if spec == "none" and list_checkpoints(directory):
            raise UsageError(f"{directory} holds checkpoints: pass --resume auto to "
                             f"continue that run, or choose another --run-dir")
        return find_resume(spec, directory, strict)

    def start_line(self, found) -> None:
        """Resuming from `found`: the checkpoints after it, and the best.params and
        final.params of their line, are moved aside into checkpoints/abandoned/ (see
        checkpoint.start_line), so that pruning and --resume auto follow the new line."""
        from .checkpoint import start_line

        try:
            start_line(self.file("checkpoints"), found, self.file("best.params"),
                       self.file("final.params"))
        except OSError as err:
            raise UsageError(f"cannot move the checkpoints after step {found.meta['step']} "
                             f"aside in {self.file('checkpoints')}: {_reason(err)}") from None

    def load_checkpoint(self, found, model, ctx) -> dict:
        """Loads the parameters into model; returns the checkpoint's other arrays as NumPy
        (optimizer state by name, and 'hidden/I': layer I's part of the global recurrent
        state) for the broadcast to every rank."""
        import mxnet as mx
        from .checkpoint import load_params

        load_params(model, found.file("model.params"), ctx)
        arrays = {k: v.asnumpy() for k, v in mx.nd.load(found.file("optimizer.nd")).items()
                  if k}
        hidden = mx.nd.load(found.file("hidden.nd"))
        arrays.update((f"hidden/{i}", hidden[str(i)].asnumpy()) for i in range(len(hidden)))
        return arrays


def _write_errors() -> tuple:
    """OSError from Python's own writes; MXNetError from MXNet's (it reports a short
    write, e.g. a full disk, as 'FileStream.Write incomplete')."""
    import mxnet as mx

    return (OSError, mx.base.MXNetError)


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return "the write was cut short (disk full or file size limit?)"


class QuietRunDir(RunDir):
    """The run directory as seen by ranks other than 0: nothing is written."""

    def __init__(self, path: str):
        self.path = path

    def release(self) -> None:
        pass

    def write_json(self, name: str, obj) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass

    def save_params(self, name: str, block) -> None:
        pass

    def save_checkpoint(self, *args, **kwargs) -> None:
        pass

    def find_resume(self, spec: str, strict: bool):
        return None

    def start_line(self, found) -> None:
        pass

    def load_checkpoint(self, found, model, ctx) -> None:
        return None


def make_run_dir(path: str, is_root: bool) -> RunDir:
    return RunDir(path) if is_root else QuietRunDir(path)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{what} {path} is unreadable: {err}") from None
