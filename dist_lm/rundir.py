"""The run directory: the files a run leaves, written by rank 0 only.

    config.json     the full Config of the run (loadable with --config)
    vocab.json      the vocabulary (GluonNLP Vocab JSON)
    run.json        facts of the run the config does not hold (ranks, eval columns)
    best.params     parameters with the best validation loss so far
    final.params    parameters at the end of the run

Every file is written to a temporary name in the same directory, fsynced and renamed, so
a crash never leaves a half-written file under a final name. `make_run_dir` is called
once at start-up; ranks other than 0 get a `QuietRunDir` whose writes do nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

from .errors import UsageError


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


class RunDir:
    def __init__(self, path: str):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
            probe.close()
        except OSError as err:
            raise UsageError(f"run directory {path} is not writable: {err.strerror}") from None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj) -> None:
        write_text(self.file(name), json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        write_text(self.file(name), text)

    def save_params(self, name: str, block) -> None:
        atomic_write(self.file(name), block.save_parameters)


class QuietRunDir(RunDir):
    """The run directory as seen by ranks other than 0: nothing is written."""

    def __init__(self, path: str):
        self.path = path

    def write_json(self, name: str, obj) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass

    def save_params(self, name: str, block) -> None:
        pass


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
