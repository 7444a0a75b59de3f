"""Activation dropout masks that belong to columns of the global batch, not to ranks.

One process with G columns and N ranks holding b_r of them each must apply the same
mask to the same column, or N would change the numbers. So the mask of global column j
at optimizer step s for dropout site k is drawn from its own counter-based stream,

    Philox(key = (seed, "mask"), counter = (0, k, s, j))

(numpy's Philox-4x64, whose draws advance the lowest counter word only, so no two
(site, step, column) streams ever meet). A rank draws only its own columns
[first, first + b_r): the cost is its share, whatever N is, where drawing the whole
(T, G, W) batch and slicing would cost G / b_r times as much on every rank. The first
T x W (or W, for a mask shared over time) uniforms of the stream give the column's mask,
element (t, w) at t x W + w; a unit is kept when its uniform is >= p, and kept units
are scaled by 1 / (1 - p), as MXNet's Dropout does. Masks are made on the host and
passed into the hybridized graph as inputs, so CPU and GPU draw bit-identical masks and
no device generator state is involved (cuDNN's dropout keeps its own).

Weight-level masks (drop_e, weight_drop) are not here: they mask parameters every rank
shares, so every rank draws the one mask from MXNet's generator seeded with (seed, step)
(stepper.reseed), in the graph's fixed order of draws.
"""

from __future__ import annotations

import zlib
from typing import List, Sequence

import numpy as np

from ..model import MaskSite

_MASK = 0x6D61736B  # 'mask': keeps these streams apart from any other use of the seed


def _site_id(name: str) -> int:
    """A site's stream number: from its name, so that adding a site renumbers nothing."""
    return zlib.crc32(name.encode())


class ColumnMasks:
    """The activation masks of a rank's global columns, [first, first + b), at any step."""

    def __init__(self, sites: Sequence[MaskSite], seed: int, first: int):
        self.sites, self.first = list(sites), first
        self._key = (seed % 2 ** 64) | (_MASK << 64)  # Philox's 128-bit key

    def __bool__(self) -> bool:
        return bool(self.sites)

    def draw(self, step: int, steps: int, columns: int) -> List[np.ndarray]:
        """The masks of optimizer step `step` for a window of `steps` time steps over the
        rank's `columns` (b) columns, one per site in order, each float32 (steps, b, W) or
        (1, b, W): 0 or 1 / (1 - p)."""
        return [self._site(site, step, steps, columns) for site in self.sites]

    def _site(self, site: MaskSite, step: int, steps: int, columns: int) -> np.ndarray:
        rows = steps if site.per_step else 1
        uniform = np.empty((columns, rows * site.width), dtype=np.float32)  # (b, T*W)
        sid = _site_id(site.name)
        for i in range(columns):
            bits = np.random.Philox(key=self._key, counter=[0, sid, step, self.first + i])
            np.random.Generator(bits).random(out=uniform[i], dtype=np.float32)
        keep = uniform >= np.float32(site.p)
        mask = keep * np.float32(1.0 / (1.0 - site.p))                      # (b, T*W)
        # (b, T, W) -> (T, b, W), the layout of the activations it multiplies.
        return np.ascontiguousarray(mask.reshape(columns, rows, site.width)
                                    .transpose(1, 0, 2))
