"""One optimizer step of the training recipe, and the randomness it draws."""

from __future__ import annotations

import random
import zlib
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd

from ..config import Config
from ..data.text import column_range
from ..model import SampledTokenLoss, TokenLoss
from ..runtime.dist import World
from .masks import ColumnMasks
from .regularize import regularized_loss
from .sampling import LogUniformSampler, check_num_sampled


def to_nd(array: np.ndarray, ctx: mx.Context) -> mx.nd.NDArray:
    return mx.nd.array(array, ctx=ctx, dtype=np.float32)


def hybrid_loss(model) -> TokenLoss:
    """The model and its loss in one hybridized graph of fixed shapes (one per layout)."""
    block = TokenLoss(model)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


def sampler_for(cfg: Config, vocab_size: int) -> Optional[LogUniformSampler]:
    """The candidate sampler of --sampled-softmax K, or None for the full softmax."""
    k = cfg.optim.sampled_softmax
    if k is None:
        return None
    check_num_sampled(k, vocab_size)
    return LogUniformSampler(vocab_size, k, cfg.run.seed)


class Stepper:
    """Forward, backward, allreduce, clip, update: its own hybridized graph (training
    shapes) over the model's parameters."""

    def __init__(self, model, cfg: Config, world: World, ctx: mx.Context,
                 weight: float = 1.0):
        """weight: this rank's w_r = b_r N / G, its b_r of the G global columns (1 when
        the ranks hold equal shares): the objective is scaled by it before backward, so
        the mean over the ranks of their gradients is the global batch's (dist.py)."""
        decoder = model.decoder[0]
        self.sampler = sampler_for(cfg, decoder.weight.shape[0])
        # With AR/TAR the block also returns the objective and the terms [AR, TAR] (2,):
        # backward runs on the objective, the meter takes the cross-entropy, and `terms`
        # holds the last step's terms for the log (regularize.py).
        self.regularized = bool(cfg.optim.alpha or cfg.optim.beta)
        self.terms: Optional[mx.nd.NDArray] = None
        if self.regularized:
            self.loss_block = regularized_loss(model, cfg.optim.alpha, cfg.optim.beta)
        elif self.sampler is None:
            self.loss_block = hybrid_loss(model)
        else:
            self.loss_block = SampledTokenLoss(model, self.sampler.num_sampled)
            self.loss_block.hybridize(static_alloc=True, static_shape=True)
        self.world, self.ctx, self.weight = world, ctx, weight
        # The activation masks of this rank's columns of the global batch (masks.py), and
        # whether the weight-level ones need the generator seeded (reseed).
        first = column_range(cfg.global_columns(world.size), world.rank, world.size).start
        self.masks = ColumnMasks(model.mask_sites(), cfg.run.seed, first)
        self.seed = cfg.run.seed
        self.weight_masks = bool(cfg.model.weight_drop or cfg.model.drop_e)
        # d(w_r objective)/d(objective), the head gradient of backward, (1,).
        self._head = mx.nd.full((1,), weight, ctx=ctx) if weight != 1.0 else None
        self.clip, self.clip_mode = cfg.optim.clip, cfg.optim.clip_mode
        self.skip_nonfinite = cfg.reliability.nonfinite == "skip"
        params = model.collect_params()
        optim_params = {"learning_rate": cfg.scaled_lr(world.size), "wd": cfg.optim.wd}
        if cfg.optim.optimizer == "sgd":
            optim_params["momentum"] = cfg.optim.momentum
        else:
            optim_params.update(beta1=cfg.optim.adam_beta1, epsilon=cfg.optim.adam_epsilon)
        # Every parameter with a row per word: the embedding, the decoder (tied: one).
        row_params = {model.embedding[0].weight.name, decoder.weight.name,
                      decoder.bias.name} if cfg.dist.exchange == "rows" else ()
        self.trainer = world.make_trainer(params, cfg.optim.optimizer, optim_params,
                                          cfg.dist.fp16_allreduce, row_params)
        self.grads = [p.grad(ctx) for p in params.values() if p.grad_req != "null"]
        self._in_flight: Optional[mx.nd.NDArray] = None  # the previous step's loss

    def step(self, inputs: np.ndarray, targets: np.ndarray, states,
             lr: Optional[float] = None, step: Optional[int] = None):
        """inputs, targets (T, b) -> mean cross-entropy (1,), mean-gradient norm (1,),
        finite (1,) 1.0 or 0.0, states; lr: this step's learning rate (default: as it is);
        step: the optimizer step this is; dropout masks and the sampled softmax's
        candidates are drawn from it, so it is required there (a default would draw the
        same ones every step).
        With AR/TAR the gradient is the objective's, and `self.terms` its [AR, TAR] (2,).
        The host stays within two steps of the device: before returning, a step waits
        for the previous step's forward pass (what is still queued keeps the device
        busy), so a stop, a checkpoint or the watchdog sees the device where the host is.
        Unbounded, MXNet's engine queue grows for a whole log interval (200 steps) when
        the device is the slower side, and a SIGTERM's checkpoint waits for all of them.
        Otherwise nothing waits for the device (except under --nonfinite skip, see
        World.gradient_step, and --exchange rows, which reads the ranks' row ids)."""
        if lr is not None:
            self.trainer.set_learning_rate(lr)
        states = [s.detach() for s in states]
        args = [to_nd(inputs, self.ctx), to_nd(targets, self.ctx), states]
        rows = None
        if step is None and (self.sampler is not None or self.masks or self.weight_masks):
            raise ValueError("Stepper.step: dropout and the sampled softmax need the step "
                             "number")
        if self.weight_masks:
            reseed(self.seed, step)
        if self.sampler is not None:
            drawn = self.sampler.draw(step)
            # candidates (K,), log expected counts of the targets (bptt, b) and of the
            # candidates (K,); ids stay exact in float32 (V < 2^24).
            args += [to_nd(drawn.ids, self.ctx),
                     to_nd(self.sampler.log_expected(targets, drawn.num_tries), self.ctx),
                     to_nd(drawn.log_expected, self.ctx)]
            rows = np.unique(np.concatenate([inputs.ravel(), targets.ravel(), drawn.ids]))
        # After the loss block's own inputs: each (T, b, W) or (1, b, W), in site order.
        args += self.mask_inputs(step, *inputs.shape) if self.masks else []
        with autograd.record():
            if self.regularized:  # loss: the cross-entropy alone
                objective, loss, self.terms, states = self.loss_block(*args)
            else:
                loss, states = self.loss_block(*args)
                objective = loss
        objective.backward(self._head)  # the gradient of w_r x objective
        norm, finite = self.world.gradient_step(self.trainer, self.grads, self.clip,
                                                self.clip_mode, self.skip_nonfinite, rows,
                                                self.weight)
        if self._in_flight is not None:
            self._in_flight.wait_to_read()
        self._in_flight = loss
        return loss, norm, finite * mx.nd.contrib.isfinite(objective), states

    def mask_inputs(self, step: int, steps: int, columns: int):
        """This rank's activation masks of optimizer step `step` on the device, drawn on
        the host (masks.py), in site order: each (steps, b, W) or (1, b, W). Its own method,
        so that `dist-lm bench-profile` can time the host's part of the dropout."""
        return [to_nd(mask, self.ctx) for mask in self.masks.draw(step, steps, columns)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def reseed(seed: int, step: int) -> None:
    """Weight-level dropout masks (drop_e, weight_drop) of a step depend only on
    (seed, step): every rank draws the one mask one process draws, and a resumed run
    draws what an uninterrupted one does, with no generator state saved. Activation
    masks do not use the generator (masks.py)."""
    mx.random.seed(zlib.crc32(f"{seed}:{step}".encode()) & 0x7FFFFFFF)
