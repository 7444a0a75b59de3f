"""Where a dataset's split files are, and fetching them.

`find_dataset` is the one lookup of `dist-lm train`, `dist-lm data`, `make data`,
`make train` and the tests: a directory given explicitly; else
`$DIST_LM_DATA_MIRROR/<name>`, a local copy; else GluonNLP's dataset cache,
`$MXNET_HOME/datasets/<name>` (MXNET_HOME defaulting to ~/.mxnet), fetched there and
verified by sha1 when missing. `resolve_splits` turns the data flags (explicit files,
--data-dir, --download) into the three split paths.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import List, Optional

from ..config import DataConfig
from ..errors import UsageError
from ..hashing import hash_file

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
