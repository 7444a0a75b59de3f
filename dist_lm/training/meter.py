"""The training statistics of the log interval in progress, kept on the device.

Every step adds its loss, gradient norm, whether it was clipped and whether it was
non-finite to four sums on the device (no host read). They are reduced over the ranks
and read only when something needs them: a log line, the end of an epoch, a checkpoint.
Each read also applies the non-finite policy, so no step reaches a checkpoint, a
validation or the end of the run unchecked.

Each rank's loss is the mean over its own b_r of the G global columns, and the ranks may
hold different numbers of them (`data.text.column_range`), so a rank adds its values
times its weight w_r = b_r N / G (1 with equal shards, the weight its gradient gets,
dist.py): the sums over the N ranks are N x the global batch's values (its mean token
loss), whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import time

import mxnet as mx
import numpy as np

from ..errors import NonFiniteError

SUMS = ("loss", "grad_norm", "clipped", "nonfinite")


@dataclass
class Interval:
    """A closed log interval, global over ranks."""

    steps: int
    seconds: float       # wall time of the steps this process timed
    # Those steps: fewer than `steps` in the first interval after a resume, whose
    # earlier steps ran in another process.
    timed_steps: int
    loss: float          # mean over the interval's finite steps
    grad_norm: float
    clipped: float       # fraction of the finite steps whose norm exceeded --clip


class IntervalMeter:
    def __init__(self, world, ctx: mx.Context, clip: float, nonfinite: str,
                 weight: float = 1.0):
        """weight: this rank's w_r = b_r N / G (module docstring)."""
        self.world, self.ctx, self.clip, self.policy = world, ctx, clip, nonfinite
        self.weight = weight
        self.sums = mx.nd.zeros((len(SUMS),), ctx=ctx)  # this rank's share, (4,)
        self.steps = 0               # steps in the interval so far
        self.first_step = 1          # the global step the interval began with
        self.nonfinite_steps = 0     # skipped for NaN/Inf over the run (closed intervals)
        self.started, self.timed_steps = time.time(), 0

    def add(self, loss: mx.nd.NDArray, norm: mx.nd.NDArray, finite: mx.nd.NDArray) -> None:
        """loss, norm, finite: (1,) on the device; a non-finite step adds only its count."""
        loss, norm = [mx.nd.where(finite, x, mx.nd.zeros_like(x)) for x in (loss, norm)]
        clipped = norm > self.clip if self.clip else norm * 0
        values = mx.nd.concat(loss, norm, clipped, 1 - finite, dim=0)  # (4,)
        self.sums += values * self.weight if self.weight != 1.0 else values
        self.steps += 1
        self.timed_steps += 1

    def _totals(self) -> np.ndarray:
        """The interval's sums over all ranks (a device sync and an allreduce); raises
        NonFiniteError under --nonfinite stop if any step was not finite."""
        totals = self.world.allreduce_sum(self.sums, name="meter.sums").asnumpy()
        if totals[3] and self.policy == "stop":
            last = self.first_step + self.steps - 1
            raise NonFiniteError(f"non-finite loss or gradient norm in steps "
                                 f"{self.first_step}-{last}; the last good checkpoint is "
                                 f"kept")
        return totals

    def close(self) -> Interval:
        """Ends the interval (a log line or an epoch end) and returns its means."""
        totals = self._totals()
        bad = int(round(totals[3] / self.world.size))  # every rank counts the same steps
        good = max(1, (self.steps - bad) * self.world.size)
        interval = Interval(self.steps, time.time() - self.started, self.timed_steps,
                            float(totals[0] / good),
                            float(totals[1] / good), float(totals[2] / good))
        self.nonfinite_steps += bad
        self.first_step += self.steps
        self.sums[:] = 0
        self.steps, self.started, self.timed_steps = 0, time.time(), 0
        return interval

    def restart_clock(self) -> None:
        """Times the open interval from now: what ran since it began (an epoch end's
        evaluation and checkpoint) was not training, and must not lower its throughput."""
        self.started = time.time()

    # --- checkpoint part ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """The interval so far, reduced over ranks (every rank must call this): N x the
        global values, N the rank count of the layout the checkpoint records."""
        return {"steps": self.steps, "first_step": self.first_step,
                "sums": [float(x) for x in self._totals()],
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict, ranks: Optional[int] = None) -> None:
        """ranks: the rank count that saved the state (default: this one's)."""
        self.steps, self.first_step = state["steps"], state["first_step"]
        self.nonfinite_steps = state["nonfinite_steps"]
        # The saved sums are global: rank 0 carries them, so the next reduction over the
        # ranks gives them back, exactly at the same rank count, and at another one
        # rescaled from that count's N x to this one's.
        share = rescaled(state["sums"], ranks, self.world.size) if self.world.is_root \
            else [0.0] * len(SUMS)
        self.sums = mx.nd.array(share, ctx=self.ctx)


def rescaled(sums: List[float], saved_ranks: Optional[int], ranks: int) -> List[float]:
    """Sums of N x the global values saved at `saved_ranks` ranks, for `ranks` ranks."""
    if saved_ranks is None or saved_ranks == ranks:
        return list(sums)
    return [x * ranks / saved_ranks for x in sums]
