"""The run's corpus on this rank: the vocabulary and this rank's columns of each split's
layout, mapped from the corpus cache (`cache.py`): no rank holds the text.

Training uses `--batch-size` columns per rank (ranks x b global). Validation and test each
use one global layout, `--eval-batch-size` and `--test-batch-size` columns whatever the
number of ranks, split over the ranks as evenly as possible (see `data.column_range`), so
every rank count evaluates exactly the same batches and reports the same perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from . import data as D
from .cache import CorpusCache, cache_root
from .config import Config
from .dist import World, run_everywhere


@dataclass
class Corpus:
    vocab: object
    train: Optional[D.ColumnShard]
    valid: Optional[D.ColumnShard]
    test: Optional[D.ColumnShard]


def eval_columns(cfg: Config) -> Dict[str, int]:
    """Global evaluation columns per split."""
    return {"valid": cfg.run.eval_batch_size,
            "test": cfg.run.test_batch_size or cfg.run.eval_batch_size}


def load_corpus(cfg: Config, world: World, need=("train", "valid", "test"),
                vocab=None) -> Corpus:
    """Maps each split's token ids from the corpus cache (built on first use, by whichever
    rank gets there first while the others wait on its lock), takes the vocabulary of
    the training split (or the one given), and keeps this rank's columns of each split.
    A bad input on any rank stops every rank."""
    # Rank 0 first, so that it alone downloads a missing dataset; then everyone else.
    run_everywhere(world, lambda: D.resolve_splits(cfg.data, need) if world.is_root else
                   None, "splits-root")
    splits = run_everywhere(world, lambda: D.resolve_splits(cfg.data, need), "splits")

    def from_cache():
        first = getattr(splits, "train" if "train" in need else need[0])
        cache = CorpusCache(cache_root(cfg.data.cache_dir, first))
        v = vocab or cache.vocab(splits.train, cfg.data.min_freq, cfg.data.max_vocab)
        return v, {n: cache.ids(getattr(splits, n), v) for n in need}

    vocab, ids = run_everywhere(world, from_cache, "cache")
    b, bptt = cfg.run.batch_size, cfg.run.bptt
    total = dict(eval_columns(cfg), train=b * world.size)

    def shard(name: str) -> D.ColumnShard:
        columns = (range(world.rank * b, (world.rank + 1) * b) if name == "train" else
                   D.column_range(total[name], world.rank, world.size))
        return D.layout_columns(ids[name], total[name], columns, bptt, what=f"{name} split")

    shards = run_everywhere(world, lambda: {n: shard(n) for n in need}, "shard")
    return Corpus(vocab, shards.get("train"), shards.get("valid"), shards.get("test"))
