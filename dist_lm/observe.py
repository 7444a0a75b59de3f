"""What a run tells people: console lines in the reference notebook's format.

`make_reporter` is called once at start-up: rank 0 gets a `Reporter`, every other rank a
`QuietReporter` with the same methods that does nothing, so the training loop never asks
which rank it is. Every value handed in is already global (reduced over ranks).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional, TextIO


@dataclass
class TrainStats:
    """One log interval, global over ranks."""

    epoch: int
    batch: int             # batches done in this epoch
    num_batches: int       # batches per epoch
    step: int              # optimizer steps done in all
    loss: float            # mean token loss over the interval
    lr: float
    grad_norm: float       # mean over the interval of the mean gradient's norm
    clipped: float         # fraction of the interval's steps that were clipped
    samples_per_s: float   # a sample is one column of bptt tokens
    tokens_per_s: float
    ranks: int


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Reporter:
    def __init__(self, stream: Optional[TextIO] = None):
        self.out = stream or sys.stdout

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def train(self, s: TrainStats) -> None:
        self.line(f"[Epoch {s.epoch} Batch {s.batch}/{s.num_batches}] loss {s.loss:.2f}, "
                  f"ppl {ppl(s.loss):.2f}, throughput {s.samples_per_s:.2f} samples/s")

    def epoch_end(self, epoch: int, samples_per_s: float) -> None:
        self.line(f"[Epoch {epoch}] throughput {samples_per_s:.2f} samples/s")

    def valid(self, epoch: int, seconds: float, loss: float) -> None:
        self.line(f"[Epoch {epoch}] time cost {seconds:.2f}s, valid loss {loss:.2f}, "
                  f"valid ppl {ppl(loss):.2f}")

    def baseline(self, loss: float) -> None:
        self.line(f"[Start] valid loss {loss:.2f}, valid ppl {ppl(loss):.2f}")

    def test(self, loss: float) -> None:
        self.line(f"test loss {loss:.2f}, test ppl {ppl(loss):.2f}")

    def lr_change(self, lr: float) -> None:
        self.line(f"Learning rate now {lr:f}")

    def done(self, samples_per_s: float) -> None:
        self.line(f"Total training throughput {samples_per_s:.2f} samples/s")

    def close(self) -> None:
        self.out.flush()


class QuietReporter(Reporter):
    """The reporter of ranks other than 0: same methods, no output."""

    def __init__(self) -> None:
        super().__init__(stream=sys.stdout)

    def line(self, text: str) -> None:
        pass


def make_reporter(is_root: bool) -> Reporter:
    return Reporter() if is_root else QuietReporter()
