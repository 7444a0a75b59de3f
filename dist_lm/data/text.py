"""Corpora as tokens, the vocabulary, and the BPTT batch layout sharded by columns
across ranks.

A corpus is read as GluonNLP's `CorpusDataset(skip_empty=False, bos=None, eos='<eos>',
flatten=True)` reads it (the reference notebook's `WikiText2`): the text is split with
`str.splitlines`, each line is stripped and split on whitespace, and every line, blank
ones included, ends with one `<eos>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..errors import UsageError

EOS = "<eos>"


def read_tokens(path: str) -> List[str]:
    """Reads a corpus file into one flat token list, `<eos>` ending every line."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    if b"\0" in raw:
        raise UsageError(f"{path} is a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    tokens: List[str] = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    if not text.strip():
        raise UsageError(f"{path} is empty (no words)")
    return tokens


def build_vocab(tokens: List[str], min_freq: int = 1, max_size: Optional[int] = None):
    """The reference notebook's vocabulary: `<unk>` first, `<eos>` reserved, no pad/bos."""
    import gluonnlp as nlp

    return nlp.Vocab(nlp.data.Counter(tokens), max_size=max_size, min_freq=min_freq,
                     padding_token=None, bos_token=None, eos_token=EOS)


def vocab_from_json(text: str):
    """The Vocab that `nlp.Vocab.from_json(text)` gives, for a text that from_json wrote
    (as every cached vocabulary and every run's vocab.json is), 5x faster: from_json
    re-counts and re-sorts every token (8.6 s at 267,735 words under load, a large part
    of a warm start), while the text already holds the final order. Builds the special
    tokens with GluonNLP's constructor, then appends the stored tokens in the stored
    order (GluonNLP 0.10.0 is pinned; tests/test_cache.py checks the two give the same
    JSON). Raises ValueError for a text that does not describe a consistent vocabulary."""
    import gluonnlp as nlp

    d = json.loads(text)
    idx_to_token, token_to_idx = d["idx_to_token"], d["token_to_idx"]
    vocab = nlp.Vocab(None, unknown_token=d["unknown_token"],
                      **d.get("identifiers_to_tokens", {}))
    special = len(vocab._idx_to_token)
    if vocab._idx_to_token != idx_to_token[:special] or \
            len(idx_to_token) != len(token_to_idx) or \
            any(token_to_idx.get(t) != i for i, t in enumerate(idx_to_token)):
        raise ValueError("its token list and index disagree")
    vocab._idx_to_token.extend(idx_to_token[special:])
    vocab._token_to_idx.update(token_to_idx)  # the stored order, as from_json keeps it
    return vocab


def encode(tokens: List[str], vocab) -> np.ndarray:
    """Token ids as int32 (unknown words map to `<unk>`), shape (len(tokens),)."""
    return np.asarray(vocab[tokens], dtype=np.int32)


# --- BPTT layout ------------------------------------------------------------------------
#
# The corpus, N tokens long, is cut into B = ranks x b columns of L = N // B tokens each
# (the tail N - B*L is dropped, as CorpusBPTTBatchify(last_batch='discard') does), and the
# columns are laid side by side. Column c is the contiguous slice corpus[c*L : (c+1)*L],
# so a column reads on across batch boundaries and the hidden state carries over:
#
#               rank 0: columns 0..b-1      rank 1: columns b..2b-1
#             +----+----+-----+--------+   +--------+-----+----------+
#   t = 0     | w0 | wL | ... |        |   | wbL    | ... | w(B-1)L  |  \
#   t = 1     | w1 |wL+1| ... |        |   |        | ... |          |   } batch 0: rows
#    ...      |    |    |     |        |   |        |     |          |   } 0..bptt-1, targets
#   t = bptt  |    |    |     |        |   |        |     |          |  /  rows 1..bptt
#    ...      |    |    |     |        |   |        |     |          |     batch 1 starts
#   t = L-1   |wL-1|w2L-1 ... |        |   |        | ... |  wBL-1   |     where batch 0
#             +----+----+-----+--------+   +--------+-----+----------+     ended, ...
#
# Batch i is rows [i*bptt, (i+1)*bptt) as inputs and the same rows shifted by one as
# targets; there are (L - 1) // bptt batches, the same number on every rank because L
# depends only on N and B. Rank r's columns are the contiguous block `column_range(B, r,
# ranks)` = [c0, c1), B // ranks or B // ranks + 1 of them when ranks does not divide B
# (20 over 3 ranks: 6/7/7), i.e. corpus[c0*L : c1*L], so a rank keeps only its own slice
# of the ids, and the ranks together see exactly the batches one process with B columns
# sees.


@dataclass
class ColumnShard:
    """One rank's columns of the layout: `cols` has shape (b, L), column c being the
    contiguous slice cols[c] of the corpus ids (a view: of the memory-mapped cache, or
    of an array), so a rank holds nothing but a map of its own columns."""

    cols: np.ndarray
    bptt: int

    @property
    def columns(self) -> int:
        return self.cols.shape[0]

    @property
    def num_batches(self) -> int:
        return (self.cols.shape[1] - 1) // self.bptt

    @property
    def tokens_per_batch(self) -> int:
        return self.bptt * self.columns

    def batch(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of batch i, each (bptt, b) (views; read when copied)."""
        rows = self.cols[:, i * self.bptt:(i + 1) * self.bptt + 1].T  # (bptt + 1, b)
        return rows[:-1], rows[1:]

    @property
    def length(self) -> int:
        """L, the tokens of each column."""
        return self.cols.shape[1]

    def slice(self, pos: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Inputs rows [pos, pos + n) and targets rows [pos + 1, pos + n + 1), each (n', b)
        with n' = min(n, L - 1 - pos): a window by token position, for variable-length
        BPTT (bptt.py). Views, like `batch`."""
        rows = self.cols[:, pos:pos + n + 1].T  # (n' + 1, b)
        return rows[:-1], rows[1:]

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return (self.batch(i) for i in range(self.num_batches))


def shard_columns(ids: np.ndarray, columns: int, rank: int, ranks: int, bptt: int,
                  what: str = "corpus") -> ColumnShard:
    """Rank `rank`'s `columns` columns of the layout of `ids` over ranks*columns columns
    (the training layout: every rank holds the same number of columns)."""
    return layout_columns(ids, columns * ranks, range(rank * columns, (rank + 1) * columns),
                          bptt, what)


def column_range(total: int, rank: int, ranks: int) -> range:
    """The contiguous columns rank `rank` holds when `total` global columns are split
    over `ranks` ranks as evenly as possible (training and evaluation alike); empty when
    there are fewer columns than ranks (evaluation only: such a rank still takes part in
    every collective; training refuses it, `Config.for_world`)."""
    return range(rank * total // ranks, (rank + 1) * total // ranks)


def layout_columns(ids: np.ndarray, total: int, columns: range, bptt: int,
                   what: str = "corpus",
                   fix: str = "a smaller --batch-size or --bptt, or fewer ranks") -> ColumnShard:
    """Columns `columns` of the layout of `ids` over `total` columns, as (L, len(columns)).
    fix: the options that make a too-small split fit, for the error."""
    length = len(ids) // total
    if (length - 1) // bptt < 1:
        raise UsageError(
            f"the {what} has {len(ids)} tokens, too few for one batch of {total} columns x "
            f"{bptt + 1} tokens ({total * (bptt + 1)} needed); use {fix}")
    mine = ids[columns.start * length:columns.stop * length]
    # (c, L) row-major is c contiguous columns: a view, nothing is copied.
    return ColumnShard(mine.reshape(len(columns), length), bptt)
