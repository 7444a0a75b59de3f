"""What a resume checks besides the model: the data a checkpoint was trained on (each
split's sha1 and token count in meta.json), and meta.json itself (its own digest).

One process, in-process `main`, the tiny model on the held-out text: a run of a few
steps takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from conftest import TINY, data_args
from dist_lm.cli import main
from dist_lm.training.checkpoint import (META_DIGEST, find_resume, list_checkpoints, verify,
                                         write_checkpoint)

RECIPE = [*TINY, "--epochs", "1", "--log-interval", "2", "--lr", "1"]


def train(run_dir, train_file, valid_file, *extra) -> int:
    return main(["train", *data_args(train_file, valid_file, valid_file), *RECIPE,
                 "--run-dir", str(run_dir), *map(str, extra)])


def sha1(path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def snapshot(run_dir: Path) -> dict:
    """Every file of a run directory and its bytes, but the lock (which names its holder)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def splits(heldout, tmp_path_factory):
    """A training and a validation text, and copies of other content: the same lines in
    reverse order (as many tokens, the same vocabulary: it counts words) and the first
    half of the lines (another vocabulary)."""
    folder = tmp_path_factory.mktemp("splits")
    lines = Path(heldout).read_text(encoding="utf-8").splitlines(keepends=True)
    files = {"train": lines, "valid": lines[:150], "train-reversed": lines[::-1],
             "train-half": lines[:200], "valid-reversed": lines[:150][::-1]}
    for name, text in files.items():
        (folder / name).write_text("".join(text), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def paused(splits, tmp_path_factory):
    """A run paused by --max-steps at step 3, inside its epoch, with a checkpoint there."""
    run_dir = tmp_path_factory.mktemp("paused") / "run"
    assert train(run_dir, splits / "train", splits / "valid", "--max-steps", "3") == 0
    return run_dir


@pytest.mark.parametrize("split,train_file,valid_file", [
    ("train", "train-reversed", "valid"),   # the same vocabulary, other text
    ("train", "train-half", "valid"),       # another vocabulary too
    ("valid", "train", "valid-reversed"),   # the plateau decision's split
])
def test_a_resume_on_other_data_is_refused_with_one_line_and_writes_nothing(
        split, train_file, valid_file, splits, paused, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(paused, run_dir)
    before = snapshot(run_dir)
    capsys.readouterr()
    code = train(run_dir, splits / train_file, splits / valid_file, "--resume", "auto",
                 "--max-steps", "6")
    out, err = capsys.readouterr()
    assert code == 2, err
    then, now = (splits / "train", splits / train_file) if split == "train" else \
        (splits / "valid", splits / valid_file)
    tokens = r"\(\d{1,3}(,\d{3})* tokens\)"
    assert re.fullmatch(
        rf"dist-lm: error: checkpoint at step 3 was trained on other data: its {split} split "
        rf"has sha1 {sha1(then)} {tokens}, this run's {sha1(now)} {tokens}; resume it with "
        rf"the data it was trained on, or start in another --run-dir\n", err), err
    assert snapshot(run_dir) == before  # no checkpoint, no metrics, no run files written
    assert "Batch" not in out


def test_the_checkpoint_records_each_split(splits, paused):
    (newest,) = list_checkpoints(paused / "checkpoints")
    meta = verify(newest).meta
    words = len((splits / "valid").read_text(encoding="utf-8").split())
    lines = len((splits / "valid").read_text(encoding="utf-8").splitlines())
    assert meta["data"]["valid"] == {"sha1": sha1(splits / "valid"), "tokens": words + lines}
    assert meta["data"]["train"]["sha1"] == sha1(splits / "train")
    assert meta["data"]["test"] == meta["data"]["valid"]
    assert meta["layout"]["batches_per_epoch"] > 3


def strip_to_earlier(checkpoint: Path) -> None:
    """Makes a checkpoint's meta.json as an earlier dist-lm wrote it: no data, no digest."""
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["data"], meta[META_DIGEST]
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))


def test_a_checkpoint_of_an_earlier_version_resumes_with_a_warning(
        splits, paused, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(paused, run_dir)
    strip_to_earlier(Path(list_checkpoints(run_dir / "checkpoints")[-1]))
    capsys.readouterr()
    assert train(run_dir, splits / "train", splits / "valid", "--resume", "auto",
                 "--max-steps", "4") == 0
    err = capsys.readouterr().err
    assert "dist-lm: warning: the checkpoint at step 3 was written by an earlier dist-lm, " \
           "which recorded no digests of its data: resuming without checking that this " \
           "run's splits are the ones it was trained on\n" in err, err


def test_an_earlier_checkpoint_on_a_training_split_of_other_length_is_refused(
        splits, paused, tmp_path, capsys):
    """Without digests, the batches per epoch still tell a training split of another
    length, under the same vocabulary (here: the text twice over)."""
    doubled = tmp_path / "doubled"
    doubled.write_text((splits / "train").read_text(encoding="utf-8") * 2, encoding="utf-8")
    run_dir = tmp_path / "run"
    shutil.copytree(paused, run_dir)
    strip_to_earlier(Path(list_checkpoints(run_dir / "checkpoints")[-1]))
    capsys.readouterr()
    assert train(run_dir, doubled, splits / "valid", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"dist-lm: error: checkpoint at step 3 was trained on a training "
                        r"split of (\d+) batches per epoch; this run's has (\d+): other data\. "
                        r"Resume it with the data it was trained on, or start in another "
                        r"--run-dir\n", err), err


# --- meta.json's own digest ---------------------------------------------------------------

def tiny_checkpoints(directory: Path, steps) -> list:
    model = mx.gluon.nn.Dense(3, in_units=2)
    model.initialize()
    for step in steps:
        write_checkpoint(str(directory), step, model, {}, [np.zeros((1, 2, 3), np.float32)],
                         {"progress": {"epoch": 0, "batch": step, "step": step}}, keep=5,
                         protect=None)
    return list_checkpoints(str(directory))


@pytest.mark.parametrize("change", [
    lambda text: text.replace('"batch": 2,', '"batch": 7,'),   # a digit changed, valid JSON
    lambda text: text.replace('"step": 2', '"step": 1'),
])
def test_a_damaged_meta_json_is_a_damaged_checkpoint(change, tmp_path, capsys):
    first, newest = tiny_checkpoints(tmp_path, [1, 2])
    meta_path = Path(newest) / "meta.json"
    damaged = change(meta_path.read_text())
    assert damaged != meta_path.read_text()
    meta_path.write_text(damaged)
    with pytest.raises(Exception, match=r"meta\.json is damaged \(digest mismatch\)"):
        verify(newest)
    # --resume auto falls back past it, as past any damaged file.
    assert find_resume("auto", str(tmp_path), strict=False).path == first
    assert "meta.json is damaged" in capsys.readouterr().err
    with pytest.raises(Exception, match="meta.json is damaged"):
        find_resume("auto", str(tmp_path), strict=True)


def test_meta_json_without_its_digest_still_verifies(tmp_path):
    """An earlier dist-lm's checkpoint: its other files are checked as before."""
    (only,) = tiny_checkpoints(tmp_path, [1])
    meta_path = Path(only) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta[META_DIGEST]
    del meta[META_DIGEST]
    meta_path.write_text(json.dumps(meta))
    assert verify(only).meta["step"] == 1
