"""The run directory: the files a run leaves, written by rank 0 only.

    config.json     the full Config of the run (loadable with --config)
    vocab.json      the vocabulary (GluonNLP Vocab JSON)
    run.json        facts of the run the config does not hold (ranks, eval columns,
                    each rank's training columns, whether its numbers depend on the
                    rank count and why: Config.world_size_dependence)
    best.params     parameters with the best validation loss so far
    final.params    parameters at the end of the run
    .lock           locked by the job that writes the directory; names its host and pid
                    and holds its token; removed when the job ends

Every file is written to a temporary name in the same directory (`.NAME.XXXXXXXX.tmp`,
with the umask's permissions), fsynced and renamed, so a crash never leaves a
half-written file under a final name; the temporaries a killed job left are removed when
the directory is next locked. Before each rename into place, prune and metrics append,
rank 0 checks that the lock file still holds its token (`RunDirLock.check`), so a job
whose lock lapsed on shared storage stops instead of writing. `make_run_dir` is called
once at start-up; ranks other than 0 get a `QuietRunDir` whose writes do nothing. Rank
0's `RunDir` locks the directory before it writes anything there, until `release` (see
`RunDirLock`): a second job in the same directory is refused instead of pruning the
first one's checkpoints and truncating its metrics. Reading a run (eval, generate,
report) takes no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import socket
import tempfile
import time
import uuid
from typing import Callable, List, TypeVar

from ..errors import TRANSIENT_ERRNOS, RunDirBusy, RunDirLost, UsageError

T = TypeVar("T")
# A write that fails with an error storage may clear by itself (errors.TRANSIENT_ERRNOS:
# NFS's lock manager away, a stale handle after a server failover, an I/O error) is tried
# again after these pauses before the job stops (exit 7, errors.StorageUnavailable).
RETRY_DELAYS_S = (1.0, 2.0, 4.0)


# atomic_write's temporary names: ".NAME.XXXXXXXX.tmp" (8 of tempfile's letters, as
# mkstemp named them before). One left by a killed writer is removed when the run
# directory is next locked (`remove_stale`).
TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _new_tmp(path: str) -> str:
    """Creates an empty file beside path under a new temporary name. Unlike mkstemp's
    0600, its mode is 0666 less the umask, so the renamed file is as readable as any
    other the user writes (0644 under umask 022): teammates can use a shared run."""
    directory, base = os.path.split(os.path.abspath(path))
    pick = random.SystemRandom()
    while True:
        tmp = os.path.join(directory, f".{base}.{''.join(pick.choices(_LETTERS, k=8))}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str, write: Callable[[str], None],
                 fence: Callable[[], None] = lambda: None) -> None:
    """Calls write(tmp_path), fsyncs the file, then renames it to path. fence() is called
    right before the rename: it raises when this job no longer holds the run directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _new_tmp(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        fence()
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


def write_text(path: str, text: str, fence: Callable[[], None] = lambda: None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write, fence)


def remove_stale(directory: str) -> List[str]:
    """Removes the temporary files of atomic_write a killed writer left in directory (only
    those: regular files named by TMP_NAME). Called by the holder of the directory's lock,
    when it takes it: no write of another job can be in progress. Returns their names."""
    stale = [n for n in os.listdir(directory) if TMP_NAME.match(n) and
             os.path.isfile(os.path.join(directory, n))]
    for name in stale:
        os.unlink(os.path.join(directory, name))
    return stale


class RunDirLock:
    """An exclusive lock on a run directory for the life of a job: flock(2) on RUN_DIR/.lock,
    which the kernel drops when the holder ends, however it ends (a killed job leaves the
    file behind, never the lock; a job that ends removes the file). The holder writes its
    host, pid, start time and a token of its own into the file: a refused job names the
    holder, and the holder fences its writes with `check` (see docs/reliability.md, One
    job per run directory): where a lock can lapse or does not exclude other nodes (NFS),
    a holder whose token is gone from the file stops instead of undoing another job's
    work. Raises RunDirBusy when another job holds it."""

    NAME = ".lock"

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, self.NAME)
        self.token = uuid.uuid4().hex
        self.fd = None
        for _ in range(100):
            fd = self._take()
            if self._locks_the_file(fd):
                self.fd = fd
                break
            os.close(fd)  # its holder removed it on release: lock the file now named .lock
        else:
            raise UsageError(f"cannot lock run directory {directory}: its lock file keeps "
                             f"being replaced")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
              "token": self.token}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
            os.fsync(self.fd)  # on NFS: on the server before any other node reads it
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise

    def _take(self) -> int:
        """Opens RUN_DIR/.lock (0666 less the umask) and locks it, or raises."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._holder(fd) if isinstance(err, BlockingIOError) else None
            os.close(fd)
            if holder is None:
                raise UsageError(f"cannot lock run directory {self.directory}: "
                                 f"{err.strerror}") from None
            raise RunDirBusy(f"run directory {self.directory} is in use by another job "
                             f"({holder}); stop it or choose another --run-dir") from None
        return fd

    def _locks_the_file(self, fd: int) -> bool:
        """Whether RUN_DIR/.lock is still the file fd locked: a holder that released it
        between our open and our flock removed it, and a lock on a removed file is none."""
        try:
            named, held = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    @staticmethod
    def _holder(fd: int) -> str:
        """Who holds the lock, as its file says; a holder that has just taken it may not
        have written it yet."""
        for _ in range(10):
            try:
                who = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
                return _named(who)
            except (ValueError, KeyError, TypeError):
                time.sleep(0.1)
        return "its host and pid are not recorded"

    def _recorded(self):
        """RUN_DIR/.lock as it is now, read by name and opened afresh (NFS revalidates a
        file when it is opened): its record, None when it is gone, else why unreadable."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                who = json.loads(fh.read())
            return who if isinstance(who, dict) else "it holds no holder's record"
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"it is unreadable: {err.strerror}"
        except ValueError:
            return "it holds no holder's record"

    def check(self) -> None:
        """Raises RunDirLost unless RUN_DIR/.lock still holds this job's token. Rank 0
        calls it right before each rename into place, prune and metrics append."""
        who = self._recorded()
        if isinstance(who, dict) and who.get("token") == self.token:
            return
        if who is None:
            now = "its lock file was removed"
        elif isinstance(who, dict):
            try:
                now = f"another job holds it now: {_named(who)}"
            except KeyError:
                now = "its lock file names another job"
        else:
            now = f"its lock file: {who}"
        raise RunDirLost(f"run directory {self.directory} is no longer locked by this job "
                         f"({now}); this job stopped without writing there again")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Removed while still locked, and only if still ours: a job that opened it
            # meanwhile finds it replaced (_locks_the_file) and locks a new one.
            who = self._recorded()
            if self._locks_the_file(self.fd) and isinstance(who, dict) and \
                    who.get("token") == self.token:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)         # and with it the lock
            self.fd = None


def _named(who: dict) -> str:
    return f"host {who['host']}, pid {who['pid']}, since {who['since']}"


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
        try:
            self.tidy()
        except OSError as err:
            self.release()
            raise UsageError(f"cannot tidy run directory {path}: {_reason(err)}") from None

    def tidy(self) -> None:
        """Under the new lock, what killed writers left: atomic_write's temporary files,
        and in checkpoints/ the half-written checkpoints and one a rewrite of its step
        moved aside (put back: see checkpoint.tidy)."""
        remove_stale(self.path)
        if os.path.isdir(self.file("checkpoints")):
            from .checkpoint import tidy  # MXNet: only when there are checkpoints

            tidy(self.file("checkpoints"))

    def fence(self) -> None:
        """Raises RunDirLost when this job no longer holds the directory's lock."""
        self.lock.check()

    def release(self) -> None:
        """Unlocks the directory: the job has written its last file there."""
        self.lock.release()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        try:
            retrying(f"the write of {self.file(name)}",
                     lambda: write_text(self.file(name), text, self.fence))
        except OSError as err:
            self.fence()
            raise UsageError(f"cannot write {self.file(name)}: {err.strerror}") from None

    def save_params(self, name: str, block) -> None:
        try:
            retrying(f"the write of {self.file(name)}", lambda: full_disk_as_oserror(
                self.path, block, lambda: atomic_write(self.file(name), block.save_parameters,
                                                       self.fence)))
        except _write_errors() as err:
            self.fence()
            raise UsageError(f"cannot write {self.file(name)}: {_reason(err)}") from None

    def save_checkpoint(self, step: int, model, optimizer: dict, hidden, meta: dict,
                        keep: int, protect) -> None:
        from .checkpoint import left_by_failed_write, write_checkpoint

        directory = self.file("checkpoints")
        try:
            retrying(f"the checkpoint write of step {step}", lambda: full_disk_as_oserror(
                directory, model, lambda: write_checkpoint(
                    directory, step, model, optimizer, hidden, meta, keep, protect,
                    self.fence)))
        except _write_errors() as err:
            self.fence()  # a job that took the directory over may have removed ours
            raise UsageError(f"cannot write the checkpoint of step {step} in {directory}: "
                             f"{_reason(err)}; {left_by_failed_write(directory, step)}") \
                from None

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

        self.fence()
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


def retrying(what: str, action: Callable[[], T]) -> T:
    """action(), tried again after each of RETRY_DELAYS_S while it fails with a transient
    storage error (one note line each); any other error, or the last one, is raised. Each
    try starts over: a checkpoint write removes what a failed one left (write_checkpoint),
    and every file is renamed into place whole."""
    for delay in RETRY_DELAYS_S:
        try:
            return action()
        except OSError as err:
            if err.errno not in TRANSIENT_ERRNOS:
                raise
            from ..runtime.lifecycle import say

            say(f"dist-lm: note: {what} failed ({err.strerror or err}); trying again in "
                f"{delay:g}s")
            time.sleep(delay)
    return action()


def full_disk_as_oserror(directory: str, model, write: Callable[[], T]) -> T:
    """write(), with MXNet's short write ('FileStream.Write incomplete', an MXNetError that
    names no cause) raised as ENOSPC when the file system has less room left than the
    model's parameters take: a full disk, which may pass (errors.TRANSIENT_ERRNOS), rather
    than a file-size limit or bad input. The write's own files are gone by then (every
    write removes what it left), so the room counted is what others left."""
    import mxnet as mx
    import numpy as np

    try:
        return write()
    except mx.base.MXNetError:
        need = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                   for p in model.collect_params().values())
        stat = os.statvfs(directory)
        if stat.f_bavail * stat.f_frsize < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise


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

    def fence(self) -> None:
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
