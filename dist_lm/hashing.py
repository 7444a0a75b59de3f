"""Digests of files, read in blocks (the corpora are hundreds of MB)."""

from __future__ import annotations

import hashlib


def hash_file(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
