"""Checkpoints: one explicit set of parts, written atomically by rank 0, verified on load.

    RUN_DIR/checkpoints/step-000001200/
        model.params     parameters (MXNet's NDArray format)
        optimizer.nd     optimizer state arrays (momentum, Adam moments), NDArray format
        hidden.nd        the recurrent state of every column of the global batch
        meta.json        everything else (below), and the sha256 of the three files above

meta.json holds the format version, epoch, global step, the next batch of the epoch (the
position in the data), learning rate, best validation loss (the plateau state), the test
loss at the best, the interval sums of the log line in progress, optimizer counters,
the config, the vocabulary's digest, the global batch layout and the random-number scheme.
Nothing is pickled. Randomness needs no saved state: before every step the MXNet
generator is re-seeded from (seed, rank, step), so a resumed run draws the same dropout
masks as an uninterrupted one.

A checkpoint is written into `.tmp-step-...`, every file fsynced, then the directory is
renamed to `step-...` and the parent fsynced: a crash leaves either the complete
checkpoint or no checkpoint under the final name, never a half-written one. `load_newest`
checks every digest and falls back to the previous checkpoint (with a warning) when the
newest is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np

from .errors import UsageError

FORMAT_VERSION = 1
FILES = ("model.params", "optimizer.nd", "hidden.nd")
STEP_DIR = re.compile(r"^step-(\d{9})$")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- optimizer state without pickle --------------------------------------------------

def optimizer_arrays(trainer) -> (Dict[str, mx.nd.NDArray], dict):
    """The updater's per-parameter states as named arrays, and the counters as JSON."""
    updater = trainer._updaters[0]
    arrays, layout = {}, {}
    for idx, state in updater.states.items():
        parts = state if isinstance(state, (tuple, list)) else (state,)
        layout[str(idx)] = [p is not None for p in parts]
        for j, part in enumerate(parts):
            if part is not None:
                arrays[f"{idx}/{j}"] = part
    opt = trainer._optimizer
    counters = {"num_update": opt.num_update,
                "index_update_count": {str(k): v for k, v in
                                       opt._index_update_count.items()},
                "layout": layout}
    return arrays, counters


def restore_optimizer(trainer, arrays: Dict[str, mx.nd.NDArray], counters: dict,
                      ctx: mx.Context) -> None:
    updater = trainer._updaters[0]
    for idx, present in counters["layout"].items():
        parts = [arrays[f"{idx}/{j}"].as_in_context(ctx) if p else None
                 for j, p in enumerate(present)]
        updater.states[int(idx)] = parts[0] if len(parts) == 1 else tuple(parts)
        updater.states_synced[int(idx)] = True
    opt = trainer._optimizer
    opt.num_update = counters["num_update"]
    opt._index_update_count = {int(k): v for k, v in counters["index_update_count"].items()}


# --- writing -------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def list_checkpoints(directory: str) -> List[str]:
    """Complete-looking checkpoint directories, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if STEP_DIR.match(n))
    return [os.path.join(directory, n) for n in names]


def write_checkpoint(directory: str, step: int, model, optimizer: Dict[str, mx.nd.NDArray],
                     hidden: List[np.ndarray], meta: dict, keep: int,
                     protect: Optional[int]) -> str:
    """Writes one checkpoint atomically; keeps the newest `keep` plus step `protect`."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"step-{step:09d}")
    tmp = os.path.join(directory, f".tmp-step-{step:09d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        model.save_parameters(os.path.join(tmp, "model.params"))
        mx.nd.save(os.path.join(tmp, "optimizer.nd"), optimizer or {"": mx.nd.zeros((1,))})
        mx.nd.save(os.path.join(tmp, "hidden.nd"),
                   {str(i): mx.nd.array(h) for i, h in enumerate(hidden)})
        meta = dict(meta, format_version=FORMAT_VERSION, step=step,
                    files={f: sha256(os.path.join(tmp, f)) for f in FILES})
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
        for name in FILES + ("meta.json",):
            _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        if os.path.exists(final):  # a re-run of the same step: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        if protect is None or not old.endswith(f"step-{protect:09d}"):
            shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading -------------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: str
    meta: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def verify(path: str) -> Checkpoint:
    """Reads meta.json and checks every file's digest; raises UsageError if damaged."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path}: no meta.json (not a dist-lm checkpoint)") \
            from None
    except (OSError, ValueError) as err:
        raise UsageError(f"checkpoint {path}: unreadable meta.json ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"checkpoint {path}: unknown format (version "
                         f"{meta.get('format_version') if isinstance(meta, dict) else '?'}, "
                         f"expected {FORMAT_VERSION})")
    for name in FILES:
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise UsageError(f"checkpoint {path}: {name} is missing")
        if sha256(file_path) != meta.get("files", {}).get(name):
            raise UsageError(f"checkpoint {path}: {name} is damaged (digest mismatch)")
    return Checkpoint(path, meta)


def find_resume(spec: str, directory: str, strict: bool) -> Optional[Checkpoint]:
    """'auto': the newest intact checkpoint in directory (None if there is none);
    a path: that checkpoint. A damaged newest one is skipped with a warning unless strict."""
    if spec not in ("auto", "none"):
        if not os.path.isdir(spec):
            raise UsageError(f"--resume {spec}: no such checkpoint directory")
        return verify(spec)
    if spec == "none":
        return None
    for path in reversed(list_checkpoints(directory)):
        try:
            return verify(path)
        except UsageError as err:
            if strict:
                raise
            print(f"dist-lm: warning: {err}; trying the previous checkpoint",
                  file=sys.stderr, flush=True)
    return None
