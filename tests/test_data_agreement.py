"""Ranks that read other data than rank 0 stop at start-up, every rank with one line that
names the rank, its host and what differs, and exit 2: no silent training on other text,
no hang blamed on a dead peer."""

import collections
import re
import socket

import pytest

from conftest import BIN, TINY, data_args, launcher, run
from dist_lm.data.corpus import data_mismatch

FLAGS = {"train": "--train-file", "valid": "--data-dir", "test": "--data-dir",
         "vocabulary": "--train-file"}


SHA = {"train": "1" * 40, "valid": "2" * 40}
OTHER_TRAIN = dict(SHA, train="8" * 40)
OTHER_VALID = dict(SHA, valid="9" * 40)


def test_the_same_data_everywhere_is_no_mismatch():
    seen = [("node1", "ab", 10, {"train": 100, "valid": 20}, SHA)] * 3
    assert data_mismatch(seen, FLAGS) is None


def test_a_mismatch_names_the_ranks_their_hosts_and_what_differs():
    same = ("node1", "ab", 10, {"train": 2051910, "valid": 20}, SHA)
    seen = [same, ("node2", "cd", 12, {"train": 2088628, "valid": 20}, OTHER_TRAIN), same,
            ("node4", "cd", 12, {"train": 2088628, "valid": 20}, OTHER_TRAIN),
            ("node5", "ef", 10, {"train": 2051910, "valid": 21}, OTHER_VALID)]
    assert data_mismatch(seen, FLAGS) == (
        "rank 1 on node2, rank 3 on node4 read other data than rank 0 on node1: train split "
        "2,088,628 tokens against 2,051,910, a vocabulary of 12 words against 10; "
        "rank 4 on node5 read other data than rank 0 on node1: valid split 21 tokens "
        "against 20, another vocabulary of the same size (10 words); check --train-file "
        "and --data-dir on those hosts")


def test_a_split_of_as_many_tokens_but_other_text_is_a_mismatch():
    """Same vocabulary, same token counts (a copy with lines in another order): only the
    split's sha1 tells."""
    same = ("node1", "ab", 10, {"train": 100, "valid": 20}, SHA)
    seen = [same, ("node2", "ab", 10, {"train": 100, "valid": 20}, OTHER_VALID)]
    assert data_mismatch(seen, FLAGS) == (
        "rank 1 on node2 read other data than rank 0 on node1: valid split of other content "
        "(20 tokens, sha1 999999999999 against 222222222222); check --data-dir on that host")


def pick_by_rank(tmp_path, rank0_file, rank1_file):
    """A command that trains on rank0_file on rank 0 and on rank1_file on rank 1."""
    script = tmp_path / "train-by-rank.sh"
    script.write_text('#!/bin/sh\n'
                      'if [ "${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}" = 1 ]; then f="$2"; '
                      'else f="$1"; fi\n'
                      'shift 2\n'
                      f'exec {BIN / "dist-lm"} train --train-file "$f" "$@"\n')
    script.chmod(0o755)
    return [script, rank0_file, rank1_file]


def other_copies(tmp_path, heldout):
    """Two other copies of the held-out text: one shorter by its last 20 lines, and one
    with a word seen once replaced by a new word: the same tokens per split and the same
    vocabulary size, only the vocabulary differs (and would train silently)."""
    text = heldout.read_text(encoding="utf-8")
    shorter = tmp_path / "shorter.tokens"
    shorter.write_text("".join(text.splitlines(keepends=True)[:-20]), encoding="utf-8")
    counts = collections.Counter(text.split())
    once = next(w for w, n in counts.items() if n == 1 and w.isalpha())
    assert "xyzzy" not in counts
    reworded = tmp_path / "reworded.tokens"
    reworded.write_text(re.sub(rf"(?<!\S){once}(?!\S)", "xyzzy", text), encoding="utf-8")
    assert len(reworded.read_text(encoding="utf-8").split()) == len(text.split())
    lines = text.splitlines(keepends=True)
    reordered = tmp_path / "reordered.tokens"
    reordered.write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")
    return {"train split": shorter, "vocabulary": reworded, "content": reordered}


def job(controller, tmp_path, heldout, rank1_file):
    return run(launcher(controller, 2, *pick_by_rank(tmp_path, heldout, rank1_file),
                        *data_args(heldout, heldout, heldout)[2:], *TINY,
                        "--batch-size", "5", "--epochs", "1",
                        "--run-dir", tmp_path / "run"), timeout=120)


CONTENT = r"train split of other content \([\d,]+ tokens, sha1 [0-9a-f]{12} against [0-9a-f]{12}\)"


@pytest.mark.dist
@pytest.mark.medium
@pytest.mark.parametrize("what", ["train split", "vocabulary", "content"])
def test_ranks_that_read_other_data_stop_with_one_line_each(what, heldout, tmp_path):
    proc = job("mpi", tmp_path, heldout, other_copies(tmp_path, heldout)[what])
    assert proc.returncode == 2, proc.stderr
    lines = re.findall(r"dist-lm: error: \[rank (\d)\] (.*)", proc.stderr)
    assert sorted(r for r, _ in lines) == ["0", "1"], proc.stderr
    host = socket.gethostname()
    want = {"train split": r"train split [\d,]+ tokens against [\d,]+, a vocabulary of "
                           r"[\d,]+ words against [\d,]+",
            "vocabulary": CONTENT + r", another vocabulary of the same size \([\d,]+ words\)",
            "content": CONTENT}[what]
    for _, line in lines:
        assert re.fullmatch(rf"rank 1 on {re.escape(host)} read other data than rank 0 on "
                            rf"{re.escape(host)}: {want}; check --train-file on that host",
                            line), line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.dist
@pytest.mark.medium
def test_under_horovodrun_gloo_too(heldout, tmp_path):
    proc = job("gloo", tmp_path, heldout, other_copies(tmp_path, heldout)["train split"])
    assert proc.returncode != 0
    lines = re.findall(r"dist-lm: error: \[rank (\d)\] rank 1 on \S+ read other data than "
                       r"rank 0 on \S+: train split", proc.stderr)
    assert sorted(lines) == ["0", "1"], proc.stderr
    assert not re.search(r"\[\d\]<stderr>:Traceback", proc.stderr), proc.stderr
