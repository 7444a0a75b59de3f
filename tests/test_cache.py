"""The corpus cache: the same ids and vocabulary as the uncached reading, built once,
verified on every use, rebuilt when stale or damaged, safe with two builders at once."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, TEST, TINY, VALID, WIKITEXT2, data_args, dist_lm
from dist_lm.data import cache as C
from dist_lm.data import text as D
from dist_lm.errors import UsageError


def canonical(vocab):
    """A vocabulary's JSON as every load gives it back (what runs and checkpoints see)."""
    import gluonnlp as nlp

    return nlp.Vocab.from_json(vocab.to_json()).to_json()


def test_the_fast_vocabulary_load_equals_gluonnlps_from_json():
    import gluonnlp as nlp

    text = canonical(D.build_vocab(D.read_tokens(str(WIKITEXT2 / "wiki.train.tokens"))))
    fast, slow = D.vocab_from_json(text), nlp.Vocab.from_json(text)
    assert fast.to_json() == slow.to_json() == text
    words = ["the", "<unk>", "<eos>", "no-such-word", "Valkyria"]
    assert fast[words] == slow[words] and fast.idx_to_token == slow.idx_to_token
    assert (fast.unknown_token, fast.eos_token, fast.padding_token, fast.reserved_tokens) == \
        (slow.unknown_token, slow.eos_token, slow.padding_token, slow.reserved_tokens)
    swapped = text.replace('"the": ', '"the": 1, "x": ', 1)
    with pytest.raises(ValueError):
        D.vocab_from_json(swapped)


def test_ids_and_vocabulary_equal_the_uncached_reading_on_wikitext2(tmp_path):
    cache = C.CorpusCache(str(tmp_path))
    vocab = cache.vocab(str(VALID), 1, None)
    tokens = D.read_tokens(str(VALID))
    assert vocab.to_json() == canonical(D.build_vocab(tokens))
    np.testing.assert_array_equal(cache.ids(str(VALID), vocab), D.encode(tokens, vocab))
    np.testing.assert_array_equal(cache.ids(str(TEST), vocab),
                                  D.encode(D.read_tokens(str(TEST)), vocab))
    small = cache.vocab(str(VALID), 3, 1000)
    assert small.to_json() == canonical(D.build_vocab(tokens, min_freq=3, max_size=1000))
    np.testing.assert_array_equal(cache.ids(str(VALID), small), D.encode(tokens, small))


@pytest.mark.slow
def test_the_full_training_split_equals_the_uncached_reading(tmp_path):
    train = WIKITEXT2 / "wiki.train.tokens"
    cache = C.CorpusCache(str(tmp_path))
    vocab = cache.vocab(str(train), 1, None)
    tokens = D.read_tokens(str(train))
    assert len(vocab) == 33278 and vocab.to_json() == canonical(D.build_vocab(tokens))
    ids = cache.ids(str(train), vocab)
    assert len(ids) == 2088628
    np.testing.assert_array_equal(ids, D.encode(tokens, vocab))


def test_lines_split_as_splitlines_splits_them_across_chunk_boundaries(tmp_path,
                                                                       monkeypatch):
    text = ("a b\r\nc\rd\x0be\x1cf\u2028g h\n\n  \n\x85i\r\n\r\nlast words")
    path = tmp_path / "odd.txt"
    path.write_bytes(text.encode("utf-8"))
    want = D.read_tokens(str(path))
    for chunk in range(1, 12):  # boundaries everywhere, between '\r' and '\n' included
        monkeypatch.setattr(C, "CHUNK_BYTES", chunk)
        got = [t for lines in C.read_chunks(str(path)) for t in C.tokens_of(lines)]
        assert got == want, chunk


def test_parts_cut_only_after_a_newline_and_cover_the_file(tmp_path):
    text = "a b\r\nc\rd\x0be\u2028f\n\n  \n\x85é\r\n\r\nlast words"
    path = tmp_path / "odd.txt"
    path.write_bytes(text.encode("utf-8"))
    data = path.read_bytes()
    for parts in range(1, 12):
        bounds = C.part_bounds(str(path), parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(data) and len(bounds) <= parts
        assert all(a < b for a, b in bounds)
        assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))
        assert all(data[start - 1:start] == b"\n" for start, _ in bounds[1:])
        got = [t for start, end in bounds for lines in C.TextReader(str(path), start, end)
               for t in C.tokens_of(lines)]
        assert got == D.read_tokens(str(path)), parts
    (tmp_path / "one-line.txt").write_text("no line end\rin here")
    assert C.part_bounds(str(tmp_path / "one-line.txt"), 4) == [(0, 19)]


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_a_build_in_parts_equals_the_build_in_one(tmp_path, parts):
    """Worker processes number words in their own order; the result must not show it."""
    one = C.CorpusCache(str(tmp_path / "one"), parts=1)
    many = C.CorpusCache(str(tmp_path / "many"), parts=parts)
    want, got = one.vocab(str(VALID), 1, None), many.vocab(str(VALID), 1, None)
    assert got.to_json() == want.to_json()
    assert len(C.part_bounds(str(VALID), parts)) == parts
    np.testing.assert_array_equal(many.ids(str(VALID), got), one.ids(str(VALID), want))
    np.testing.assert_array_equal(many.ids(str(VALID), got),
                                  D.encode(D.read_tokens(str(VALID)), want))
    assert sorted(os.listdir(tmp_path / "many")) == sorted(os.listdir(tmp_path / "one"))


def test_a_failing_worker_is_one_line_and_leaves_no_process(tmp_path, monkeypatch):
    """The first worker fails; the second, still running then (here it sleeps), is
    killed and reaped, and the error is one line."""
    spawned, real = [], subprocess.Popen

    def popen(cmd, **kwargs):
        if spawned:
            cmd = [sys.executable, "-c", "import time; time.sleep(600)"]
        spawned.append(real(cmd, **kwargs))
        return spawned[-1]

    monkeypatch.setattr(C.subprocess, "Popen", popen)
    outs = [str(tmp_path / "no-such-dir" / "a.i32"), str(tmp_path / "b.i32")]
    with pytest.raises(UsageError, match=r"a worker process failed \(FileNotFoundError") as err:
        C.encode_parts(str(VALID), outs, C.part_bounds(str(VALID), 2))
    assert "\n" not in str(err.value)
    assert [w.returncode for w in spawned] == [1, -signal.SIGKILL]


def test_a_worker_stops_when_the_build_that_started_it_has_ended(tmp_path):
    """A builder killed outright (SIGKILL, an aborting job) runs no cleanup: its workers
    notice that their parent is gone and stop at the next chunk."""
    size = os.path.getsize(VALID)
    proc = subprocess.run([sys.executable, "-m", "dist_lm.data.cache", str(VALID), "0", str(size),
                           str(tmp_path / "part.i32"), str(os.getpid() + 10 ** 6)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"{VALID}: the build this part was for has ended"


def test_a_killed_builds_staged_files_are_removed_by_the_next_build(tmp_path, heldout):
    root = tmp_path / "c"
    cache = C.CorpusCache(str(root))
    (root / ".build-left-by-a-killed-build").write_bytes(b"\0" * 4096)
    cache.ids(str(heldout), cache.vocab(str(heldout), 1, None))
    assert [n for n in os.listdir(root) if n.startswith(".build-")] == []


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"), (b" \n\n\t\n", "is empty"), (b"\n" * 1000, "is empty"),
    (b"caf\xe9\n", "not UTF-8 text"), (b"a\0b\n", "binary file"),
    (b"ok line\n" * 1000 + b"caf\xe9\n", r"not UTF-8 text \(bad byte at offset 8003\)"),
    (b"ok line\n" * 1000 + b"a\0b\n", "binary file")])
def test_bad_files_are_refused(tmp_path, content, message):
    """Also when the bad byte is in the second of two parts, read by a worker process."""
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        C.CorpusCache(str(tmp_path / "cache"), parts=2).vocab(str(path), 1, None)


def entries(root):
    return {n: os.stat(os.path.join(root, n)).st_ino for n in os.listdir(root)
            if not n.startswith(".")}


def test_a_second_use_maps_the_entries_without_rebuilding(tmp_path, heldout):
    root = str(tmp_path / "c")
    cache = C.CorpusCache(root)
    vocab = cache.vocab(str(heldout), 1, None)
    first = cache.ids(str(heldout), vocab)
    built = entries(root)
    assert len(built) == 3  # vocab-*.json, ids-*.i32, ids-*.json
    again = C.CorpusCache(root)
    np.testing.assert_array_equal(again.ids(str(heldout), again.vocab(str(heldout), 1, None)),
                                  first)
    assert entries(root) == built  # the same files: nothing was written again
    assert isinstance(first, np.memmap)


def test_a_changed_source_or_option_gets_new_entries(tmp_path, heldout):
    root = str(tmp_path / "c")
    text = tmp_path / "t.txt"
    text.write_text(heldout.read_text())
    cache = C.CorpusCache(root)
    v1 = cache.vocab(str(text), 1, None)
    cache.ids(str(text), v1)
    v2 = cache.vocab(str(text), 2, None)
    assert len(v2) < len(v1) and len(entries(root)) == 6  # a vocabulary and ids each
    text.write_text(heldout.read_text() + "one more line\n")
    v3 = cache.vocab(str(text), 1, None)
    ids = cache.ids(str(text), v3)
    assert "more" in v3.token_to_idx and len(entries(root)) == 9
    np.testing.assert_array_equal(ids, D.encode(D.read_tokens(str(text)), v3))


@pytest.mark.parametrize("damage", ["flip", "truncate", "record"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, heldout, damage, capsys):
    root = tmp_path / "c"
    cache = C.CorpusCache(str(root))
    vocab = cache.vocab(str(heldout), 1, None)
    want = np.array(cache.ids(str(heldout), vocab))
    (ids_file,) = root.glob("ids-*.i32")
    if damage == "flip":
        data = bytearray(ids_file.read_bytes())
        data[100] ^= 1
        ids_file.write_bytes(bytes(data))
    elif damage == "truncate":
        ids_file.write_bytes(ids_file.read_bytes()[:1000])
    else:
        ids_file.with_suffix(".json").write_text("{not json")
    capsys.readouterr()
    np.testing.assert_array_equal(cache.ids(str(heldout), vocab), want)
    err = capsys.readouterr().err
    assert f"cache entry {ids_file.with_suffix('')}.i32 is damaged" in err, err
    assert "rebuilding it" in err
    np.testing.assert_array_equal(C.CorpusCache(str(root)).ids(str(heldout), vocab), want)


def test_two_processes_building_at_once_build_once_and_agree(tmp_path):
    """Both start on an empty cache; the lock lets one build while the other waits."""
    root, out = tmp_path / "c", tmp_path / "out"
    code = ("import sys, numpy as np\nfrom dist_lm.data.cache import CorpusCache\n"
            "c = CorpusCache(sys.argv[1]); v = c.vocab(sys.argv[2], 1, None)\n"
            "np.save(sys.argv[3], np.array(c.ids(sys.argv[2], v)))\n"
            "print(len(v))\n")
    procs = [subprocess.Popen([BIN / "python", "-c", code, root, VALID,
                               out.with_suffix(f".{i}.npy")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert results[0][0] == results[1][0]
    assert not any("damaged" in err for _, err in results), results
    np.testing.assert_array_equal(np.load(out.with_suffix(".0.npy")),
                                  np.load(out.with_suffix(".1.npy")))
    assert sorted(n.split("-")[0] for n in entries(root)) == ["ids", "ids", "vocab"]


def test_the_default_place_falls_back_when_the_data_directory_is_read_only(
        tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    assert C.default_root(str(data / "x.txt")) == str(data / ".dist-lm-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    data.chmod(0o555)  # no write bits: read-only by intent, root included
    try:
        assert C.default_root(str(data / "x.txt")) == str(tmp_path / "home" / "dist-lm")
    finally:
        data.chmod(0o755)
    real = C._writable
    monkeypatch.setattr(C, "_writable",
                        lambda d: False if str(data) in d else real(d))
    assert C.default_root(str(data / "x.txt")) == str(tmp_path / "home" / "dist-lm")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_unusable_cache_dir_is_one_line_and_exit_2(tmp_path, heldout, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cache_dir = blocker if where == "file" else blocker / "cache"
    proc = dist_lm("train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "1",
                   "--cache-dir", cache_dir, "--run-dir", tmp_path / "run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dist-lm: error: cache directory "
                                                   f"{cache_dir}"), proc.stderr


def test_training_reads_the_cache_and_a_second_run_reuses_it(tmp_path, heldout):
    cache_dir = tmp_path / "cache"
    args = ["train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "2",
            "--log-interval", "1", "--cache-dir", cache_dir]
    first = dist_lm(*args, "--run-dir", tmp_path / "a", timeout=120)
    assert first.returncode == 0, first.stderr
    built = entries(cache_dir)
    second = dist_lm(*args, "--run-dir", tmp_path / "b", timeout=120)
    assert second.returncode == 0, second.stderr
    assert entries(cache_dir) == built
    assert (tmp_path / "a" / "vocab.json").read_text() == \
        (tmp_path / "b" / "vocab.json").read_text() == \
        canonical(D.build_vocab(D.read_tokens(str(heldout))))


def test_a_ranks_columns_are_a_view_of_the_mapped_ids(tmp_path, heldout):
    """Each rank keeps a map of its own columns, not a copy of the corpus."""
    cache = C.CorpusCache(str(tmp_path))
    ids = cache.ids(str(heldout), cache.vocab(str(heldout), 1, None))
    whole = D.layout_columns(np.array(ids), 4, range(0, 4), 35)
    for rank in range(2):
        shard = D.shard_columns(ids, 2, rank, 2, 35)
        assert isinstance(shard.cols, np.memmap) and np.shares_memory(shard.cols, ids)
        for i in (0, shard.num_batches - 1):
            np.testing.assert_array_equal(shard.batch(i)[0],
                                          whole.batch(i)[0][:, 2 * rank:2 * rank + 2])


@pytest.mark.dist
def test_the_scale_bench_runs_on_a_small_synthetic_corpus(tmp_path):
    """The benchmark's plumbing, not its figures: corpora written, every run measured."""
    proc = dist_lm("bench-scale", "--dir", tmp_path, "--tokens", "60000", "--small-tokens",
                   "20000", "--vocab", "1000", "--ranks", "1,2", "--sampled-softmax", "100",
                   "--steps", "2", timeout=900)
    logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("startup-*.log"))}
    assert proc.returncode == 0, (proc.stderr, logs)
    assert len(logs) == 8 and all("[Epoch 0 Batch 1/" in text for text in logs.values())
    out = proc.stdout.splitlines()
    peak = next(line.split() for line in out if line.startswith("peak"))
    assert len(peak) == 3 and all(float(x) > 0 for x in peak[1:])  # full, sampled
    ratios = [line.split() for line in out if "tokens/s" in line and "->" in line]
    assert [r[0] for r in ratios] == ["local", "hvd2-mpi", "exchange"], out
    assert (tmp_path / "bench-sampled+rows.json").exists()
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split()[:1] in (["big"], ["small"])]
    assert [r[:3] for r in rows] == [[corpus, cache, ranks] for ranks in "12"
                                     for corpus in ("big", "small")
                                     for cache in ("cold", "warm")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    vocab = {w for line in (tmp_path / "small.tokens").read_text().splitlines()
             for w in line.split()}
    assert len(vocab) == 1000  # the small corpus keeps the whole vocabulary
