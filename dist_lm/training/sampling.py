"""Candidate sampling for the sampled softmax (`--sampled-softmax K`).

The log-uniform (Zipfian) sampler of TensorFlow's `log_uniform_candidate_sampler` with
unique=True, which GluonNLP's big-vocabulary LM uses: ids are assumed sorted by
decreasing frequency (the vocabulary is: reserved tokens, then most frequent first) and

    P(c) = (log(c + 2) - log(c + 1)) / log(V + 1),   c in [0, V).

Draws are repeated until K distinct ids are found; `num_tries` is how many draws that
took, and the expected count of id c among them is 1 - (1 - P(c))^num_tries, computed
as -expm1(num_tries * log1p(-P(c))). The sampled softmax subtracts log(expected count)
from every logit, true and sampled (the correction that makes it an unbiased-in-the-limit
estimate of the full softmax's gradient).

The draw of a step depends only on (seed, step), never on the rank: every rank of a step
scores its columns against the same K candidates, so N ranks with b columns compute the
same loss and gradient as one process with N*b columns, and a resumed run draws exactly
what an uninterrupted one does, with no generator state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

# Offset so that these draws never share a stream with anything else seeded by (seed, step).
_STREAM = 0x5A3D


@dataclass
class Candidates:
    """One step's candidates: K distinct ids and their log expected counts."""

    ids: np.ndarray          # (K,) int64, in order of first draw
    log_expected: np.ndarray  # (K,) float32
    num_tries: int


def check_num_sampled(k: int, vocab_size: int) -> None:
    """--sampled-softmax K must be positive and at most half the vocabulary: drawing K
    distinct words takes ever more draws as K nears V (0.09 s a step at K = V/2 for
    WikiText-2's 33,278 words, 6.6 s at V - 1), while the full softmax would cost at
    most twice the sampled one. Raises UsageError (one line) otherwise."""
    if not 0 < k <= vocab_size // 2:
        raise UsageError(f"--sampled-softmax {k} must be between 1 and half the vocabulary "
                         f"({vocab_size // 2} of {vocab_size} words); use the full softmax "
                         f"instead")


class LogUniformSampler:
    def __init__(self, vocab_size: int, num_sampled: int, seed: int):
        if not 0 < num_sampled <= vocab_size:
            raise ValueError(f"num_sampled must be in [1, {vocab_size}], got {num_sampled}")
        self.vocab_size, self.num_sampled, self.seed = vocab_size, num_sampled, seed
        self._log_range = math.log(vocab_size + 1)

    def prob(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.float64)
        return np.log((ids + 2.0) / (ids + 1.0)) / self._log_range

    def log_expected(self, ids: np.ndarray, num_tries: int) -> np.ndarray:
        """log of the expected count of each id among num_tries draws, float32 like ids."""
        p = self.prob(ids)
        return np.log(-np.expm1(num_tries * np.log1p(-p))).astype(np.float32)

    def draw(self, step: int) -> Candidates:
        rng = np.random.default_rng([self.seed, step, _STREAM])
        k, drawn = self.num_sampled, np.empty(0, dtype=np.int64)
        chunk = 2 * k
        while True:
            u = rng.uniform(0.0, self._log_range, size=chunk)
            new = np.minimum(np.floor(np.exp(u) - 1.0), self.vocab_size - 1).astype(np.int64)
            drawn = np.concatenate([drawn, new])
            _, first = np.unique(drawn, return_index=True)
            if len(first) >= k:
                first.sort()
                picked = first[:k]      # the first K distinct ids, in draw order
                num_tries = int(picked[-1]) + 1
                ids = drawn[picked]
                return Candidates(ids, self.log_expected(ids, num_tries), num_tries)
            chunk *= 2
