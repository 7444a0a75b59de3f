"""Evaluation: the mean token loss of a model over a split, in one global layout.

The split's `total` global columns are divided over the ranks (`corpus.load_corpus`);
each rank sums the token losses of its columns in float64 on the device, and one
allreduce at the end gives the mean over all tokens, so 1 rank and N ranks report the
same perplexity for the same layout. A rank that holds no columns (fewer columns than
ranks) still walks the batches, so collectives stay in step.
"""

from __future__ import annotations

from typing import Callable

import mxnet as mx

from ..data import text as D
from ..runtime.dist import World
from .stepper import hybrid_loss, to_nd


class Evaluator:
    def __init__(self, model, shard: D.ColumnShard, total_columns: int, world: World,
                 ctx: mx.Context):
        self.model, self.shard, self.total = model, shard, total_columns
        self.world, self.ctx = world, ctx
        self.columns = shard.columns
        self.block = hybrid_loss(model) if self.columns else None

    def loss(self, each_batch: Callable[[], None] = lambda: None) -> float:
        """Mean token loss, hidden state carried across batches; each_batch() runs after
        every batch on every rank (watchdog beat, stop agreement)."""
        tokens_per_batch = self.columns * self.shard.bptt
        total = mx.nd.zeros((1,), ctx=self.ctx, dtype="float64")
        states = self.model.begin_state(self.columns, self.ctx) if self.columns else None
        for inputs, targets in self.shard:  # each (bptt, columns)
            if self.block is not None:
                loss, states = self.block(to_nd(inputs, self.ctx), to_nd(targets, self.ctx),
                                          states)
                total += loss.astype("float64") * tokens_per_batch
            each_batch()
        total = self.world.allreduce_sum(total, name="eval.loss")
        return float(total.asscalar()) / (self.total * self.shard.bptt * self.shard.num_batches)


def evaluate_run(cfg, world: World, params_file: str, split: str, vocab,
                 columns: int) -> float:
    """Loss of saved parameters on one split, laid out in `columns` global columns."""
    from .checkpoint import load_params
    from ..data.corpus import load_corpus
    from ..model import build_model

    cfg.run.eval_batch_size = cfg.run.test_batch_size = columns
    ctx = world.context(cfg.run.context)
    corpus = load_corpus(cfg, world, need=(split,), vocab=vocab,
                         fixes={split: "a smaller --columns"})
    model = build_model(cfg.model, len(vocab))
    load_params(model, params_file, ctx)
    return Evaluator(model, getattr(corpus, split), columns, world, ctx).loss()
