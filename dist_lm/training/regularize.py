"""Activation regularization of the AWD-LSTM recipe (Merity et al. 2017, "Revisiting
Activation Regularization for Language RNNs"), as GluonNLP 0.10 defines it:

    AR  = alpha * mean(d ** 2)                       d: the last layer's output after
                                                        the output dropout, (T, B, H)
    TAR = beta * mean((h[1:] - h[:-1]) ** 2)         h: the same output before it

(`gluonnlp.loss.ActivationRegularizationLoss` and `TemporalActivationRegularizationLoss`
applied, as GluonNLP's word_language_model.py applies them, to the last element of
`encoded_dropped` and of `encoded_raw`.) The means run over every element of a rank's
(T, b_r, H), so the term of the global batch is the mean of the ranks' terms weighted by
b_r / G: the weight w_r = b_r N / G each rank's objective is scaled by before backward
(dist.py) makes N ranks take the step one process with G columns takes, and the log
sums the terms with the same weights.

The training objective is CE + AR + TAR; perplexity means exp(CE), so the loss block
returns the plain cross-entropy and the two terms besides the objective, and the log
interval keeps their sums (`TermSums`) apart from the meter's cross-entropy.
"""

from __future__ import annotations

from typing import Optional

import mxnet as mx
from mxnet.gluon import HybridBlock

from .meter import rescaled


def activation_reg(F, dropped, alpha: float):
    """alpha * mean(dropped ** 2), (1,); dropped (T, B, H)."""
    return alpha * F.mean(F.square(dropped)).reshape((1,))


def temporal_activation_reg(F, raw, beta: float):
    """beta * mean((raw[t+1] - raw[t]) ** 2) over t < T - 1, (1,); raw (T, B, H), T >= 2."""
    step = F.slice_axis(raw, axis=0, begin=1, end=None) - \
        F.slice_axis(raw, axis=0, begin=0, end=-1)                      # (T-1, B, H)
    return beta * F.mean(F.square(step)).reshape((1,))


class RegularizedTokenLoss(HybridBlock):
    """CE + AR + TAR of a language model over a (T, B) batch, in one hybridized graph.

    Returns the objective (1,) (what backward runs on), the mean cross-entropy (1,), the
    terms [AR, TAR] (2,) and the new states. Any T >= 2: a new T re-plans the graph's
    memory (no new graph), see docs/awd.md for what that costs.
    """

    def __init__(self, model, alpha: float, beta: float, **kwargs):
        super().__init__(**kwargs)
        self._alpha, self._beta = alpha, beta
        with self.name_scope():
            self.model = model
        self._ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()

    def hybrid_forward(self, F, inputs, targets, states, *masks):
        masks = self.model.masks_by_site(masks)  # the activation masks, as TokenLoss's
        raw, states = self.model.encode(F, inputs, states, masks)         # (T, B, H)
        dropped = self.model.drop_output(F, raw, masks)                   # (T, B, H)
        logits = self.model.decoder(dropped)                              # (T, B, V)
        ce = self._ce(logits.reshape((-3, -1)), targets.reshape((-1,))).mean()  # (1,)
        terms = F.concat(activation_reg(F, dropped, self._alpha),
                         temporal_activation_reg(F, raw, self._beta), dim=0)  # (2,)
        return ce + terms.sum(), ce, terms, states


def regularized_loss(model, alpha: float, beta: float) -> RegularizedTokenLoss:
    block = RegularizedTokenLoss(model, alpha, beta)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


class TermSums:
    """The AR and TAR terms of the log interval in progress, summed on the device like
    the meter's sums (meter.py) and read only when the meter's interval closes; a step
    that was not finite adds nothing. A checkpoint part: the sums reduced over ranks."""

    def __init__(self, world, ctx: mx.Context, weight: float = 1.0):
        """weight: this rank's w_r = b_r N / G, as the meter's (meter.py)."""
        self.world, self.ctx, self.weight = world, ctx, weight
        self.sums = mx.nd.zeros((3,), ctx=ctx)  # AR, TAR, finite steps; this rank's share

    def add(self, terms: mx.nd.NDArray, finite: mx.nd.NDArray) -> None:
        """terms (2,) [AR, TAR], finite (1,) 1.0 or 0.0; no host read."""
        terms = mx.nd.where(finite.broadcast_to((2,)), terms, mx.nd.zeros_like(terms))
        values = mx.nd.concat(terms, finite, dim=0)  # (3,)
        self.sums += values * self.weight if self.weight != 1.0 else values

    def _totals(self):
        return self.world.allreduce_sum(self.sums, name="terms.sums").asnumpy()

    def close(self) -> dict:
        """The interval's means over its finite steps (an allreduce), and a new interval."""
        ar, tar, steps = self._totals()
        self.sums[:] = 0
        steps = max(steps, 1.0)
        return {"ar": float(ar / steps), "tar": float(tar / steps)}

    def state_dict(self) -> dict:
        """Every rank must call this (a reduction over ranks)."""
        return {"sums": [float(x) for x in self._totals()]}

    def load_state_dict(self, state: dict, ranks: Optional[int] = None) -> None:
        """ranks: the rank count that saved the state (default: this one's)."""
        share = rescaled(state["sums"], ranks, self.world.size) if self.world.is_root \
            else [0.0] * 3
        self.sums = mx.nd.array(share, ctx=self.ctx)


class NoTerms:
    """Stands in for TermSums when the objective has no regularization: does nothing."""

    def add(self, terms, finite) -> None:
        pass

    def close(self) -> dict:
        return {}

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict, ranks: Optional[int] = None) -> None:
        pass


def make_terms(alpha: float, beta: float, world, ctx: mx.Context, weight: float = 1.0):
    return TermSums(world, ctx, weight) if alpha or beta else NoTerms()
