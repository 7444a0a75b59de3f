"""One optimizer step of the training recipe, and the randomness it draws."""

from __future__ import annotations

import random
import zlib
from typing import Optional

import mxnet as mx
import numpy as np
from mxnet import autograd

from .config import Config
from .dist import World
from .model import TokenLoss


def to_nd(array: np.ndarray, ctx: mx.Context) -> mx.nd.NDArray:
    return mx.nd.array(array, ctx=ctx, dtype=np.float32)


def hybrid_loss(model) -> TokenLoss:
    """The model and its loss in one hybridized graph of fixed shapes (one per layout)."""
    block = TokenLoss(model)
    block.hybridize(static_alloc=True, static_shape=True)
    return block


class Stepper:
    """Forward, backward, allreduce, clip, update: its own hybridized graph (training
    shapes) over the model's parameters."""

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

    def step(self, inputs: np.ndarray, targets: np.ndarray, states,
             lr: Optional[float] = None):
        """inputs, targets (bptt, b) -> mean loss (1,), mean-gradient norm (1,),
        finite (1,) 1.0 or 0.0, states; lr: this step's learning rate (default: as it is).
        Nothing here waits for the device (except under --nonfinite skip, see
        World.gradient_step)."""
        if lr is not None:
            self.trainer.set_learning_rate(lr)
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


def reseed(seed: int, rank: int, step: int) -> None:
    """Dropout masks of a step depend only on (seed, rank, step): a resumed run draws
    exactly what an uninterrupted one does, with no generator state saved. About 1.5 ms
    per step on the development CPU, and only when the model has dropout."""
    mx.random.seed(zlib.crc32(f"{seed}:{rank}:{step}".encode()) & 0x7FFFFFFF)
