"""Checkpoints: one explicit set of stateful parts, saved and restored here and only here.

The parts (`Parts`), each saved whole and restored in place:

    model       parameters                               -> model.params
    trainer     optimizer state arrays (momentum, Adam)  -> optimizer.nd
                and counters (update counts)             -> meta.json
    schedule    learning rate and plateau state          -> meta.json
    progress    epoch, next batch, step, best step, test loss at the best  -> meta.json
                (variable-length BPTT: also the token position and rows trained)
    meter       the log interval in progress and the non-finite count      -> meta.json
    hidden      the recurrent state of every column of the global batch    -> hidden.nd
    terms       AR/TAR sums of the log interval (with --alpha/--beta)      -> meta.json
    average     NT-ASGD's trigger state (with --ntasgd)                    -> meta.json
                and, once it switched, the averaged parameters   -> optimizer.nd "average/*"

besides which meta.json records the format version, the config, the vocabulary's digest,
the global batch layout, the random-number scheme and the sha256 of the three array
files. Nothing is pickled. Randomness needs no saved state: every activation dropout
mask comes from (seed, site, step, global column) and every weight-level one from
(seed, step) (masks.py, stepper.reseed), so a resumed run draws the same masks as an
uninterrupted one at any number of ranks (and variable BPTT lengths and sampled-softmax
candidates come from (seed, step)).

meta.json also records the data (each split's sha1 and token count; the layout has the
batches per epoch), so that a resume on other data is refused (`check_data`), and its own
sha256 (`meta_digest`), so that a damaged meta.json makes a damaged checkpoint.

A checkpoint holding any of the AWD recipe's state (token position, interval schedule,
terms, average) is format 3, which earlier versions refuse instead of resuming without
it; every other checkpoint is still written as format 2, as before.

    RUN_DIR/checkpoints/step-000001200/{model.params, optimizer.nd, hidden.nd, meta.json}
    RUN_DIR/checkpoints/abandoned/after-step-000001200-20250101T120000Z/
                        {step-000001500/, step-000001800/, best.params, final.params}

Every rank takes part in a save (hidden states are gathered, flags agreed); rank 0 alone
writes, through its run directory (the other ranks' run directory writes nothing). A
checkpoint is written into `.tmp-step-...`, every file fsynced, then the directory is
renamed to `step-...` and the parent fsynced: a crash leaves either the complete
checkpoint or no checkpoint under the final name. A checkpoint already at that step is
renamed aside (`.replaced-step-...`) until the new one is in place (`tidy` puts back one
a killed write left aside). Each write first removes every
`.tmp-step-...` (one job owns the directory, so any left is from a crashed write), and
then prunes by step to the newest `keep` plus the best one, among the checkpoints up to
its own step. `find_resume` checks every digest and falls back to the previous
checkpoint (with a warning) when the newest is damaged; the damaged one stays, after
the new line's checkpoints by step, until that line writes its step again. On resume
rank 0 reads it and broadcasts its arrays one at a time (`broadcast_arrays`), so that no
rank holds more than the state plus its largest array.

The checkpoints directory holds one line of the run. Resuming by path from a checkpoint
at step S while later ones exist (a rollback past a loss spike, or a checkpoint from
elsewhere) starts a new line: rank 0 moves the later checkpoints, and the best.params and
final.params their line wrote, into `abandoned/after-step-S-TIME/` (renames, nothing
deleted) before the first new checkpoint, so that pruning by step and `--resume auto`
follow the new line. `--resume auto` moves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import mxnet as mx
import numpy as np

from ..data.text import column_range
from ..errors import UsageError
from ..hashing import hash_file, text_digest
from ..runtime.lifecycle import say
from .schedule import LRSchedule

FORMAT_VERSION = 3      # written when a checkpoint holds state format 2 has no place for
BASE_FORMAT = 2         # written otherwise: the fixed-BPTT recipe's checkpoints as before
READABLE = (BASE_FORMAT, FORMAT_VERSION)
FILES = ("model.params", "optimizer.nd", "hidden.nd")
META_DIGEST = "meta_sha256"  # meta.json's own digest, inside it (`meta_digest`)
STEP_DIR = re.compile(r"^step-(\d{9})$")
TMP_PREFIX = ".tmp-step-"   # a checkpoint being written
ASIDE = re.compile(r"^\.replaced-step-(\d{9})$")  # one a rewrite of its step replaces
ABANDONED = "abandoned"     # the lines a resume from an earlier step left behind
RNG_SCHEME = ("activation dropout masks from Philox(seed; site, step, global column); "
              "weight-level masks from mx.random.seed(crc32('seed:step')) before every step")
# What checkpoints recorded while every mask came from a generator seeded per rank: a
# column's masks depended on the rank holding it and on the number of ranks.
RANK_RNG_SCHEME = ("mx.random.seed(crc32('seed:rank:step')) before every step; every dropout "
                   "mask by Dropout(cudnn_off), between LSTM layers too")
# What checkpoints recorded before the models drew the dropout between LSTM layers
# themselves: on a CPU that dropout was skipped, on a GPU cuDNN drew it.
EARLIER_RNG_SCHEME = "mx.random.seed(crc32('seed:rank:step')) before every step"


class OtherFormat(UsageError):
    """A checkpoint written in another format: refused, never skipped as damaged."""


@dataclass
class Progress:
    """Where the run is in the data."""

    epoch: int = 0
    batch: int = 0                    # next batch of the epoch; all of them: validation due
    step: int = 0                     # optimizer steps done
    best_step: Optional[int] = None   # the checkpoint to keep when pruning
    test_loss: Optional[float] = None  # at the best validation loss
    # Variable-length BPTT only (bptt.py), None otherwise:
    position: Optional[int] = None    # next token row of the epoch's columns
    rows: Optional[int] = None        # rows (tokens per column) trained on over the run

    def state_dict(self) -> dict:
        state = asdict(self)
        for key in ("position", "rows"):  # a fixed-BPTT run saves what it always saved
            if state[key] is None:
                del state[key]
        return state


@dataclass
class Parts:
    """The live objects a checkpoint saves and restores."""

    model: object        # LSTMLM
    trainer: object      # gluon.Trainer or horovod's DistributedTrainer
    schedule: LRSchedule
    progress: Progress
    meter: object        # meter.IntervalMeter
    terms: object = None    # regularize.TermSums or NoTerms
    average: object = None  # ntasgd.Averager or NoAverage


def sha256(path: str) -> str:
    return hash_file(path, "sha256")


class Checkpointer:
    """Saves and restores `Parts` for one run; every rank calls it at the same points."""

    def __init__(self, parts: Parts, world, run_dir, cfg, vocab_json: str,
                 batches_per_epoch: int, epoch_done=None,
                 data: Optional[Dict[str, dict]] = None):
        """epoch_done(progress): whether the epoch's windows are all trained (default:
        progress.batch == batches_per_epoch). data: each split's {"sha1", "tokens"}
        (corpus.Corpus.digests)."""
        self.parts, self.world, self.run_dir, self.cfg = parts, world, run_dir, cfg
        self.vocab_digest = text_digest(vocab_json)
        self.data = data or {}
        self.layout = {"global_columns": cfg.global_columns(world.size),
                       "bptt": cfg.run.bptt, "ranks": world.size,
                       "batches_per_epoch": batches_per_epoch}
        self.epoch_done = epoch_done or (lambda p: p.batch >= batches_per_epoch)
        # The step of the newest checkpoint this job wrote or resumed from (None: none
        # yet), on every rank: for the rank's exit record (runtime/selfreport.py).
        self.newest_step: Optional[int] = None

    def save(self, hidden: List[mx.nd.NDArray]) -> None:
        """Checkpoints the parts as they are now; `hidden` is this rank's recurrent state,
        each (L, b_r, H). Raises on every rank if rank 0 cannot write."""
        from ..runtime.dist import run_everywhere

        p = self.parts
        meter_state = p.meter.state_dict()  # reduced over ranks: every rank takes part
        gathered = self.world.allgather_object([h.asnumpy() for h in hidden],
                                               name="ckpt.hidden")
        # Columns of the global batch in rank order (each rank's block of b_r columns,
        # `column_range`): (L, G, H) per state array.
        full = [np.concatenate([g[i] for g in gathered], axis=1) for i in range(len(hidden))]
        arrays, counters = optimizer_arrays(p.trainer)
        meta = {"progress": p.progress.state_dict(), "schedule": p.schedule.state_dict(),
                "meter": meter_state, "optimizer_counters": counters,
                "config": self.cfg.to_dict(), "vocab_sha256": self.vocab_digest,
                "data": self.data, "layout": self.layout, "rng": RNG_SCHEME}
        for name, part in [("terms", p.terms), ("average", p.average)]:
            state = part.state_dict() if part is not None else None  # terms: a reduction
            if state is not None:
                meta[name] = state
        if p.average is not None:
            arrays.update(p.average.arrays())
        meta["format_version"] = format_of(meta)
        run_everywhere(self.world, lambda: self.run_dir.save_checkpoint(
            p.progress.step, p.model, arrays, full, meta, self.cfg.reliability.keep_checkpoints,
            p.progress.best_step), "ckpt.write")
        self.newest_step = p.progress.step

    def resume(self, ctx: mx.Context) -> Optional[List[np.ndarray]]:
        """Finds the checkpoint to resume from (rank 0), refuses one that does not belong to
        this run, and loads it into the parts on every rank; one given by path becomes the
        newest of the run directory's line (`start_line`). Returns the global hidden
        state when the checkpoint is inside an epoch, else None."""
        from ..runtime.dist import run_everywhere

        rel = self.cfg.reliability
        found = run_everywhere(self.world, lambda: self.run_dir.find_resume(
            rel.resume, rel.resume_strict), "resume")
        meta = self.world.broadcast_object(found.meta if found else None, name="resume.meta")
        if meta is None:
            return None
        run_everywhere(self.world, lambda: self.check_compatible(meta), "resume-check")
        if self.world.is_root and not meta.get("data"):
            say(f"dist-lm: warning: the checkpoint at step {meta['step']} was written by an "
                f"earlier dist-lm, which recorded no digests of its data: resuming without "
                f"checking that this run's splits are the ones it was trained on")
        if self.world.is_root and meta.get("rng") == EARLIER_RNG_SCHEME and \
                self.cfg.model.dropout and self.cfg.model.num_layers > 1 and \
                self.cfg.model.family == "standard":
            say(f"dist-lm: warning: the checkpoint at step {meta['step']} was written by an "
                f"earlier dist-lm, which did not apply the dropout between LSTM layers on a "
                f"CPU (on a GPU cuDNN drew it): this run applies it from here on, so it "
                f"continues a differently regularized model")
        elif self.world.is_root and meta.get("rng") == RANK_RNG_SCHEME and self.cfg.model.dropout:
            say(f"dist-lm: warning: the checkpoint at step {meta['step']} was written by an "
                f"earlier dist-lm, which drew dropout masks per rank: this run draws them per "
                f"column of the global batch from here on (the same regularization, other "
                f"noise), so it does not end exactly where that version would have")
        p = self.parts
        arrays = run_everywhere(
            self.world, lambda: self.run_dir.load_checkpoint(found, p.model, ctx), "resume-load")
        # Only once the checkpoint is taken: a refused one leaves the directory as it was.
        # 'auto' takes the newest, or falls back past a damaged one, which stays in place.
        if rel.resume != "auto":
            run_everywhere(self.world, lambda: self.run_dir.start_line(found), "resume-line")
        arrays = self.world.broadcast_arrays(arrays, name="resume.arrays")
        hidden = [arrays.pop(f"hidden/{i}")
                  for i in range(sum(k.startswith("hidden/") for k in arrays))]
        if p.average is not None and "average" in meta:
            p.average.load_state_dict(meta["average"], arrays, ctx)
        restore_optimizer(p.trainer, {k: mx.nd.array(v) for k, v in arrays.items()
                                      if not k.startswith("average/")},
                          meta["optimizer_counters"], ctx)
        p.schedule.load_state_dict(meta["schedule"])
        vars(p.progress).update(meta["progress"])
        # The log's sums are N x the global values at the rank count that saved them.
        saved_ranks = meta["layout"]["ranks"]
        p.meter.load_state_dict(meta["meter"], saved_ranks)
        if p.terms is not None and "terms" in meta:
            p.terms.load_state_dict(meta["terms"], saved_ranks)
        self.newest_step = p.progress.step
        inside_epoch = 0 < p.progress.batch and not self.epoch_done(p.progress)
        return hidden if inside_epoch else None

    def check_compatible(self, meta: dict) -> None:
        """Refuses a checkpoint that does not belong to this run's data, model and layout."""
        where = f"checkpoint at step {meta['step']}"
        self.check_data(meta.get("data") or {}, where)
        if meta.get("vocab_sha256") != self.vocab_digest:
            raise UsageError(f"{where} was trained with a different vocabulary (other "
                             f"training data or --min-freq/--max-vocab)")
        saved_model, model = meta["config"]["model"], self.cfg.to_dict()["model"]
        if saved_model != model:
            diff = sorted(k for k in saved_model if saved_model[k] != model.get(k))
            raise UsageError(f"{where} is of a different model (differs in "
                             f"{', '.join(diff)})")
        saved, now = meta["layout"], self.layout
        if (saved["global_columns"], saved["bptt"]) != (now["global_columns"], now["bptt"]):
            raise UsageError(f"{where} used {saved['global_columns']} global columns x bptt "
                             f"{saved['bptt']}; this run has {now['global_columns']} x "
                             f"{now['bptt']} (keep the global batch: --global-batch-size "
                             f"{saved['global_columns']})")
        batches = saved.get("batches_per_epoch")
        if batches is not None and batches != now["batches_per_epoch"]:
            # Same global batch and bptt: only another training split changes this (the
            # one check of the data a checkpoint without digests allows).
            raise UsageError(f"{where} was trained on a training split of {batches} batches "
                             f"per epoch; this run's has {now['batches_per_epoch']}: other "
                             f"data. Resume it with the data it was trained on, or start in "
                             f"another --run-dir")
        # A position by batch or by token: no resuming across. NT-ASGD may be switched
        # on at a resume (its history starts there), not off (its average would be lost).
        then = bool(meta["config"]["run"].get("variable_bptt", False))
        if then != self.cfg.run.variable_bptt:
            raise UsageError(f"{where} was trained {'with' if then else 'without'} "
                             f"--variable-bptt; resume it with "
                             f"{'--variable-bptt' if then else '--no-variable-bptt'}")
        if "average" in meta and not self.cfg.optim.ntasgd:
            raise UsageError(f"{where} holds an NT-ASGD state; resume it with --ntasgd")

    def check_data(self, saved: Dict[str, dict], where: str) -> None:
        """Refuses a checkpoint trained on other data than this run reads: the training
        split (its position is a batch index into it), and the validation and test
        splits too, since the plateau decision, the best validation loss and the test
        loss at the best compare numbers taken on them. saved: the checkpoint's "data"
        ({} when it records none: an earlier dist-lm's)."""
        for name in ("train", "valid", "test"):
            then, now = saved.get(name), self.data.get(name)
            if then is None or now is None or then == now:
                continue
            raise UsageError(f"{where} was trained on other data: its {name} split has sha1 "
                             f"{then['sha1']} ({then['tokens']:,} tokens), this run's "
                             f"{now['sha1']} ({now['tokens']:,} tokens); resume it with the "
                             f"data it was trained on, or start in another --run-dir")


def format_of(meta: dict) -> int:
    """FORMAT_VERSION when the checkpoint holds state an earlier version would drop (it
    refuses format 3 rather than resume without it), else BASE_FORMAT."""
    extra = "position" in meta["progress"] or "interval" in meta["schedule"] or \
        "terms" in meta or "average" in meta
    return FORMAT_VERSION if extra else BASE_FORMAT


def hidden_for_rank(full: List[np.ndarray], world, ctx: mx.Context) -> List[mx.nd.NDArray]:
    """This rank's columns of a saved global hidden state (L, G, H), each (L, b_r, H): the
    block `column_range` gives it, whatever the rank count that wrote the state."""
    mine = column_range(full[0].shape[1], world.rank, world.size)
    return [mx.nd.array(h[:, mine.start:mine.stop], ctx=ctx) for h in full]


def load_params(model, params_file: str, ctx: mx.Context) -> None:
    try:
        model.load_parameters(params_file, ctx=ctx)
    except (mx.base.MXNetError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {params_file} into this run's model: {first}") from None


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
    # The updater re-selects the counts of the device it updates on from
    # _all_index_update_counts before every update, so they must be restored there (a
    # new _index_update_count alone is dropped at the next step and Adam's bias
    # correction restarts from step 1).
    counts = {int(k): v for k, v in counters["index_update_count"].items()}
    opt._all_index_update_counts = {ctx.device_id: counts}
    opt._index_update_count = counts


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


def remove_unfinished(directory: str) -> None:
    """Removes every checkpoint left half-written (by a rank killed during a write, an
    out-of-memory kill): only this job writes the directory, so none is in progress."""
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _aside(directory: str, step: int) -> str:
    return os.path.join(directory, f".replaced-step-{step:09d}")


def write_checkpoint(directory: str, step: int, model, optimizer: Dict[str, mx.nd.NDArray],
                     hidden: List[np.ndarray], meta: dict, keep: int,
                     protect: Optional[int], fence: Callable[[], None] = lambda: None) -> str:
    """Writes one checkpoint atomically; of those up to this step, keeps the newest
    `keep` plus step `protect` (later ones are left alone). fence() raises when this job
    no longer holds the run directory: it is called before anything is removed, renamed
    into place or pruned."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"step-{step:09d}")
    # Its own name: a job whose lock was taken over never removes the new holder's.
    tmp = os.path.join(directory, f"{TMP_PREFIX}{step:09d}.{uuid.uuid4().hex[:8]}")
    fence()
    remove_unfinished(directory)
    os.makedirs(tmp)
    try:
        model.save_parameters(os.path.join(tmp, "model.params"))
        mx.nd.save(os.path.join(tmp, "optimizer.nd"), optimizer or {"": mx.nd.zeros((1,))})
        mx.nd.save(os.path.join(tmp, "hidden.nd"),
                   {str(i): mx.nd.array(h) for i, h in enumerate(hidden)})
        meta = dict(meta, format_version=meta.get("format_version", BASE_FORMAT), step=step,
                    files={f: sha256(os.path.join(tmp, f)) for f in FILES})
        meta[META_DIGEST] = meta_digest(json.loads(json.dumps(meta)))  # as read back
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
        for name in FILES + ("meta.json",):
            _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        fence()
        _put_in_place(tmp, final, _aside(directory, step))
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_aside(directory, step), ignore_errors=True)
    # Only those up to this step count: a later one is a damaged checkpoint that
    # --resume auto passed over (left in place), which must not push this line out.
    fence()
    for old in [p for p in list_checkpoints(directory) if _step_of(p) <= step][:-keep]:
        if protect is None or not old.endswith(f"step-{protect:09d}"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _put_in_place(tmp: str, final: str, aside: str) -> None:
    """Renames tmp to final. A checkpoint already at final (a rewrite of its step: a
    resume from the epoch end's checkpoint saves that step again) is renamed aside first
    and put back if the new one cannot take its place, so that at every moment the step
    has a whole checkpoint under one of the two names; one left aside by a killed write
    is put back when the run directory is next locked (`tidy`)."""
    if not os.path.isdir(final):
        os.rename(tmp, final)
        return
    shutil.rmtree(aside, ignore_errors=True)  # a finished rewrite's, not yet removed
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        try:
            os.rename(aside, final)
        except OSError:
            pass  # whole under the aside name: `tidy` puts it back
        raise


def tidy(directory: str) -> None:
    """When the run directory is locked: puts back a checkpoint a rewrite of its step left
    aside and never replaced (the write was killed between the two renames), removes one
    whose replacement is in place, and removes the half-written ones."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        match = ASIDE.match(name)
        if not match:
            continue
        final = os.path.join(directory, f"step-{match.group(1)}")
        if os.path.isdir(final):
            shutil.rmtree(os.path.join(directory, name))
        else:
            os.rename(os.path.join(directory, name), final)
            say(f"dist-lm: note: put back the checkpoint of step {int(match.group(1))}, "
                f"which an interrupted rewrite of that step left aside as {name}")
    remove_unfinished(directory)
    _fsync_dir(directory)


def left_by_failed_write(directory: str, step: int) -> str:
    """What a failed write of the checkpoint of `step` left, in words for its error line."""
    if os.path.isdir(_aside(directory, step)) and \
            not os.path.isdir(os.path.join(directory, f"step-{step:09d}")):
        return (f"the earlier checkpoint of step {step} is whole under "
                f"{_aside(directory, step)}, and is put back when the run directory is next "
                f"locked (--resume auto)")
    done = list_checkpoints(directory)
    if not done:
        return "no checkpoint had been written before"
    return f"the previous checkpoint is intact ({os.path.basename(done[-1])})"


# --- reading -------------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: str
    meta: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def meta_digest(meta: dict) -> str:
    """The sha256 of meta.json's content less its own digest, as canonical JSON (sorted
    keys, no spaces): a changed value is caught whatever the file's layout."""
    body = {k: v for k, v in meta.items() if k != META_DIGEST}
    return text_digest(json.dumps(body, sort_keys=True, separators=(",", ":")))


def verify(path: str) -> Checkpoint:
    """Reads meta.json and checks its own digest (absent from an earlier dist-lm's) and
    every file's; raises UsageError if damaged."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path}: no meta.json (not a dist-lm checkpoint)") \
            from None
    except (OSError, ValueError) as err:
        raise UsageError(f"checkpoint {path}: unreadable meta.json ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version not in READABLE:
        raise OtherFormat(f"checkpoint {path} has format {version}, written by another "
                          f"version of dist-lm (this one reads formats {BASE_FORMAT} and "
                          f"{FORMAT_VERSION}); resume it with that version, or start in "
                          f"another --run-dir")
    if version not in READABLE:
        raise UsageError(f"checkpoint {path}: unknown format (version "
                         f"{meta.get('format_version') if isinstance(meta, dict) else '?'}, "
                         f"expected {BASE_FORMAT} or {FORMAT_VERSION})")
    # After the format: one from another version is refused, never skipped as damaged
    # (its digest may be taken otherwise).
    if META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):
        raise UsageError(f"checkpoint {path}: meta.json is damaged (digest mismatch)")
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
        except OtherFormat:  # not damaged: falling back past it would lose the run
            raise
        except UsageError as err:
            if strict:
                raise
            print(f"dist-lm: warning: {err}; trying the previous checkpoint",
                  file=sys.stderr, flush=True)
    return None


# --- the line of a run ---------------------------------------------------------------

def start_line(directory: str, resumed: Checkpoint, best: str, final: str) -> Optional[str]:
    """Makes `resumed` (step S) the newest checkpoint of the directory's line. The
    checkpoints after S, and another one at S (resuming from a copy elsewhere), are moved
    into ABANDONED/after-step-S-TIME/ with the run files (`best`, `final`: the paths of
    best.params and final.params) their line wrote, and one line on stderr says so.
    Renames only: nothing is deleted. Returns the new directory, or None when no
    checkpoint is later."""
    step = resumed.meta["step"]
    later = [p for p in list_checkpoints(directory) if _step_of(p) > step or
             (_step_of(p) == step and not _same_checkpoint(p, resumed))]
    if not later:
        return None
    files = _files_of_line(later, resumed.meta.get("progress", {}).get("best_step"), best,
                           final)
    target = _new_abandoned_dir(directory, step)
    for path in reversed(later):  # newest first: a crash part-way leaves a shorter line
        os.rename(path, os.path.join(target, os.path.basename(path)))
    for path in files:
        os.rename(path, os.path.join(target, os.path.basename(path)))
    for path in {target, directory, *(os.path.dirname(f) for f in files)}:
        _fsync_dir(path)
    steps = f"steps {_step_of(later[0])} to {_step_of(later[-1])}" if len(later) > 1 \
        else f"step {_step_of(later[0])}"
    extra = "".join(f", {os.path.basename(f)}" for f in files)
    say(f"dist-lm: note: resuming from step {step} leaves the later line of this run: "
        f"moved its {len(later)} checkpoint{'s' if len(later) > 1 else ''} ({steps})"
        f"{extra} to {target} (nothing deleted); --resume auto now follows the new line")
    return target


def _files_of_line(later: List[str], best_step: Optional[int], best: str,
                   final: str) -> List[str]:
    """best.params and final.params when the abandoned line wrote them: written after its
    first checkpoint, or, for best.params, that line recorded another best step than the
    resumed checkpoint's `best_step` (a better one after the resumed step; or, from
    elsewhere, any other). final.params is the end of whichever run ended last, so only
    its time tells."""
    since = _written(later[0])
    files = [f for f in (best, final) if os.path.isfile(f) and _written(f) > since]
    best_steps = {_recorded(p).get("progress", {}).get("best_step") for p in later}
    if os.path.isfile(best) and best not in files and best_steps - {None, best_step}:
        files.insert(0, best)
    return files


def _new_abandoned_dir(directory: str, step: int) -> str:
    parent = os.path.join(directory, ABANDONED)
    os.makedirs(parent, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"after-step-{step:09d}-{stamp}", 1
    while True:
        try:
            path = os.path.join(parent, name if n == 1 else f"{name}-{n}")
            os.mkdir(path)
            return path
        except FileExistsError:  # a second rollback to the same step within the second
            n += 1


def _step_of(path: str) -> int:
    return int(STEP_DIR.match(os.path.basename(path)).group(1))


def _recorded(path: str) -> dict:
    """A checkpoint's meta.json as written, {} when unreadable (a damaged checkpoint)."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _same_checkpoint(path: str, resumed: Checkpoint) -> bool:
    return os.path.samefile(path, resumed.path) or \
        _recorded(path).get("files") == resumed.meta.get("files")


def _written(path: str) -> int:
    """When a file, or a checkpoint (its meta.json, written last), was written (ns)."""
    meta = os.path.join(path, "meta.json")
    return os.stat(meta if os.path.isfile(meta) else path).st_mtime_ns
