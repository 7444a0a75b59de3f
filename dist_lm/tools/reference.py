"""The reference notebook's training step, kept as the baseline the benchmark measures.

It is the recipe as the notebook runs it on one device: GluonNLP's zoo `StandardRNN`
called imperatively, the loss read back with `.asscalar()` after every batch, and
`gluon.utils.clip_global_norm` (which checks the norm for NaN on the host, a device sync)
on the local gradient before `trainer.step(1)`.
"""

from __future__ import annotations

import gluonnlp as nlp
import mxnet as mx
from mxnet import autograd, gluon


class ReferenceStepper:
    def __init__(self, model_name: str, vocab, lr: float, clip: float, ctx: mx.Context,
                 dropout: float = None):
        kwargs = {} if dropout is None else {"dropout": dropout}
        self.model, _ = nlp.model.get_model(model_name, vocab=vocab, dataset_name=None,
                                            **kwargs)
        self.model.initialize(mx.init.Xavier(), ctx=ctx)
        self.params = list(self.model.collect_params().values())
        self.trainer = gluon.Trainer(self.model.collect_params(), "sgd",
                                     {"learning_rate": lr, "momentum": 0, "wd": 0})
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self.clip, self.ctx = clip, ctx

    def begin_state(self, batch_size: int):
        return self.model.begin_state(batch_size, func=mx.nd.zeros, ctx=self.ctx)

    def step(self, inputs, targets, hidden):
        """inputs, targets (bptt, b) NDArrays -> (loss as a Python float, hidden)."""
        hidden = [h.detach() for h in hidden]
        with autograd.record():
            output, hidden = self.model(inputs, hidden)
            loss = self.loss(output.reshape(-3, -1), targets.reshape(-1,))
            loss = loss.sum() / inputs.size
        loss.backward()
        gluon.utils.clip_global_norm([p.grad(self.ctx) for p in self.params], self.clip)
        self.trainer.step(1)
        return loss.asscalar(), hidden
