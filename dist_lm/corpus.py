"""The run's corpus on this rank: the vocabulary (built once, on rank 0) and this rank's
columns of each split's layout.

Training uses `--batch-size` columns per rank (ranks x b global). Validation and test each
use one global layout, `--eval-batch-size` and `--test-batch-size` columns whatever the
number of ranks, split over the ranks as evenly as possible (see `data.column_range`), so
every rank count evaluates exactly the same batches and reports the same perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from . import data as D
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
    """Reads the splits on every rank, builds the vocabulary once (rank 0) and broadcasts
    it, and keeps each rank's own columns. A bad input on any rank stops every rank."""
    # Rank 0 first, so that it alone downloads a missing dataset; then everyone else.
    run_everywhere(world, lambda: D.resolve_splits(cfg.data, need) if world.is_root else
                   None, "splits-root")
    splits = run_everywhere(world, lambda: D.resolve_splits(cfg.data, need), "splits")
    tokens = run_everywhere(
        world, lambda: {n: D.read_tokens(getattr(splits, n)) for n in need}, "read")
    if vocab is None:
        vocab_json = D.build_vocab(tokens["train"], cfg.data.min_freq,
                                   cfg.data.max_vocab).to_json() if world.is_root else None
        vocab = D.vocab_from_json(world.broadcast_object(vocab_json, name="vocab"))
    b, bptt = cfg.run.batch_size, cfg.run.bptt
    total = dict(eval_columns(cfg), train=b * world.size)

    def shard(name: str) -> D.ColumnShard:
        ids = D.encode(tokens.pop(name), vocab)
        columns = (range(world.rank * b, (world.rank + 1) * b) if name == "train" else
                   D.column_range(total[name], world.rank, world.size))
        return D.layout_columns(ids, total[name], columns, bptt, what=f"{name} split")

    shards = run_everywhere(world, lambda: {n: shard(n) for n in need}, "shard")
    return Corpus(vocab, shards.get("train"), shards.get("valid"), shards.get("test"))
