"""Training and evaluation: the reference notebook's recipe, on any number of ranks.

The loop reads top to bottom: data -> model -> trainer -> epochs of BPTT steps, with a
validation pass per epoch, lr decay on plateau, and the best parameters kept. Nothing in
it depends on the rank: rank-0 work goes through the reporter and run-directory objects
chosen once in `train`, and every collective goes through the `World`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd

from . import data as D
from .config import Config
from .dist import World, run_everywhere
from .errors import UsageError
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
             ctx: mx.Context) -> float:
    """Mean token loss over the split's columns on all ranks (hidden state carried)."""
    states = loss_block.model.begin_state(shard.ids.shape[1], ctx)
    total = mx.nd.zeros((1,), ctx=ctx)
    for inputs, targets in shard:
        loss, states = loss_block(to_nd(inputs, ctx), to_nd(targets, ctx), states)
        total += loss
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
        params = model.collect_params()
        optim_params = {"learning_rate": cfg.scaled_lr(world.size), "wd": cfg.optim.wd}
        if cfg.optim.optimizer == "sgd":
            optim_params["momentum"] = cfg.optim.momentum
        self.trainer = world.make_trainer(params, cfg.optim.optimizer, optim_params,
                                          cfg.dist.fp16_allreduce)
        self.grads = [p.grad(ctx) for p in params.values() if p.grad_req != "null"]

    def step(self, inputs: np.ndarray, targets: np.ndarray, states):
        """inputs, targets (bptt, b) -> mean loss (1,), mean-gradient norm (1,), states.
        Nothing here waits for the device."""
        states = [s.detach() for s in states]
        with autograd.record():
            loss, states = self.loss_block(to_nd(inputs, self.ctx), to_nd(targets, self.ctx),
                                           states)
        loss.backward()
        norm = self.world.gradient_step(self.trainer, self.grads, self.clip, self.clip_mode)
        return loss, norm, states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def train(cfg: Config, world: World) -> dict:
    """Runs the whole training job on this rank; returns the run's summary on every rank."""
    cfg = run_everywhere(world, lambda: cfg.for_world(world.size), "config")
    seed_everything(cfg.run.seed)
    ctx = world.context(cfg.run.context)
    run_dir = run_everywhere(world, lambda: make_run_dir(cfg.run.run_dir, world.is_root),
                             "run-dir")
    corpus = load_corpus(cfg, world)
    run_dir.write_json("config.json", cfg.to_dict())
    run_dir.write_text("vocab.json", corpus.vocab.to_json())
    run_dir.write_json("run.json", {"ranks": world.size,
                                    "eval_columns": cfg.run.eval_batch_size * world.size})

    model = build_model(cfg.model, len(corpus.vocab))
    model.initialize(mx.init.Xavier(), ctx=ctx)
    world.broadcast_params(model.collect_params())
    # Dropout masks differ per rank, as they would across the columns of one big batch.
    mx.random.seed(cfg.run.seed + world.rank)
    reporter = make_reporter(world.is_root, cfg.run.run_dir, cfg.to_dict(),
                             corpus.train.num_batches)
    try:
        return fit(cfg, world, ctx, model, corpus, run_dir, reporter)
    finally:
        reporter.close()


def fit(cfg: Config, world: World, ctx: mx.Context, model, corpus: Corpus, run_dir,
        reporter) -> dict:
    """The epochs: BPTT steps, log lines, validation, lr decay on plateau, saving."""
    stepper = Stepper(model, cfg, world, ctx)
    eval_loss = hybrid_loss(model)
    params = model.collect_params()
    shard, b, bptt = corpus.train, cfg.run.batch_size, cfg.run.bptt
    max_steps = cfg.run.max_steps or cfg.run.epochs * shard.num_batches
    lr, best_val, test_loss, step = cfg.scaled_lr(world.size), float("inf"), None, 0
    warmup = cfg.optim.warmup_steps

    def tokens() -> int:  # training tokens seen by all ranks
        return step * world.size * b * bptt

    start = time.time()
    if cfg.run.eval_first:
        reporter.baseline(step, tokens(), evaluate(eval_loss, corpus.valid, world, ctx))
    for epoch in range(cfg.run.epochs):
        if step >= max_steps:
            break
        reporter.epoch_start(epoch)
        epoch_start = interval_start = time.time()
        states = model.begin_state(b, ctx)
        # Interval sums kept on the device; read (and reduced) only on log steps.
        sums = mx.nd.zeros((3,), ctx=ctx)  # loss, grad norm, clipped steps
        interval_steps, epoch_steps = 0, 0
        for i in range(shard.num_batches):
            if step >= max_steps:
                break
            step_lr = lr * min(1.0, (step + 1) / warmup) if step < warmup else lr
            if step < warmup:
                stepper.trainer.set_learning_rate(step_lr)
            loss, norm, states = stepper.step(*shard.batch(i), states)
            clipped = norm > cfg.optim.clip if cfg.optim.clip else norm * 0
            sums += mx.nd.concat(loss, norm, clipped, dim=0)
            step, interval_steps, epoch_steps = step + 1, interval_steps + 1, epoch_steps + 1
            reporter.advance()
            if cfg.dist.check_sync_interval and step % cfg.dist.check_sync_interval == 0:
                world.check_in_sync(params, step)
            if interval_steps == cfg.run.log_interval:
                totals = world.allreduce_sum(sums, name="train.sums").asnumpy()
                totals /= interval_steps * world.size   # means over steps and ranks
                elapsed = time.time() - interval_start
                samples_per_s = world.size * b * interval_steps / elapsed
                reporter.train(TrainStats(
                    epoch=epoch, batch=i + 1, num_batches=shard.num_batches, step=step,
                    tokens=tokens(), loss=float(totals[0]), grad_norm=float(totals[1]),
                    clipped=float(totals[2]), lr=step_lr, samples_per_s=samples_per_s,
                    tokens_per_s=samples_per_s * bptt, ranks=world.size))
                sums[:] = 0
                interval_steps, interval_start = 0, time.time()
        mx.nd.waitall()
        reporter.epoch_end(epoch, step, tokens(), time.time() - epoch_start,
                           world.size * b * epoch_steps / (time.time() - epoch_start))

        val = evaluate(eval_loss, corpus.valid, world, ctx)
        reporter.valid(epoch, step, tokens(), time.time() - epoch_start, val)
        if val < best_val:
            best_val = val
            test_loss = evaluate(eval_loss, corpus.test, world, ctx)
            run_dir.save_params("best.params", model)
            reporter.test(step, tokens(), test_loss)
        else:
            lr *= cfg.optim.lr_decay
            stepper.trainer.set_learning_rate(lr)
            reporter.lr_change(lr)
    total_s = time.time() - start
    run_dir.save_params("final.params", model)
    reporter.done(step, tokens(), total_s, world.size * b * step / total_s)
    return {"steps": step, "best_val_loss": best_val, "test_loss": test_loss,
            "seconds": total_s}


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

