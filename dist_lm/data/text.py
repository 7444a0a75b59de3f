"""Corpora, vocabulary and the BPTT batch layout, sharded by columns across ranks.

Where WikiText lives (`find_dataset`, the one lookup of `dist-lm train`, `dist-lm data`,
`make data`/`make train` and the tests): a directory given explicitly; else
`$DIST_LM_DATA_MIRROR/<name>`, a local copy; else GluonNLP's dataset cache,
`$MXNET_HOME/datasets/<name>` (MXNET_HOME defaulting to ~/.mxnet), fetched there and
verified by sha1 when missing.

A corpus is read as GluonNLP's `CorpusDataset(skip_empty=False, bos=None, eos='<eos>',
flatten=True)` reads it (the reference notebook's `WikiText2`): the text is split with
`str.splitlines`, each line is stripped and split on whitespace, and every line, blank
ones included, ends with one `<eos>`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..config import DataConfig
from ..errors import UsageError
from ..hashing import hash_file

EOS = "<eos>"

# Split file names per layout, in the order (train, valid, test).
LAYOUTS = {
    "wikitext": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    "ptb": ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
}

# The archives and per-file sha1 digests GluonNLP 0.10.0 checks
# (gluonnlp/data/corpora/wikitext.py), fetched from MXNet's dataset repository
# (`MXNET_GLUON_REPO` overrides its address, as it does for GluonNLP).
DATASETS = {
    "wikitext-2": {
        "archive": ("wikitext-2-v1.zip", "3c914d17d80b1459be871a5039ac23e752a53cbe"),
        "files": {"wiki.train.tokens": "863f29c46ef9d167fff4940ec821195882fe29d1",
                  "wiki.valid.tokens": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
                  "wiki.test.tokens": "c7b8ce0aa086fb34dab808c5c49224211eb2b172"},
    },
    "wikitext-103": {
        "archive": ("wikitext-103-v1.zip", "0aec09a7537b58d4bb65362fee27650eeaba625a"),
        "files": {"wiki.train.tokens": "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211",
                  "wiki.valid.tokens": "c326ac59dc587676d58c422eb8a03e119582f92b",
                  "wiki.test.tokens": "8a5befc548865cec54ed4273cf87dbbad60d1e47"},
    },
}


@dataclass
class Splits:
    train: Optional[str]
    valid: Optional[str]
    test: Optional[str]


def resolve_splits(cfg: DataConfig, need=("train", "valid", "test")) -> Splits:
    """Finds the split files: explicit paths first, then the layout found in data_dir;
    with neither, the splits of `find_dataset` (WikiText-2, or --download's dataset)."""
    names = ("train", "valid", "test")
    explicit = {n: getattr(cfg, f"{n}_file") for n in names}
    found = dict(explicit)
    data_dir = cfg.data_dir
    if data_dir is None and not any(explicit.values()):
        data_dir = find_dataset(cfg.download or "wikitext-2")
    if data_dir is not None:
        if not os.path.isdir(data_dir) and not cfg.download:
            raise UsageError(f"--data-dir {data_dir}: no such directory")
        layout = next((files for files in LAYOUTS.values()
                       if any(os.path.exists(os.path.join(data_dir, f)) for f in files)),
                      LAYOUTS["wikitext"])
        for name, filename in zip(names, layout):
            if found[name] is None:
                found[name] = os.path.join(data_dir, filename)
        missing = [found[n] for n in need if not os.path.exists(found[n])]
        if missing and cfg.download:
            download_dataset(cfg.download, data_dir)
    for name in need:
        path = found[name]
        if path is None:
            raise UsageError(f"no {name} split: give --{name}-file or --data-dir")
        if not os.path.isfile(path):
            hint = (" (or add --download wikitext-2 to fetch it)"
                    if cfg.data_dir and not cfg.download else "")
            raise UsageError(f"{name} split {path}: no such file; pass --{name}-file or "
                             f"a --data-dir that holds it{hint}")
    return Splits(**found)


MIRROR_ENV = "DIST_LM_DATA_MIRROR"


def dataset_cache(name: str) -> str:
    """Where GluonNLP keeps a dataset: $MXNET_HOME/datasets/NAME, MXNET_HOME defaulting
    to ~/.mxnet (gluonnlp.base.get_home_dir)."""
    home = os.path.expanduser(os.environ.get("MXNET_HOME") or os.path.join("~", ".mxnet"))
    return os.path.join(home, "datasets", name)


def find_dataset(name: str = "wikitext-2", data_dir: Optional[str] = None, fetch: bool = True,
                 specs: dict = DATASETS) -> str:
    """The directory holding every split of dataset NAME, in this order: data_dir when
    given (fetched into when incomplete); else $DIST_LM_DATA_MIRROR/NAME when complete;
    else dataset_cache(NAME), fetched there when incomplete. fetch=False never
    downloads: a missing dataset is then a UsageError of one line saying where to put
    it. specs: the archives and digests to fetch and check (DATASETS)."""
    mirror = os.environ.get(MIRROR_ENV)
    if data_dir:
        target, or_else = data_dir, ""
    else:
        if mirror and not _missing(os.path.join(mirror, name), specs[name]):
            return os.path.join(mirror, name)
        now = f" (now {mirror}, which has no complete {name}/)" if mirror else ""
        target, or_else = dataset_cache(name), \
            f", or set {MIRROR_ENV} to a directory holding {name}/{now}"
    missing = _missing(target, specs[name])
    if missing and not fetch:
        make = "make data" + (f" DATA_DIR={target}" if data_dir else "")
        raise UsageError(f"no {name} in {target} (no {', '.join(missing)}): put its files "
                         f"there, run `{make}` to fetch them{or_else}")
    if missing:
        download_dataset(name, target, specs, or_else)
    return target


def _missing(directory: str, spec: dict) -> List[str]:
    return [f for f in spec["files"] if not os.path.isfile(os.path.join(directory, f))]


def download_dataset(name: str, data_dir: str, specs: dict = DATASETS,
                     or_else: str = "") -> None:
    """Fetches a WikiText archive into data_dir and verifies every file's sha1 (the
    archive's and each split's, from specs); nothing unverified is left in data_dir.
    or_else: another way to provide the files, for the message when offline."""
    from mxnet.gluon.utils import _get_repo_file_url, download

    spec = specs[name]
    archive, archive_sha1 = spec["archive"]
    url = _get_repo_file_url(f"gluon/dataset/{name}", archive)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {data_dir} for {name}: {err.strerror}; "
                         f"put its files there by hand{or_else}") from None
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as tmp:
        try:
            # Its "Downloading <temporary path>..." line is noise; the result is said below.
            with contextlib.redirect_stdout(io.StringIO()):
                path = download(url, path=os.path.join(tmp, archive), retries=1,
                                verify_ssl=True)
        except Exception as err:  # urllib/requests errors differ by version
            raise UsageError(f"cannot download {name} from {url} ({_reason(err)}); "
                             f"put its files in {data_dir} by hand{or_else}") from None
        if not _sha1_ok(path, archive_sha1):
            raise UsageError(f"{url} has the wrong sha1 (not {archive_sha1}); refusing it")
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                base = os.path.basename(member)
                if base in spec["files"]:
                    with zf.open(member) as src, open(os.path.join(tmp, base), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for base, digest in spec["files"].items():
            staged = os.path.join(tmp, base)
            if not os.path.exists(staged) or not _sha1_ok(staged, digest):
                raise UsageError(f"{archive}: {base} is missing or has the wrong sha1 "
                                 f"(not {digest}); refusing it")
        for base in spec["files"]:
            os.replace(os.path.join(tmp, base), os.path.join(data_dir, base))
    print(f"dist-lm: fetched {name} from {url} into {data_dir}, sha1 verified",
          file=sys.stderr)


def _reason(err: Exception) -> str:
    """A download error in a few words: requests wraps the OS's reason ("[Errno 111]
    Connection refused") in a line of pool and object names."""
    errno = re.findall(r"\[Errno -?\d+\] [^'\")]+", str(err))
    return errno[-1] if errno else f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _sha1_ok(path: str, digest: str) -> bool:
    return hash_file(path, "sha1") == digest


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
# depends only on N and B. Rank r's columns are the contiguous range
# corpus[r*b*L : (r+1)*b*L], so a rank keeps only its own slice of the ids, and N ranks
# with b columns each see exactly the batches one process with N*b columns sees.


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
    """The contiguous columns rank `rank` evaluates when `total` global columns are split
    over `ranks` ranks as evenly as possible; empty when there are fewer columns than
    ranks (such a rank still takes part in every collective)."""
    return range(rank * total // ranks, (rank + 1) * total // ranks)


def layout_columns(ids: np.ndarray, total: int, columns: range, bptt: int,
                   what: str = "corpus") -> ColumnShard:
    """Columns `columns` of the layout of `ids` over `total` columns, as (L, len(columns))."""
    length = len(ids) // total
    if (length - 1) // bptt < 1:
        raise UsageError(
            f"the {what} has {len(ids)} tokens, too few for one batch of {total} columns x "
            f"{bptt + 1} tokens ({total * (bptt + 1)} needed); use a smaller --batch-size "
            f"or --bptt, or fewer ranks")
    mine = ids[columns.start * length:columns.stop * length]
    # (c, L) row-major is c contiguous columns: a view, nothing is copied.
    return ColumnShard(mine.reshape(len(columns), length), bptt)
