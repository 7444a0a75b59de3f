"""Digests of files, read in blocks (the corpora are hundreds of MB), and of texts."""

from __future__ import annotations

import hashlib


def hash_file(path: str, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def text_digest(text: str) -> str:
    """sha256 of a text's UTF-8 bytes (a vocabulary's JSON, as checkpoints record it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
