"""The windows an epoch trains on: fixed BPTT (the standard recipe) or variable-length BPTT
(GluonNLP's AWD-LSTM script, after Merity et al. 2018).

Both read the same column layout (text.py): a window is rows [pos, pos + n) of every
column as inputs and rows [pos + 1, pos + n + 1) as targets, each (n, b).

    fixed      window i is rows [i*bptt, (i+1)*bptt): `ColumnShard.batch(i)`; an epoch is
               (L - 1) // bptt windows and the tail is dropped; lr as scheduled.
    variable   at step s, from (seed, s) alone:
                   base = bptt with probability 0.95, else bptt / 2
                   n    = max(5, int(N(base, 5)))
               the window starts where the last one ended (the position advances by n
               tokens), the last one of the epoch is cut at the end of the columns, and
               the epoch ends when fewer than 2 rows are left, as the script's
               `while i < len(train_data) - 1 - 1`. The step's lr is scaled by n / bptt
               (the drawn n, as the script does), so a short window takes a short step.

The draw depends only on (seed, step): every rank draws the same n at the same step with
no communication, and a resumed run draws what an uninterrupted one draws. Progress keeps
the token position (`position`) and the rows trained over the run (`rows`, for token
counts); neither exists on the fixed path, whose checkpoints stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .text import ColumnShard

P_FULL = 0.95     # probability of the full bptt as the mean
SIGMA = 5.0       # standard deviation of the length, in tokens
MIN_LEN = 5
_STREAM = 0x62707474  # 'bptt': keeps these draws apart from any other use of the seed


def draw_seq_len(seed: int, step: int, bptt: int) -> int:
    """The window length of optimizer step `step` (0-based, counted over the run)."""
    rng = np.random.default_rng([seed, _STREAM, step])
    base = bptt if rng.random() < P_FULL else bptt / 2
    return max(MIN_LEN, int(rng.normal(base, SIGMA)))


def mean_seq_len(bptt: int) -> float:
    """About the mean drawn length (int() truncates: -0.5); for progress displays only."""
    return max(float(MIN_LEN), (P_FULL + (1 - P_FULL) / 2) * bptt - 0.5)


@dataclass
class Window:
    inputs: np.ndarray    # (n, b) token ids
    targets: np.ndarray   # (n, b) the next token of each
    lr_scale: float       # multiplies the step's scheduled lr

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]


class FixedWindows:
    """The standard recipe's windows: batch `p.batch` of the layout."""

    def __init__(self, shard: ColumnShard):
        self.shard = shard
        self.num_batches = shard.num_batches

    def done(self, p) -> bool:
        """True when every window of the epoch has been trained on."""
        return p.batch >= self.num_batches

    def next(self, p) -> Window:
        return Window(*self.shard.batch(p.batch), 1.0)

    def advance(self, p, window: Window) -> None:
        p.batch += 1

    def rows(self, p) -> int:
        """Rows (tokens per column) trained on over the run."""
        return p.step * self.shard.bptt

    def start_epoch(self, p) -> None:
        p.batch = 0


class VariableWindows:
    """Variable-length BPTT windows from the token position `p.position`."""

    def __init__(self, shard: ColumnShard, bptt: int, seed: int):
        self.shard, self.bptt, self.seed = shard, bptt, seed
        self.limit = shard.length - 2  # a window needs at least 2 rows
        # Windows per epoch, about (the draws decide): for the progress display.
        self.num_batches = max(1, round(self.limit / mean_seq_len(bptt)))

    def done(self, p) -> bool:
        return p.position >= self.limit

    def next(self, p) -> Window:
        n = draw_seq_len(self.seed, p.step, self.bptt)
        return Window(*self.shard.slice(p.position, n), n / self.bptt)

    def advance(self, p, window: Window) -> None:
        p.batch += 1
        p.position += window.rows
        p.rows += window.rows

    def rows(self, p) -> int:
        return p.rows

    def start_epoch(self, p) -> None:
        p.batch, p.position = 0, 0


def make_windows(shard: ColumnShard, variable: bool, bptt: int, seed: int, progress):
    """The windows of the run; variable ones give `progress` its position and row count
    (kept as restored from a checkpoint)."""
    if not variable:
        return FixedWindows(shard)
    progress.position = progress.position or 0
    progress.rows = progress.rows or 0
    return VariableWindows(shard, bptt, seed)
