"""The corpus cache: each split as int32 token ids and the vocabulary, built once in one
streaming pass and memory-mapped by every later run.

    CACHE/                       --cache-dir, else $DIST_LM_CACHE_DIR, else
                                 .dist-lm-cache beside the training split when that
                                 directory is writable, else $XDG_CACHE_HOME/dist-lm
                                 (~/.cache/dist-lm)
        .lock                    flock: one writer at a time, readers share
        vocab-<K>.json           the vocabulary of a training split; K = sha256 of the
                                 format, the split's size and sha1, --min-freq, --max-vocab
        ids-<V>-<S>.i32          a split's ids (raw little-endian int32); V = the
                                 vocabulary's sha256, S = the split's sha1
        ids-<V>-<S>.json         its record: format, source size and sha1, token count,
                                 the sha256 of the .i32 file

Reading matches `data.read_tokens` exactly (the text split as `str.splitlines` splits
it, words by whitespace, one `<eos>` per line) and the vocabulary is GluonNLP's, built
from the same counts, so ids and their order are those of the uncached path (tested on
WikiText-2). Tokens are counted and encoded at C speed, a part of the training split per
core in worker processes (`encode_part`: no per-token Python loop); the vocabulary is then
built from the summed counts and one NumPy gather per part turns its provisional ids into
final ones.

Every use verifies: the source's sha1 picks the entry (a changed file gets new entries),
and an entry whose record or digest does not match is rebuilt with a warning, never
used. Entries are written to a temporary name and renamed, under the exclusive lock, so
two jobs starting on the same data build once and never see half a file. To clear the
cache, delete the directory.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import fcntl
import glob
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import UsageError
from ..hashing import hash_file
from .text import vocab_from_json

FORMAT = 1
EOS = "<eos>"
MIN_PART_BYTES = 32 << 20  # below this, a worker process costs more than it saves
CHUNK_BYTES = 8 << 20  # ~1.6M tokens of text per chunk: ~100 MB of transient str objects


# --- reading -------------------------------------------------------------------------------

class TextReader:
    """Bytes [start, end) of a file as lines, as `str.splitlines` splits the whole text, a
    chunk at a time; `has_words` tells afterwards whether any line held a word. start must
    follow a b"\n" and end must too, or be the file's end (see `part_bounds`). Raises
    UsageError for an unreadable, binary or non-UTF-8 file."""

    def __init__(self, path: str, start: int = 0, end: Optional[int] = None):
        self.path, self.start, self.end = path, start, end
        self.has_words = False

    def __iter__(self) -> Iterator[List[str]]:
        path = self.path
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry, offset = "", self.start
        try:
            with open(path, "rb") as fh:
                fh.seek(self.start)
                while True:
                    want = CHUNK_BYTES if self.end is None else \
                        min(CHUNK_BYTES, self.end - offset)
                    raw = fh.read(want) if want > 0 else b""
                    final = not raw
                    if b"\0" in raw:
                        raise UsageError(f"{path} is a binary file, not text")
                    try:
                        text = carry + decoder.decode(raw, final=final)
                    except UnicodeDecodeError as err:
                        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset "
                                         f"{offset + err.start})") from None
                    offset += len(raw)
                    lines = text.splitlines(keepends=True)
                    # The last piece may continue in the next chunk (or be a '\r' whose '\n'
                    # comes next): carry it, unless the range has ended.
                    carry = "" if final or not lines else lines.pop()
                    if lines:  # each line keeps its end, which split() drops as whitespace
                        if not self.has_words:
                            self.has_words = not all(map(str.isspace, lines))
                        yield lines
                    if final:
                        break
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror}") from None


def read_chunks(path: str) -> Iterator[List[str]]:
    """The whole file's lines, a chunk at a time; UsageError if it holds no word."""
    reader = TextReader(path)
    yield from reader
    if not reader.has_words:
        raise UsageError(f"{path} is empty (no words)")


def part_bounds(path: str, parts: int) -> List[Tuple[int, int]]:
    """Up to `parts` byte ranges of about equal size that cover the file, each cut just
    after a b"\n". A "\n" byte is always the character (UTF-8) and ends a line for
    `splitlines` ("\r\n" included), so the parts' lines are exactly the whole file's."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as fh:
        for i in range(1, parts):
            fh.seek(max(size * i // parts, cuts[-1]))
            while True:
                block = fh.read(1 << 16)
                newline = block.find(b"\n")
                if newline >= 0 or not block:
                    break
            if newline < 0:  # no line end after this point: the rest is one part
                break
            cut = fh.tell() - len(block) + newline + 1
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return list(zip(cuts, cuts[1:]))


def tokens_of(lines: List[str]) -> List[str]:
    tokens: List[str] = []
    for line in lines:
        tokens += line.split()
        tokens.append(EOS)
    return tokens


def encode_part(path: str, start: int, end: int, out_path: str,
                orphaned: Callable[[], bool] = lambda: False):
    """Writes the ids of bytes [start, end) of path to out_path as int32 in this part's own
    provisional numbering (first seen, first numbered) and returns (words in that order,
    their counts (words,) int64, whether the part held a word).

    Counting and encoding run at C speed: a dict with a counting default hands out the
    provisional ids (`map` over `__getitem__`, no per-token Python loop). A module-level
    function, so that worker processes can run it on their part; orphaned() is asked
    once a chunk (a worker stops when the build that started it has ended)."""
    lookup = collections.defaultdict(itertools.count().__next__)
    counts = np.zeros(0, dtype=np.int64)
    reader = TextReader(path, start, end)
    with open(out_path, "wb") as out:
        for lines in reader:
            if orphaned():
                raise UsageError(f"{path}: the build this part was for has ended")
            tokens = tokens_of(lines)
            ids = np.fromiter(map(lookup.__getitem__, tokens), np.int32, len(tokens))
            ids.tofile(out)
            chunk_counts = np.bincount(ids, minlength=len(lookup))
            chunk_counts[:len(counts)] += counts
            counts = chunk_counts
    return list(lookup), counts, reader.has_words


def encode_parts(path: str, out_paths: List[str], bounds: List[Tuple[int, int]]):
    """encode_part on each part, in worker processes when there are several: the per-token
    dict lookups are most of a cold start and run on one core per process. The workers
    are plain `python -m dist_lm.data.cache` processes (not multiprocessing's, which would
    re-import the caller's main module in each) that print their result as JSON."""
    if len(bounds) == 1:
        return [encode_part(path, *bounds[0], out_paths[0])]
    workers = [subprocess.Popen([sys.executable, "-m", "dist_lm.data.cache", path, str(start),
                                 str(end), out, str(os.getpid())], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
               for (start, end), out in zip(bounds, out_paths)]
    try:
        results = []
        for worker in workers:
            out, err = worker.communicate()
            code = worker.returncode
            if code != 0:
                last = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
                how = (f"killed by signal {-code}" if code < 0 else
                       last or f"exit status {code}")
                raise UsageError(last if code == 2 and last else
                                 f"building the corpus cache of {path}: a worker process "
                                 f"failed ({how})")
            result = json.loads(out)
            results.append((result["words"], np.asarray(result["counts"], np.int64),
                            result["has_words"]))
        return results
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _worker(argv: List[str]) -> int:
    path, start, end, out_path, parent = argv
    try:
        words, counts, has_words = encode_part(path, int(start), int(end), out_path,
                                               lambda: os.getppid() != int(parent))
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    json.dump({"words": words, "counts": counts.tolist(), "has_words": has_words},
              sys.stdout)
    return 0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def file_digest(path: str) -> dict:
    try:
        return {"size": os.path.getsize(path), "sha1": hash_file(path, "sha1")}
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None


# --- the cache -------------------------------------------------------------------------------

def cache_root(configured: Optional[str], split_path: str) -> str:
    """--cache-dir, else $DIST_LM_CACHE_DIR, else the default place for split_path."""
    return configured or os.environ.get("DIST_LM_CACHE_DIR") or default_root(split_path)


def default_root(split_path: str) -> str:
    data_dir = os.path.dirname(os.path.abspath(split_path))
    beside = os.path.join(data_dir, ".dist-lm-cache")
    # A data directory without write bits is read-only by intent, even to root.
    if os.stat(data_dir).st_mode & 0o222 and _writable(beside):
        return beside
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".cache")
    return os.path.join(home, "dist-lm")


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            return True
    except OSError:
        return False


class CorpusCache:
    def __init__(self, root: str, parts: Optional[int] = None):
        """parts: how many processes build a training split's ids (default: one per
        MIN_PART_BYTES of text, at most one per usable core; a single part is built in
        this process)."""
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"cache directory {root} is a file")
        if not _writable(root):
            raise UsageError(f"cache directory {root} is not writable (set --cache-dir)")
        self.root, self.parts = root, parts
        self.sources: Dict[str, dict] = {}  # split path -> size and sha1, as `ids` read it

    @contextmanager
    def _lock(self, exclusive: bool):
        with open(os.path.join(self.root, ".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _cached(self, check, build):
        """check() -> the entry or None; under the shared lock first, then, if it must be
        built, under the exclusive lock (where another process may have built it)."""
        with self._lock(exclusive=False):
            found = check()
        if found is not None:
            return found
        with self._lock(exclusive=True):
            found = check()
            if found is not None:
                return found
            # Every staged file is written under this lock: any left is a killed build's.
            for stale in glob.glob(os.path.join(self.root, ".build-*")):
                os.unlink(stale)
            return build()

    # --- vocabulary of a training split ---------------------------------------------------
    def vocab(self, train_path: str, min_freq: int, max_vocab: Optional[int]):
        """The vocabulary of train_path (GluonNLP Vocab), built on first use; the training
        split's ids are written along with it."""
        source = file_digest(train_path)
        key = hashlib.sha256(json.dumps([FORMAT, source, min_freq, max_vocab])
                             .encode()).hexdigest()[:16]
        path = os.path.join(self.root, f"vocab-{key}.json")

        def check():
            return _read_vocab(path, source)

        return self._cached(check, lambda: self._build_train(train_path, source, min_freq,
                                                             max_vocab, path))

    def _build_train(self, train_path, source, min_freq, max_vocab, path):
        import gluonnlp as nlp

        # One part per core: each worker numbers its own part's words; the vocabulary is
        # built from the summed counts (GluonNLP orders by count, then by word, so the
        # order words were first seen in does not matter) and each part's ids are mapped
        # to the final ones with one NumPy gather.
        parts = self.parts or max(1, min(usable_cores(), source["size"] // MIN_PART_BYTES))
        bounds = part_bounds(train_path, parts)
        with contextlib.ExitStack() as stack:
            provisional = [stack.enter_context(_staged(self.root)) for _ in bounds]
            results = encode_parts(train_path, provisional, bounds)
            if not any(has_words for _, _, has_words in results):
                raise UsageError(f"{train_path} is empty (no words)")
            counter = nlp.data.Counter()
            for words, counts, _ in results:
                for word, count in zip(words, counts.tolist()):
                    counter[word] += count
            vocab = nlp.Vocab(counter, max_size=max_vocab, min_freq=min_freq,
                              padding_token=None, bos_token=None, eos_token=EOS)
            finals = [np.asarray(vocab[words], dtype=np.int32) for words, _, _ in results]
            # The form every later load gives (from_json orders token_to_idx its own way),
            # so that a cold and a warm run name, digest and checkpoint the same vocabulary.
            vocab = nlp.Vocab.from_json(vocab.to_json())
            vocab_json = vocab.to_json()

            def write(out):
                for part, final in zip(provisional, finals):
                    _gather(part, final, out)

            self._write_ids(train_path, source, vocab_json, write)
        _write_atomic(self.root, path, json.dumps(
            {"format": FORMAT, "source": source, "vocab": vocab_json}).encode())
        return vocab

    # --- ids of a split under a vocabulary --------------------------------------------------
    def ids(self, split_path: str, vocab) -> np.memmap:
        """The split's ids under vocab, memory-mapped read-only, shape (tokens,). The
        split's size and sha1 are kept in `self.sources[split_path]`."""
        source = file_digest(split_path)
        self.sources[split_path] = source
        vocab_json = vocab.to_json()
        name = self._ids_name(vocab_json, source)

        def check():
            return _map_ids(os.path.join(self.root, name), source)

        def build():
            index, unk = vocab.token_to_idx, vocab.token_to_idx[vocab.unknown_token]

            def write(out):
                for lines in read_chunks(split_path):
                    tokens = tokens_of(lines)
                    np.fromiter(map(index.get, tokens, itertools.repeat(unk)), np.int32,
                                len(tokens)).tofile(out)

            self._write_ids(split_path, source, vocab_json, write)
            return check()

        return self._cached(check, build)

    @staticmethod
    def _ids_name(vocab_json: str, source: dict) -> str:
        v = hashlib.sha256(vocab_json.encode()).hexdigest()[:16]
        return f"ids-{v}-{source['sha1'][:16]}"

    def _write_ids(self, split_path, source, vocab_json, write) -> None:
        name = self._ids_name(vocab_json, source)
        with _staged(self.root) as tmp:
            with open(tmp, "wb") as out:
                write(out)
            size = os.path.getsize(tmp)
            record = {"format": FORMAT, "source": source, "path": os.path.abspath(split_path),
                      "tokens": size // 4, "sha256": hash_file(tmp)}
            _fsync(tmp)
            os.replace(tmp, os.path.join(self.root, name + ".i32"))
        _write_atomic(self.root, os.path.join(self.root, name + ".json"),
                      json.dumps(record).encode())


def _gather(provisional: str, final: np.ndarray, out) -> None:
    if not os.path.getsize(provisional):
        return
    ids = np.memmap(provisional, dtype=np.int32, mode="r")
    step = 1 << 24
    for start in range(0, len(ids), step):
        final[ids[start:start + step]].tofile(out)


def _read_vocab(path: str, source: dict):
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        if record.get("format") != FORMAT or record.get("source") != source:
            raise ValueError("it does not match its source")
        return vocab_from_json(record["vocab"])  # ValueError: damaged
    except (OSError, ValueError, KeyError, TypeError) as err:
        _warn(f"cache entry {path} is damaged ({err}); rebuilding it")
        return None


def _map_ids(stem: str, source: dict) -> Optional[np.memmap]:
    if not os.path.exists(stem + ".json"):
        return None
    try:
        with open(stem + ".json", encoding="utf-8") as fh:
            record = json.load(fh)
        if record.get("format") != FORMAT or record.get("source") != source:
            raise ValueError("its record does not match the source")
        if os.path.getsize(stem + ".i32") != 4 * record["tokens"]:
            raise ValueError("it has the wrong size")
        if hash_file(stem + ".i32") != record["sha256"]:
            raise ValueError("digest mismatch")
        return np.memmap(stem + ".i32", dtype=np.int32, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:
        _warn(f"cache entry {stem}.i32 is damaged ({err}); rebuilding it")
        return None


@contextmanager
def _staged(root: str):
    """A temporary file in root, removed unless the caller renamed it. Created 0666 less
    the umask (mkstemp's 0600 would make the cache unreadable to the teammates who share
    it)."""
    while True:
        tmp = os.path.join(root, f".build-{uuid.uuid4().hex[:12]}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_atomic(root: str, path: str, data: bytes) -> None:
    with _staged(root) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def _warn(message: str) -> None:
    print(f"dist-lm: warning: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # a worker of encode_parts
    sys.exit(_worker(sys.argv[1:]))
