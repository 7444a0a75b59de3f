"""The learning-rate schedule: one object, whose whole state a checkpoint holds.

    lr(step) = base * (step + 1) / warmup        for step < warmup (linear warm-up)
             = base * decay ** k                  afterwards

`base` is `--lr` after `--lr-scaling`; k counts the validations that did not improve on
the best validation loss so far (the reference recipe's "lr x0.25 when validation stops
improving"). With `interval` (--lr-update-interval, GluonNLP's AWD script) the rate is
instead multiplied by `factor` after every `interval` validations in a row without
improvement (the count restarts at an improvement and after each decay). The decision is
taken from the validation loss reduced over all ranks, so every rank holds the same
schedule. No MXNet here: the loop hands `lr(step)` to the trainer (times the window's
length / bptt under variable-length BPTT, bptt.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class LRSchedule:
    base: float                     # after --lr-scaling
    warmup_steps: int = 0
    decay: float = 0.25
    current: float = math.nan       # base * decay ** (validations without improvement)
    best_val: float = math.inf      # the plateau state
    interval: Optional[int] = None  # decay by `factor` after this many stale validations
    factor: float = 0.1
    stale: int = 0                  # validations since the best, or the last decay

    def __post_init__(self) -> None:
        if math.isnan(self.current):
            self.current = self.base

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based, counted over the run)."""
        if step < self.warmup_steps:
            return self.current * (step + 1) / self.warmup_steps
        return self.current

    def observe(self, val_loss: float) -> bool:
        """Takes an epoch's validation loss; True when it improves on the best (the
        caller keeps those parameters), otherwise the rate decays (at once, or on the
        `interval`-th such validation in a row)."""
        if val_loss < self.best_val:
            self.best_val, self.stale = val_loss, 0
            return True
        if self.interval is None:
            self.current *= self.decay
            return False
        self.stale += 1
        if self.stale == self.interval:
            self.current *= self.factor
            self.stale = 0
        return False

    def state_dict(self) -> dict:
        state = asdict(self)
        if self.interval is None:  # a plateau schedule saves what it always saved
            for key in ("interval", "factor", "stale"):
                del state[key]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Takes a checkpoint's schedule whole: its rate and plateau state win over the
        flags of the resumed run."""
        for key, value in state.items():
            setattr(self, key, value)
