"""Where the data comes from: the lookup (an explicit directory, else the local mirror
$DIST_LM_DATA_MIRROR, else GluonNLP's cache ~/.mxnet/datasets, fetched there), the fetch
itself against a repository on the loopback serving a small WikiText-shaped archive, and
the one line that `dist-lm data`, `make train` and the test suite give when the data is
nowhere and cannot be fetched. Nothing here sends a packet off this machine."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import re
import socket
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, WIKITEXT2, dist_lm, run
from dist_lm.data import datasets as D
from dist_lm.config import DataConfig
from dist_lm.errors import UsageError

FILES = D.LAYOUTS["wikitext"]
# Small texts in WikiText's layout: a heading, a blank line, a paragraph with <unk>.
TEXTS = {name: f" = {name} = \n\n the {name} text , with an <unk> word .\n".encode()
         for name in FILES}


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def wikitext_zip(texts=TEXTS) -> bytes:
    """An archive laid out as wikitext-2-v1.zip is: wikitext-2/wiki.*.tokens."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in texts.items():
            zf.writestr(f"wikitext-2/{name}", text)
    return buf.getvalue()


def specs_for(archive: bytes, texts=TEXTS) -> dict:
    """A DATASETS table for a test archive: its own digest and its files' digests."""
    return {"wikitext-2": {"archive": ("wikitext-2-v1.zip", sha1(archive)),
                           "files": {name: sha1(text) for name, text in texts.items()}}}


def complete(directory: Path, texts=TEXTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (directory / name).write_bytes(text)
    return directory


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data anywhere: an empty home (so an empty ~/.mxnet), no mirror, no explicit
    directory, and the dataset repository at a closed loopback port."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("MXNET_HOME", D.MIRROR_ENV, "DIST_LM_DATA_DIR", "DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MXNET_GLUON_REPO", f"http://127.0.0.1:{closed_port()}/")
    return home


class Repository:
    """MXNet's dataset repository on the loopback: serves files under `root` at
    gluon/dataset/..., and records the paths asked for."""

    def __init__(self, root: Path):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.archive = root / "gluon" / "dataset" / "wikitext-2" / "wikitext-2-v1.zip"
        self.archive.parent.mkdir(parents=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def repository(tmp_path, nowhere, monkeypatch):
    repo = Repository(tmp_path / "served")
    monkeypatch.setenv("MXNET_GLUON_REPO", repo.url)
    yield repo
    repo.close()


# --- the lookup -------------------------------------------------------------------------

def test_explicit_then_mirror_then_cache(tmp_path, nowhere, monkeypatch):
    explicit = complete(tmp_path / "explicit")
    mirror = tmp_path / "mirror"
    complete(mirror / "wikitext-2")
    cache = complete(nowhere / ".mxnet" / "datasets" / "wikitext-2")
    monkeypatch.setenv(D.MIRROR_ENV, str(mirror))
    assert D.find_dataset("wikitext-2", str(explicit)) == str(explicit)
    assert D.find_dataset("wikitext-2") == str(mirror / "wikitext-2")
    monkeypatch.delenv(D.MIRROR_ENV)
    assert D.find_dataset("wikitext-2") == str(cache)
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "mxnet-home"))  # GluonNLP's variable
    other = complete(tmp_path / "mxnet-home" / "datasets" / "wikitext-2")
    assert D.find_dataset("wikitext-2") == str(other)


def test_an_incomplete_mirror_is_passed_over(tmp_path, nowhere, monkeypatch):
    mirror = tmp_path / "mirror"
    complete(mirror / "wikitext-2", {n: TEXTS[n] for n in FILES[1:]})  # no train split
    cache = complete(nowhere / ".mxnet" / "datasets" / "wikitext-2")
    monkeypatch.setenv(D.MIRROR_ENV, str(mirror))
    assert D.find_dataset("wikitext-2") == str(cache)


def test_train_without_data_options_reads_the_lookup(tmp_path, nowhere, monkeypatch):
    mirror = tmp_path / "mirror"
    complete(mirror / "wikitext-2")
    monkeypatch.setenv(D.MIRROR_ENV, str(mirror))
    splits = D.resolve_splits(DataConfig())
    assert [splits.train, splits.valid, splits.test] == \
        [str(mirror / "wikitext-2" / n) for n in FILES]
    # Some split files given: the others are not taken from another corpus.
    with pytest.raises(UsageError, match="no valid split: give --valid-file or --data-dir"):
        D.resolve_splits(DataConfig(train_file=str(mirror / "wikitext-2" / FILES[0])))


def test_nothing_found_without_fetching_is_one_line(nowhere):
    with pytest.raises(UsageError) as err:
        D.find_dataset("wikitext-2", fetch=False)
    line = str(err.value)
    cache = nowhere / ".mxnet" / "datasets" / "wikitext-2"
    assert "\n" not in line and f"no wikitext-2 in {cache}" in line
    assert "`make data`" in line and D.MIRROR_ENV in line


def test_the_tests_read_gluonnlps_wikitext2():
    for name, digest in D.DATASETS["wikitext-2"]["files"].items():
        assert sha1((WIKITEXT2 / name).read_bytes()) == digest, name


# --- fetching into the cache --------------------------------------------------------------

def test_fetch_from_a_loopback_repository_verified_by_sha1(repository, nowhere):
    archive = wikitext_zip()
    repository.archive.write_bytes(archive)
    found = D.find_dataset("wikitext-2", specs=specs_for(archive))
    cache = nowhere / ".mxnet" / "datasets" / "wikitext-2"
    assert found == str(cache)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == TEXTS  # no temporaries
    assert repository.requests == ["/gluon/dataset/wikitext-2/wikitext-2-v1.zip"]
    assert D.find_dataset("wikitext-2", specs=specs_for(archive)) == str(cache)
    assert len(repository.requests) == 1, "a complete cache is not fetched again"


def test_a_corrupted_archive_is_refused_in_one_line(repository, nowhere):
    archive = wikitext_zip()
    damaged = bytearray(archive)
    damaged[len(damaged) // 2] ^= 0xFF
    repository.archive.write_bytes(bytes(damaged))
    with pytest.raises(UsageError) as err:
        D.find_dataset("wikitext-2", specs=specs_for(archive))
    assert "\n" not in str(err.value)
    assert f"wikitext-2-v1.zip has the wrong sha1 (not {sha1(archive)}); refusing it" \
        in str(err.value)
    assert list((nowhere / ".mxnet" / "datasets" / "wikitext-2").iterdir()) == []


def test_a_corrupted_split_in_the_archive_is_refused_in_one_line(repository, nowhere):
    altered = dict(TEXTS, **{"wiki.test.tokens": TEXTS["wiki.test.tokens"] + b" extra\n"})
    archive = wikitext_zip(altered)
    repository.archive.write_bytes(archive)
    specs = specs_for(archive)  # the archive's own digest, the true files' digests
    specs["wikitext-2"]["files"] = {n: sha1(t) for n, t in TEXTS.items()}
    with pytest.raises(UsageError) as err:
        D.find_dataset("wikitext-2", specs=specs)
    assert "\n" not in str(err.value)
    assert "wiki.test.tokens is missing or has the wrong sha1" in str(err.value)
    assert list((nowhere / ".mxnet" / "datasets" / "wikitext-2").iterdir()) == []


# --- offline, with no copy: one line --------------------------------------------------------

# make's own report of a failed recipe ("make: *** [Makefile:38: train] Error 2", or
# "make[1]: ***" when make runs inside another make, as under `make test`).
MAKES_OWN = re.compile(r"^make(\[\d+\])?: \*\*\* ")


def one_error_line(stderr: str, prefix: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip() and not MAKES_OWN.match(x)]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.medium
def test_dist_lm_data_offline_says_where_to_put_the_files(nowhere):
    proc = dist_lm("data", timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    line = one_error_line(proc.stderr, "dist-lm: error: cannot download wikitext-2 from "
                                       "http://127.0.0.1:")
    assert f"put its files in {nowhere}/.mxnet/datasets/wikitext-2 by hand" in line
    assert f"or set {D.MIRROR_ENV} to a directory holding wikitext-2/" in line


@pytest.mark.medium
def test_dist_lm_data_prints_the_mirror(tmp_path, nowhere, monkeypatch):
    mirror = tmp_path / "mirror"
    complete(mirror / "wikitext-2")
    monkeypatch.setenv(D.MIRROR_ENV, str(mirror))
    proc = dist_lm("data", timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"{mirror / 'wikitext-2'}\n", proc.stderr


@pytest.mark.medium
def test_make_train_offline_stops_in_one_line_before_any_rank(nowhere):
    proc = run(["make", "--no-print-directory", "-C", REPO, "train", "DATA_DIR=",
                f"RUN_DIR={nowhere / 'run'}"], timeout=120)
    assert proc.returncode != 0
    line = one_error_line(proc.stderr, "dist-lm: error: cannot download wikitext-2")
    assert f"{nowhere}/.mxnet/datasets/wikitext-2" in line and D.MIRROR_ENV in line
    assert "make train:" not in proc.stdout and not (nowhere / "run").exists()


@pytest.mark.medium
def test_the_test_suite_without_data_stops_in_one_line(nowhere):
    # One test that reads WikiText-2 (not this one: it would start the suite again).
    proc = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                f"{Path(__file__).name}::test_the_tests_read_gluonnlps_wikitext2"],
               cwd=REPO / "tests", timeout=120)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    line = one_error_line(proc.stderr, "ERROR: dist-lm tests: no wikitext-2 in ")
    assert f"{nowhere}/.mxnet/datasets/wikitext-2" in line
    assert "`make data`" in line and D.MIRROR_ENV in line
    assert "passed" not in proc.stdout and "failed" not in proc.stdout
