"""The run's corpus on this rank: the vocabulary and this rank's columns of each split's
layout, mapped from the corpus cache (`cache.py`): no rank holds the text.

Every split has one global layout, split over the ranks as evenly as possible in
contiguous blocks in rank order (`text.column_range`): training G columns
(`--global-batch-size`, else ranks x `--batch-size`; 20 over 3 ranks is 6/7/7), so N
ranks together hold exactly the columns one process with G columns trains on; validation
and test `--eval-batch-size` and `--test-batch-size` columns whatever the number of
ranks, so every rank count evaluates exactly the same batches and reports the same
perplexity.

Every rank reads its own copy of the data and its own corpus cache, so the ranks first
agree that they read the same: one allgather of (host, vocabulary digest, vocabulary
size, tokens and sha1 per split) per rank, compared with rank 0's (the cache hashes every
split it reads anyway). A node with another copy of a
split would otherwise train on other text silently, or walk another number of batches
and leave its peers waiting in a collective until a timeout blames a dead peer.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import Config
from ..errors import UsageError
from ..hashing import text_digest
from ..runtime.dist import World, run_everywhere
from . import text as D
from .cache import CorpusCache, cache_root
from .datasets import resolve_splits


@dataclass
class Corpus:
    vocab: object
    vocab_json: str       # the vocabulary as run directories and checkpoints record it
    train: Optional[D.ColumnShard]
    valid: Optional[D.ColumnShard]
    test: Optional[D.ColumnShard]
    # Each split read, as the ranks agreed on it: {"sha1": of its text, "tokens": count}.
    digests: Dict[str, dict] = field(default_factory=dict)


def eval_columns(cfg: Config) -> Dict[str, int]:
    """Global evaluation columns per split."""
    return {"valid": cfg.run.eval_batch_size,
            "test": cfg.run.test_batch_size or cfg.run.eval_batch_size}


# What makes a split's columns fit it: fewer ranks help only where the global columns
# grow with the rank count (--batch-size per rank).
FIXES = {"valid": "a smaller --eval-batch-size or --bptt",
         "test": "a smaller --test-batch-size (default: --eval-batch-size) or --bptt"}


def load_corpus(cfg: Config, world: World, need=("train", "valid", "test"),
                vocab=None, fixes: Optional[Dict[str, str]] = None) -> Corpus:
    """Maps each split's token ids from the corpus cache (built on first use, by whichever
    rank gets there first while the others wait on its lock), takes the vocabulary of
    the training split (or the one given: a run's, from its --run-dir), checks that every
    rank read the same, and keeps this rank's columns of each split. A bad input on any
    rank stops every rank."""
    # Rank 0 first, so that it alone downloads a missing dataset; then everyone else.
    run_everywhere(world, lambda: resolve_splits(cfg.data, need) if world.is_root else
                   None, "splits-root")
    splits = run_everywhere(world, lambda: resolve_splits(cfg.data, need), "splits")

    def from_cache():
        first = getattr(splits, "train" if "train" in need else need[0])
        cache = CorpusCache(cache_root(cfg.data.cache_dir, first))
        v = vocab or cache.vocab(splits.train, cfg.data.min_freq, cfg.data.max_vocab)
        ids = {n: cache.ids(getattr(splits, n), v) for n in need}
        return v, ids, {n: cache.sources[getattr(splits, n)]["sha1"] for n in need}

    given = vocab is not None
    vocab, ids, sha1s = run_everywhere(world, from_cache, "cache")
    vocab_json = vocab.to_json()  # once: the digest here, vocab.json and the checkpoints
    seen = world.allgather_object(
        (socket.gethostname(), text_digest(vocab_json), len(vocab),
         {n: len(ids[n]) for n in need}, sha1s), name="data.agree")
    flags = {n: f"--{n}-file" if getattr(cfg.data, f"{n}_file") else "--data-dir"
             for n in need}
    flags["vocabulary"] = "--run-dir" if given else flags.get("train", "--data-dir")
    # Every rank holds the same list, so every rank raises the same line.
    problem = data_mismatch(seen, flags)
    if problem:
        raise UsageError(problem)
    total = dict(eval_columns(cfg), train=cfg.global_columns(world.size))
    fixes = fixes or {}

    def shard(name: str) -> D.ColumnShard:
        columns = D.column_range(total[name], world.rank, world.size)
        fix = fixes.get(name) or FIXES.get(name) or (
            "a smaller --global-batch-size or --bptt" if cfg.run.global_batch_size
            else "a smaller --batch-size or --bptt, or fewer ranks")
        return D.layout_columns(ids[name], total[name], columns, cfg.run.bptt,
                                what=f"{name} split", fix=fix)

    shards = run_everywhere(world, lambda: {n: shard(n) for n in need}, "shard")
    return Corpus(vocab, vocab_json, shards.get("train"), shards.get("valid"),
                  shards.get("test"),
                  {n: {"sha1": sha1s[n], "tokens": len(ids[n])} for n in need})


# host, vocabulary digest and size, tokens per split, sha1 per split
Seen = Tuple[str, str, int, Dict[str, int], Dict[str, str]]


def data_mismatch(seen: List[Seen], flags: Dict[str, str]) -> Optional[str]:
    """One line naming the ranks (and hosts) whose data differs from rank 0's and how,
    with the flags to check there; None when every rank read the same. seen: each rank's
    Seen, by rank. flags: the flag that chose each split's file, and the vocabulary's
    source, by name."""
    host0, digest0, words0, counts0, sha0 = seen[0]
    groups: Dict[tuple, List[Tuple[int, str]]] = {}  # ranks that read the same as each other
    for rank, (host, digest, words, counts, sha) in enumerate(seen):
        if (digest, counts, sha) != (digest0, counts0, sha0):
            key = (digest, words, tuple(counts.items()), tuple(sha.items()))
            groups.setdefault(key, []).append((rank, host))
    if not groups:
        return None
    parts, checks = [], []
    for (digest, words, counts, sha), ranks in groups.items():
        what = []
        for (name, n), (_, sha1) in zip(counts, sha):
            if n != counts0[name]:
                what.append(f"{name} split {n:,} tokens against {counts0[name]:,}")
            elif sha1 != sha0[name]:  # as many tokens, other text
                what.append(f"{name} split of other content ({n:,} tokens, sha1 "
                            f"{sha1[:12]} against {sha0[name][:12]})")
            else:
                continue
            checks.append(flags[name])
        if digest != digest0:
            what.append(f"a vocabulary of {words:,} words against {words0:,}"
                        if words != words0 else
                        f"another vocabulary of the same size ({words:,} words)")
            checks.append(flags["vocabulary"])
        who = ", ".join(f"rank {rank} on {host}" for rank, host in ranks)
        parts.append(f"{who} read other data than rank 0 on {host0}: {', '.join(what)}")
    hosts = {host for ranks in groups.values() for _, host in ranks}
    return (f"{'; '.join(parts)}; check {' and '.join(dict.fromkeys(checks))} on "
            f"{'that host' if len(hosts) == 1 else 'those hosts'}")
