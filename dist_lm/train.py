"""Training and evaluation: the reference notebook's recipe, on any number of ranks.

The loop reads top to bottom: data -> model -> trainer -> epochs of BPTT steps, with a
validation pass per epoch, lr decay on plateau, and the best parameters kept. Nothing in
it depends on the rank: rank-0 work goes through the reporter and run-directory objects
chosen once in `train`, and every collective goes through the `World`.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd

from . import data as D
from .config import Config
from .dist import World, run_everywhere
from .checkpoint import (Checkpoint, find_resume, list_checkpoints, restore_optimizer,
                         text_digest)
from .errors import NonFiniteError, Preempted, UsageError
from .lifecycle import STOP, Watchdog
from .model import TokenLoss, build_model
from .observe import TrainStats, make_reporter
from .rundir import make_run_dir


@dataclass
class Corpus:
    vocab: object
    train: Optional[D.ColumnShard]
    valid: Optional[D.ColumnShard]
    test: Optional[D.ColumnShard]


def load_corpus(cfg: Config, world: World, need=("train", "valid", "test"),
                vocab=None) -> Corpus:
    """Reads the splits on every rank, builds the vocabulary once (rank 0) and broadcasts
    it, and keeps each rank's own columns. A bad input on any rank stops every rank."""
    # Rank 0 first, so that it alone downloads a missing dataset; then everyone else.
    run_everywhere(world, lambda: D.resolve_splits(cfg.data, need) if world.is_root else
                   None, "splits-root")
    splits = run_everywhere(world, lambda: D.resolve_splits(cfg.data, need), "splits")
    tokens = run_everywhere(
        world, lambda: {n: D.read_tokens(getattr(splits, n)) for n in need}, "read")
    if vocab is None:
        vocab_json = D.build_vocab(tokens["train"], cfg.data.min_freq,
                                   cfg.data.max_vocab).to_json() if world.is_root else None
        vocab = D.vocab_from_json(world.broadcast_object(vocab_json, name="vocab"))

    def shard(name: str, columns: int) -> D.ColumnShard:
        ids = D.encode(tokens.pop(name), vocab)
        return D.shard_columns(ids, columns, world.rank, world.size, cfg.run.bptt,
                               what=f"{name} split")

    columns = {"train": cfg.run.batch_size, "valid": cfg.run.eval_batch_size,
               "test": cfg.run.eval_batch_size}
    shards = run_everywhere(world, lambda: {n: shard(n, columns[n]) for n in need}, "shard")
    return Corpus(vocab, shards.get("train"), shards.get("valid"), shards.get("test"))


def to_nd(array: np.ndarray, ctx: mx.Context) -> mx.nd.NDArray:
    return mx.nd.array(array, ctx=ctx, dtype=np.float32)


def evaluate(loss_block: TokenLoss, shard: D.ColumnShard, world: World,
             ctx: mx.Context, beat=lambda: None) -> float:
    """Mean token loss over the split's columns on all ranks (hidden state carried)."""
    states = loss_block.model.begin_state(shard.ids.shape[1], ctx)
    total = mx.nd.zeros((1,), ctx=ctx)
    for inputs, targets in shard:
        loss, states = loss_block(to_nd(inputs, ctx), to_nd(targets, ctx), states)
        total += loss
        beat()
    # Every batch of every rank holds the same number of tokens, so the mean of the
    # per-batch means is the mean over all tokens.
    total = world.allreduce_sum(total, name="eval.loss")
    return float(total.asscalar()) / (shard.num_batches * world.size)


def hybrid_loss(model) -> TokenLoss:
    block = TokenLoss(model)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


class Stepper:
    """One optimizer step of the training recipe: forward, backward, allreduce, clip,
    update. Its own hybridized graph (training shapes) over the model's parameters."""

    def __init__(self, model, cfg: Config, world: World, ctx: mx.Context):
        self.loss_block = hybrid_loss(model)
        self.world, self.ctx = world, ctx
        self.clip, self.clip_mode = cfg.optim.clip, cfg.optim.clip_mode
        self.skip_nonfinite = cfg.reliability.nonfinite == "skip"
        params = model.collect_params()
        optim_params = {"learning_rate": cfg.scaled_lr(world.size), "wd": cfg.optim.wd}
        if cfg.optim.optimizer == "sgd":
            optim_params["momentum"] = cfg.optim.momentum
        self.trainer = world.make_trainer(params, cfg.optim.optimizer, optim_params,
                                          cfg.dist.fp16_allreduce)
        self.grads = [p.grad(ctx) for p in params.values() if p.grad_req != "null"]

    def step(self, inputs: np.ndarray, targets: np.ndarray, states):
        """inputs, targets (bptt, b) -> mean loss (1,), mean-gradient norm (1,),
        finite (1,) 1.0 or 0.0, states. Nothing here waits for the device."""
        states = [s.detach() for s in states]
        with autograd.record():
            loss, states = self.loss_block(to_nd(inputs, self.ctx), to_nd(targets, self.ctx),
                                           states)
        loss.backward()
        norm, finite = self.world.gradient_step(self.trainer, self.grads, self.clip,
                                                self.clip_mode, self.skip_nonfinite)
        return loss, norm, finite * mx.nd.contrib.isfinite(loss), states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


@dataclass
class Progress:
    """Where the run is: everything a checkpoint must hold besides arrays."""

    lr: float
    epoch: int = 0
    batch: int = 0                    # the next batch of this epoch
    step: int = 0                     # optimizer steps done
    best_val: float = float("inf")
    best_step: Optional[int] = None   # the checkpoint to keep when pruning
    test_loss: Optional[float] = None
    interval_steps: int = 0           # steps in the log line in progress
    interval_sums: tuple = (0.0, 0.0, 0.0, 0.0)  # its global sums (see SUMS)
    nonfinite_steps: int = 0


# The per-step values summed on the device between log lines.
SUMS = ("loss", "grad_norm", "clipped", "nonfinite")


def train(cfg: Config, world: World) -> dict:
    """Runs the whole training job on this rank; returns the run's summary on every rank."""
    cfg = run_everywhere(world, lambda: cfg.for_world(world.size), "config")
    seed_everything(cfg.run.seed)
    ctx = world.context(cfg.run.context)
    run_dir = run_everywhere(world, lambda: make_run_dir(cfg.run.run_dir, world.is_root),
                             "run-dir")
    corpus = load_corpus(cfg, world)
    vocab_json = corpus.vocab.to_json()
    resume = run_everywhere(world, lambda: find_resume_on_root(cfg, world, run_dir),
                            "resume")
    meta = world.broadcast_object(resume.meta if resume else None, name="resume.meta")
    if meta is not None:
        run_everywhere(world, lambda: check_compatible(meta, cfg, world, vocab_json),
                       "resume-check")
    run_dir.write_json("config.json", cfg.to_dict())
    run_dir.write_text("vocab.json", vocab_json)
    run_dir.write_json("run.json", {"ranks": world.size,
                                    "eval_columns": cfg.run.eval_batch_size * world.size})

    model = build_model(cfg.model, len(corpus.vocab))
    model.initialize(mx.init.Xavier(), ctx=ctx)
    stepper = Stepper(model, cfg, world, ctx)
    progress = Progress(lr=cfg.scaled_lr(world.size))
    hidden = None
    if meta is not None:
        progress, hidden = restore(resume, meta, model, stepper, world, ctx, cfg)
    world.broadcast_params(model.collect_params())
    reporter = make_reporter(world.is_root, cfg.run.run_dir, cfg.to_dict(),
                             corpus.train.num_batches, resume_step=progress.step,
                             resume_tokens=tokens_seen(progress.step, cfg, world))
    STOP.arm()
    try:
        with Watchdog(cfg.reliability.watchdog_s) as watchdog:
            return fit(cfg, world, ctx, model, stepper, corpus, run_dir, reporter, progress,
                       hidden, watchdog)
    finally:
        STOP.arm(False)
        reporter.close()


def tokens_seen(step: int, cfg: Config, world: World) -> int:
    return step * world.size * cfg.run.batch_size * cfg.run.bptt


def fit(cfg: Config, world: World, ctx: mx.Context, model, stepper: "Stepper",
        corpus: Corpus, run_dir, reporter, p: Progress, hidden, watchdog) -> dict:
    """The epochs: BPTT steps, log lines, stop agreement, validation, lr decay, saving."""
    eval_loss = hybrid_loss(model)
    params = model.collect_params()
    shard, b, bptt = corpus.train, cfg.run.batch_size, cfg.run.bptt
    rel = cfg.reliability
    max_steps = cfg.run.max_steps or cfg.run.epochs * shard.num_batches
    warmup = cfg.optim.warmup_steps
    stepper.trainer.set_learning_rate(p.lr)

    def tokens() -> int:
        return tokens_seen(p.step, cfg, world)

    def evaluate_split(split: D.ColumnShard) -> float:
        return evaluate(eval_loss, split, world, ctx, watchdog.beat)

    def save(states, sums) -> None:
        """A checkpoint of this point (all ranks take part; rank 0 writes)."""
        totals = world.allreduce_sum(sums, name="ckpt.sums").asnumpy()
        if totals[3] and rel.nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient before step {p.step}; the "
                                 f"last good checkpoint is kept")
        p.interval_sums = tuple(float(x) for x in totals) if world.is_root else (0.0,) * 4
        gathered = world.allgather_object([s.asnumpy() for s in states], name="ckpt.hidden")
        # Columns of the global batch in rank order: (L, N*b, H) per state array.
        full = [np.concatenate([g[i] for g in gathered], axis=1) for i in range(len(states))]
        meta = checkpoint_meta(p, cfg, world, corpus)
        run_everywhere(world, lambda: run_dir.save_checkpoint(
            p.step, model, stepper.trainer, full, meta, rel.keep_checkpoints, p.best_step),
            "ckpt.write")
        watchdog.beat()
        nonlocal last_save
        last_save = time.time()

    m = cfg.model
    reseed_each_step = any((m.dropout, m.weight_drop, m.drop_h, m.drop_i, m.drop_e))
    control = ControlFlags(world)
    last_save, start = time.time(), time.time()
    if cfg.run.eval_first and p.step == 0:
        reporter.baseline(p.step, tokens(), evaluate_split(corpus.valid))
    while p.epoch < cfg.run.epochs and p.step < max_steps:
        reporter.epoch_start(p.epoch, p.batch)
        epoch_start = interval_start = time.time()
        states = (hidden_for_rank(hidden, world, ctx) if hidden is not None
                  else model.begin_state(b, ctx))
        hidden = None
        # Interval sums kept on the device; read (and reduced) only on log steps.
        sums = mx.nd.array(p.interval_sums, ctx=ctx)
        epoch_steps = 0
        while p.batch < shard.num_batches and p.step < max_steps:
            if reseed_each_step:
                reseed(cfg, world, p.step)
            step_lr = p.lr * (p.step + 1) / warmup if p.step < warmup else p.lr
            if p.step < warmup:
                stepper.trainer.set_learning_rate(step_lr)
            loss, norm, finite, states = stepper.step(*shard.batch(p.batch), states)
            # A non-finite step adds nothing but its count (sums[3]).
            loss, norm = [mx.nd.where(finite, x, mx.nd.zeros_like(x)) for x in (loss, norm)]
            clipped = norm > cfg.optim.clip if cfg.optim.clip else norm * 0
            sums += mx.nd.concat(loss, norm, clipped, 1 - finite, dim=0)
            p.step, p.batch, p.interval_steps = p.step + 1, p.batch + 1, p.interval_steps + 1
            epoch_steps += 1
            reporter.advance()
            watchdog.beat()
            if cfg.dist.check_sync_interval and p.step % cfg.dist.check_sync_interval == 0:
                world.check_in_sync(params, p.step)
            if p.interval_steps == cfg.run.log_interval:
                totals = world.allreduce_sum(sums, name="train.sums").asnumpy()
                bad = int(round(totals[3] / world.size))  # every rank counts the same steps
                if bad and rel.nonfinite == "stop":
                    raise NonFiniteError(f"non-finite loss or gradient norm in steps "
                                         f"{p.step - p.interval_steps + 1}-{p.step}; the "
                                         f"last good checkpoint is kept")
                p.nonfinite_steps += bad
                # Means over the interval's finite steps and all ranks.
                means = totals / max(1, (p.interval_steps - bad) * world.size)
                elapsed = time.time() - interval_start
                samples_per_s = world.size * b * p.interval_steps / elapsed
                reporter.train(TrainStats(
                    epoch=p.epoch, batch=p.batch, num_batches=shard.num_batches,
                    step=p.step, tokens=tokens(), loss=float(means[0]),
                    grad_norm=float(means[1]), clipped=float(means[2]), lr=step_lr,
                    samples_per_s=samples_per_s, tokens_per_s=samples_per_s * bptt,
                    ranks=world.size, nonfinite_steps=p.nonfinite_steps,
                    rss_mb=world.max_over_ranks(current_rss_mb(), name="rss")))
                sums[:] = 0
                p.interval_steps, interval_start = 0, time.time()
            # Agree on stopping (a signal on any rank) and on a time-based checkpoint.
            # Flags go out every step and are read one step later, when their allreduce
            # has long finished: no stall, and every rank decides alike at the same step.
            time_due = bool(rel.checkpoint_minutes) and \
                time.time() - last_save > 60 * rel.checkpoint_minutes
            stop, due = control.exchange(STOP.signum > 0, time_due)
            if stop or due or (rel.checkpoint_steps and p.step % rel.checkpoint_steps == 0):
                save(states, sums)
                sums[:] = mx.nd.array(p.interval_sums, ctx=ctx)
            if stop:
                reporter.line(f"Stopping at step {p.step} on a signal; checkpoint written. "
                              f"Resume with --resume auto.")
                raise Preempted(f"stopped by a signal at step {p.step}, checkpoint written")
        mx.nd.waitall()
        # Stopped by --max-steps inside the epoch: the checkpoint continues mid-epoch.
        states_at_stop = states if p.batch < shard.num_batches else None
        p.interval_steps = 0  # a log interval does not run across an epoch end
        reporter.epoch_end(p.epoch, p.step, tokens(), time.time() - epoch_start,
                           world.size * b * epoch_steps / (time.time() - epoch_start))
        val = evaluate_split(corpus.valid)
        reporter.valid(p.epoch, p.step, tokens(), time.time() - epoch_start, val)
        if val < p.best_val:
            p.best_val, p.best_step = val, p.step
            p.test_loss = evaluate_split(corpus.test)
            run_dir.save_params("best.params", model)
            reporter.test(p.step, tokens(), p.test_loss)
        else:
            p.lr *= cfg.optim.lr_decay
            stepper.trainer.set_learning_rate(p.lr)
            reporter.lr_change(p.lr)
        if states_at_stop is None:
            p.epoch, p.batch = p.epoch + 1, 0
            states_at_stop = model.begin_state(b, ctx)
        save(states_at_stop, mx.nd.zeros((len(SUMS),), ctx=ctx))
    total_s = time.time() - start
    run_dir.save_params("final.params", model)
    reporter.done(p.step, tokens(), total_s, world.size * b * p.step / max(total_s, 1e-9))
    return {"steps": p.step, "best_val_loss": p.best_val, "test_loss": p.test_loss,
            "seconds": total_s, "nonfinite_steps": p.nonfinite_steps}


class ControlFlags:
    """Two flags (stop, checkpoint now) summed over ranks with a lag of one step."""

    def __init__(self, world: World):
        self.world = world
        self.pending = None

    def exchange(self, stop: bool, checkpoint: bool):
        if self.world.size == 1:  # nothing to agree on, and no NDArray to read
            return stop, checkpoint
        previous = self.pending.asnumpy() if self.pending is not None else (0, 0)
        self.pending = self.world.allreduce_sum(mx.nd.array([stop, checkpoint]),
                                                name="control")
        return bool(previous[0]), bool(previous[1])


def reseed(cfg: Config, world: World, step: int) -> None:
    """Dropout masks of a step depend only on (seed, rank, step): a resumed run draws
    exactly what an uninterrupted one does, with no generator state saved. About 1.5 ms
    per step on the development CPU, and only when the model has dropout."""
    mx.random.seed(zlib.crc32(f"{cfg.run.seed}:{world.rank}:{step}".encode()) & 0x7FFFFFFF)


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def checkpoint_meta(p: Progress, cfg: Config, world: World, corpus: Corpus) -> dict:
    return {"progress": asdict(p), "config": cfg.to_dict(),
            "vocab_sha256": text_digest(corpus.vocab.to_json()),
            "layout": {"global_columns": world.size * cfg.run.batch_size,
                       "bptt": cfg.run.bptt, "ranks": world.size,
                       "batches_per_epoch": corpus.train.num_batches},
            "rng": "mx.random.seed(crc32('seed:rank:step')) before every step"}


def find_resume_on_root(cfg: Config, world: World, run_dir) -> Optional[Checkpoint]:
    """Rank 0 looks for the checkpoint; a fresh run refuses a run dir that has some."""
    if not world.is_root:
        return None
    rel = cfg.reliability
    directory = os.path.join(cfg.run.run_dir, "checkpoints")
    if rel.resume == "none":
        if list_checkpoints(directory):
            raise UsageError(f"{directory} holds checkpoints: pass --resume auto to "
                             f"continue that run, or choose another --run-dir")
        return None
    return find_resume(rel.resume, directory, rel.resume_strict)


def check_compatible(meta: dict, cfg: Config, world: World, vocab_json: str) -> None:
    """Refuses a checkpoint that does not belong to this run's data, model and layout."""
    where = f"checkpoint at step {meta['step']}"
    if meta.get("vocab_sha256") != text_digest(vocab_json):
        raise UsageError(f"{where} was trained with a different vocabulary (other "
                         f"training data or --min-freq/--max-vocab)")
    saved_model = meta["config"]["model"]
    if saved_model != asdict(cfg.model):
        diff = sorted(k for k in saved_model if saved_model[k] != getattr(cfg.model, k))
        raise UsageError(f"{where} is of a different model (differs in {', '.join(diff)})")
    layout = meta["layout"]
    columns = world.size * cfg.run.batch_size
    if (layout["global_columns"], layout["bptt"]) != (columns, cfg.run.bptt):
        raise UsageError(f"{where} used {layout['global_columns']} global columns x bptt "
                         f"{layout['bptt']}; this run has {columns} x {cfg.run.bptt} "
                         f"(keep the global batch: --global-batch-size "
                         f"{layout['global_columns']})")


def restore(resume: Optional[Checkpoint], meta: dict, model, stepper: "Stepper",
            world: World, ctx: mx.Context, cfg: Config):
    """Loads the checkpoint on rank 0 and hands every rank its part."""
    arrays = None
    if world.is_root:
        load_params(model, resume.file("model.params"), ctx)
        arrays = {k: v.asnumpy() for k, v in mx.nd.load(resume.file("optimizer.nd")).items()
                  if k}
        hidden = mx.nd.load(resume.file("hidden.nd"))
        arrays["hidden"] = [hidden[str(i)].asnumpy() for i in range(len(hidden))]
    arrays = world.broadcast_object(arrays, name="resume.arrays")
    hidden = arrays.pop("hidden")
    restore_optimizer(stepper.trainer, {k: mx.nd.array(v) for k, v in arrays.items()},
                      meta["optimizer_counters"], ctx)
    progress = Progress(**{k: tuple(v) if k == "interval_sums" else v
                           for k, v in meta["progress"].items()})
    if not world.is_root:
        progress.interval_sums = (0.0,) * len(SUMS)
    return progress, hidden if progress.batch > 0 else None


def hidden_for_rank(full, world: World, ctx: mx.Context):
    """This rank's columns of the saved global hidden state, each (L, b, H)."""
    b = full[0].shape[1] // world.size
    return [mx.nd.array(h[:, world.rank * b:(world.rank + 1) * b], ctx=ctx) for h in full]


def load_params(model, params_file: str, ctx: mx.Context) -> None:
    try:
        model.load_parameters(params_file, ctx=ctx)
    except (mx.base.MXNetError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {params_file} into this run's model: {first}") from None


def evaluate_run(cfg: Config, world: World, params_file: str, split: str,
                 vocab, columns: int) -> float:
    """Loss of saved parameters on one split, laid out in `columns` global columns."""
    if columns % world.size:
        raise UsageError(f"{columns} evaluation columns do not split over {world.size} ranks")
    cfg.run.eval_batch_size = columns // world.size
    ctx = world.context(cfg.run.context)
    corpus = load_corpus(cfg, world, need=(split,), vocab=vocab)
    model = build_model(cfg.model, len(vocab))
    load_params(model, params_file, ctx)
    return evaluate(hybrid_loss(model), getattr(corpus, split), world, ctx)
