import gluonnlp as nlp
import mxnet as mx
import numpy as np
import pytest

from dist_lm.data import datasets
from dist_lm.data import text as D
from dist_lm.config import DataConfig
from dist_lm.errors import UsageError

from conftest import TEST, VALID


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("trailing", ["", "\n", "\n\n\n"])
def test_eos_per_line_including_blank_lines(tmp_path, trailing):
    path = write(tmp_path / "c.txt", " = Title = \n\nhello world\n  a  b " + trailing)
    tokens = D.read_tokens(str(path))
    lines = ("x" + trailing).splitlines()
    assert tokens[:9] == ["=", "Title", "=", "<eos>", "<eos>", "hello", "world", "<eos>", "a"]
    assert tokens.count("<eos>") == 3 + len(lines)
    assert tokens[-1] == "<eos>"


def test_reading_matches_gluonnlp_corpus_dataset_on_wikitext():
    # What the reference notebook's WikiText2(skip_empty=False, bos=None, eos='<eos>') reads.
    reference = nlp.data.CorpusDataset(str(VALID), flatten=True, skip_empty=False,
                                       bos=None, eos="<eos>")
    assert D.read_tokens(str(VALID)) == list(reference)


@pytest.mark.parametrize("layout", ["wikitext", "ptb"])
def test_layouts_found_in_data_dir(tmp_path, layout):
    names = datasets.LAYOUTS[layout]
    for name in names:
        write(tmp_path / name, f"{name} text\n")
    splits = datasets.resolve_splits(DataConfig(data_dir=str(tmp_path)))
    assert [splits.train, splits.valid, splits.test] == [str(tmp_path / n) for n in names]


def test_explicit_files_override_data_dir(tmp_path):
    for name in datasets.LAYOUTS["wikitext"]:
        write(tmp_path / name, "x\n")
    other = write(tmp_path / "other.txt", "y\n")
    splits = datasets.resolve_splits(DataConfig(data_dir=str(tmp_path), test_file=str(other)))
    assert splits.test == str(other) and splits.train.endswith("wiki.train.tokens")


def test_missing_split_names_the_file_and_the_way_out(tmp_path):
    write(tmp_path / "wiki.valid.tokens", "x\n")
    write(tmp_path / "wiki.test.tokens", "x\n")
    with pytest.raises(UsageError, match=r"train split .*wiki\.train\.tokens: no such file.*"
                                         r"--train-file.*--download wikitext-2"):
        datasets.resolve_splits(DataConfig(data_dir=str(tmp_path)))


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"), (b" \n\n \n", "is empty"), (b"caf\xe9 au lait\n", "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\0\0\0", "binary"),
])
def test_bad_corpus_files(tmp_path, content, message):
    path = write(tmp_path / "bad.txt", content, mode="wb")
    with pytest.raises(UsageError, match=message):
        D.read_tokens(str(path))


def test_vocab_matches_the_notebook_and_is_deterministic():
    tokens = D.read_tokens(str(VALID))
    vocab = D.build_vocab(tokens)
    assert vocab.idx_to_token[:2] == ["<unk>", "<eos>"]
    assert vocab.padding_token is None and vocab.bos_token is None
    assert len(vocab) == len(set(tokens) | {"<unk>"})
    again = D.vocab_from_json(D.build_vocab(list(tokens)).to_json())
    assert again.idx_to_token == vocab.idx_to_token
    small = D.build_vocab(tokens, min_freq=3, max_size=1000)
    assert len(small) == 1000 + 2
    counts = nlp.data.Counter(tokens)
    assert all(counts[w] >= 3 for w in small.idx_to_token[2:])


def test_batchify_equals_gluonnlp_corpus_bptt_batchify():
    tokens = D.read_tokens(str(TEST))
    vocab = D.build_vocab(tokens)
    reference = nlp.data.batchify.CorpusBPTTBatchify(vocab, 35, 20, last_batch="discard")
    expected = list(reference(mx.gluon.data.SimpleDataset(tokens)))
    shard = D.shard_columns(D.encode(tokens, vocab), 20, rank=0, ranks=1, bptt=35)
    assert shard.num_batches == len(expected)
    for i in (0, 1, len(expected) - 1):
        data, target = shard.batch(i)
        assert data.shape == target.shape == (35, 20)
        np.testing.assert_array_equal(data, expected[i][0].asnumpy())
        np.testing.assert_array_equal(target, expected[i][1].asnumpy())


def test_targets_are_inputs_shifted_by_one_across_batch_boundaries():
    ids = np.arange(1000, dtype=np.int32)
    shard = D.shard_columns(ids, 4, rank=0, ranks=1, bptt=7)
    flat_in = np.concatenate([shard.batch(i)[0] for i in range(shard.num_batches)])
    flat_tg = np.concatenate([shard.batch(i)[1] for i in range(shard.num_batches)])
    np.testing.assert_array_equal(flat_in[1:], flat_tg[:-1])
    # Column c is the contiguous slice ids[c*L:(c+1)*L], L = 1000 // 4.
    np.testing.assert_array_equal(flat_in[:, 2], np.arange(500, 500 + len(flat_in)))


@pytest.mark.parametrize("ranks,columns", [(2, 3), (3, 2), (4, 5)])
def test_rank_shards_are_the_columns_of_one_big_batch(ranks, columns):
    ids = np.random.RandomState(0).randint(0, 50, size=9973).astype(np.int32)
    whole = D.shard_columns(ids, ranks * columns, 0, 1, bptt=11)
    parts = [D.shard_columns(ids, columns, r, ranks, bptt=11) for r in range(ranks)]
    assert {p.num_batches for p in parts} == {whole.num_batches}
    for i in range(whole.num_batches):
        np.testing.assert_array_equal(np.hstack([p.batch(i)[0] for p in parts]),
                                      whole.batch(i)[0])


def test_corpus_too_small_for_one_batch():
    with pytest.raises(UsageError, match="too few for one batch"):
        D.shard_columns(np.arange(100, dtype=np.int32), 20, 0, 1, bptt=35)


def test_download_refuses_an_archive_with_the_wrong_digest(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading
    import zipfile

    served = tmp_path / "served" / "gluon" / "dataset" / "wikitext-2"
    served.mkdir(parents=True)
    with zipfile.ZipFile(served / "wikitext-2-v1.zip", "w") as zf:
        zf.write(VALID, "wikitext-2/wiki.valid.tokens")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MXNET_GLUON_REPO", f"http://127.0.0.1:{server.server_port}/")
        target = tmp_path / "data"
        with pytest.raises(UsageError, match="wikitext-2"):
            datasets.resolve_splits(DataConfig(data_dir=str(target), download="wikitext-2"))
        assert not list(target.glob("wiki.*")), "nothing unverified may be left behind"
    finally:
        server.shutdown()


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(UsageError, match="cannot download wikitext-2 .* by hand"):
        datasets.resolve_splits(DataConfig(data_dir=str(tmp_path / "d"), download="wikitext-2"))


def test_nd_roundtrip_keeps_ids_exact():
    ids = np.array([0, 1, 33277, 2 ** 24], dtype=np.int32)
    assert mx.nd.array(ids, dtype=np.float32).asnumpy().astype(np.int64).tolist() == \
        ids.tolist()
