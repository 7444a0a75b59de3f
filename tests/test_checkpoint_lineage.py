"""The line of checkpoints a run directory holds: a rollback to an earlier checkpoint moves
the later ones aside (never deletes them) and the run goes on along the new line; every
checkpoint write removes the half-written ones a crash left.

One process, in-process `main`, the tiny model trained on the held-out text: 37 steps an
epoch, so two epochs give two validations (best.params at steps 37 and 74).
"""

import json
import os
import re
from pathlib import Path

import pytest

from conftest import TINY, data_args, max_param_diff
from dist_lm.training.checkpoint import Checkpoint, list_checkpoints, start_line, verify
from dist_lm.cli import main

RECIPE = [*TINY, "--epochs", "2", "--log-interval", "5", "--lr", "1"]


def train(heldout, run_dir, *extra):
    code = main(["train", *data_args(heldout, heldout, heldout), *RECIPE,
                 "--run-dir", str(run_dir), *map(str, extra)])
    assert code == 0
    return code


def steps_in(directory):
    return [int(Path(p).name.split("-")[1]) for p in list_checkpoints(directory)]


def digests(directory):
    """Every checkpoint's recorded file digests (each verified), by name."""
    return {Path(p).name: verify(p).meta["files"] for p in list_checkpoints(directory)}


@pytest.mark.medium
def test_a_rollback_moves_the_later_line_aside_and_auto_resume_follows_the_new_one(
        heldout, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    train(heldout, run_dir, "--checkpoint-steps", "10", "--keep-checkpoints", "20")
    assert steps_in(ckpts) == [10, 20, 30, 37, 40, 50, 60, 70, 74]
    before = digests(ckpts)
    del before["step-000000010"]
    files = {name: (run_dir / name).read_bytes() for name in ("best.params", "final.params")}
    capsys.readouterr()

    # Roll back to step 10 by path; the new line checkpoints every 5 steps, keeps 2.
    train(heldout, run_dir, "--resume", ckpts / "step-000000010", "--checkpoint-steps", "5",
          "--keep-checkpoints", "2", "--max-steps", "25")
    err = capsys.readouterr().err
    (aside,) = (ckpts / "abandoned").iterdir()
    assert re.fullmatch(r"after-step-000000010-\d{8}T\d{6}Z", aside.name)
    notes = [line for line in err.splitlines() if line.startswith("dist-lm: note:")]
    assert notes == [f"dist-lm: note: resuming from step 10 leaves the later line of this "
                     f"run: moved its 8 checkpoints (steps 20 to 74), best.params, "
                     f"final.params to {aside} (nothing deleted); --resume auto now follows "
                     f"the new line"], err
    assert steps_in(ckpts) == [20, 25]  # the new line's newest two, not the old 70 and 74
    assert digests(aside) == before     # the old line intact, every digest checked
    assert {name: (aside / name).read_bytes() for name in files} == files
    assert not (run_dir / "best.params").exists()  # the new line has no validation yet
    assert max_param_diff(run_dir / "final.params", aside / "final.params") > 0  # step 25

    train(heldout, run_dir, "--resume", "auto", "--checkpoint-steps", "10",
          "--keep-checkpoints", "2")
    out, err = capsys.readouterr()
    assert "dist-lm: note:" not in err  # continuing the newest moves nothing
    first = re.search(r"\[Epoch 0 Batch (\d+)/37\]", out)
    assert first and first.group(1) == "30", out  # resumed from the new line's step 25
    assert steps_in(ckpts) == [70, 74]
    assert digests(aside) == before
    # The same recipe from step 10 again: the new line ends where the old one did.
    assert max_param_diff(run_dir / "final.params", aside / "final.params") == 0.0
    assert max_param_diff(run_dir / "best.params", aside / "best.params") == 0.0


@pytest.mark.medium
def test_a_checkpoint_write_removes_every_half_written_checkpoint(heldout, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    train(heldout, run_dir, "--max-steps", "5")
    # Left by writes that died (a killed rank, an out-of-memory kill), at other steps.
    for name in (".tmp-step-000000003", ".tmp-step-000000999"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.params").write_bytes(b"half")
    kept = ckpts / "abandoned" / "after-step-000000001-20250101T000000Z" / "step-000000002"
    kept.mkdir(parents=True)
    train(heldout, run_dir, "--resume", "auto", "--max-steps", "10")
    assert sorted(os.listdir(ckpts)) == ["abandoned", "step-000000005", "step-000000010"]
    assert kept.is_dir()
    assert "dist-lm: note:" not in capsys.readouterr().err


# --- which files go with the abandoned line (checkpoints made by hand, no training) ---------

def fake_checkpoint(directory, step, best_step, written, files="a"):
    path = directory / f"step-{step:09d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps(
        {"step": step, "progress": {"best_step": best_step}, "files": {"x": files}}))
    os.utime(path / "meta.json", (written, written))
    return path


def found(path):
    """The checkpoint as find_resume returns it (its meta.json)."""
    return Checkpoint(str(path), json.loads((path / "meta.json").read_text()))


def test_best_params_stays_when_the_abandoned_line_found_no_better_and_final_moves(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, written in [(10, 100), (20, 200), (30, 300), (40, 400)]:
        fake_checkpoint(ckpts, step, 10, written)
    for name, written in [("best.params", 150), ("final.params", 450)]:
        (tmp_path / name).write_bytes(name.encode())
        os.utime(tmp_path / name, (written, written))
    resumed = found(ckpts / "step-000000020")
    aside = start_line(str(ckpts), resumed, str(tmp_path / "best.params"),
                       str(tmp_path / "final.params"))
    assert sorted(os.listdir(aside)) == ["final.params", "step-000000030", "step-000000040"]
    assert steps_in(ckpts) == [10, 20] and (tmp_path / "best.params").is_file()
    assert start_line(str(ckpts), resumed, str(tmp_path / "best.params"),
                      str(tmp_path / "final.params")) is None  # nothing later any more


def test_a_checkpoint_from_elsewhere_moves_the_one_at_its_step_too(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        fake_checkpoint(ckpts, step, 10, 100 * step, files="this run")
    (tmp_path / "run" / "best.params").write_bytes(b"best of step 10")
    os.utime(tmp_path / "run" / "best.params", (150, 150))
    other = fake_checkpoint(tmp_path / "other", 20, 20, 500, files="another run")
    resumed = found(other)
    aside = start_line(str(ckpts), resumed, str(tmp_path / "run" / "best.params"),
                       str(tmp_path / "run" / "final.params"))
    # best.params was written before step 20's checkpoint, but at that line's best step
    # (10), not at the resumed one's (20).
    assert sorted(os.listdir(aside)) == ["best.params", "step-000000020"]
    assert steps_in(ckpts) == [10]


@pytest.mark.medium
def test_checkpoints_of_a_line_resumed_past_a_damaged_newest_one_are_kept(
        heldout, tmp_path, capsys):
    """`--resume auto` falls back past a damaged newest checkpoint, which stays where it
    is. The new line's checkpoints come before it by step: pruning must not count it
    among the newest `keep` and delete them (with --keep-checkpoints 1 the new line would
    keep none, and the next resume would start the run over)."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    train(heldout, run_dir, "--checkpoint-steps", "10", "--max-steps", "30")
    assert steps_in(ckpts) == [10, 20, 30]
    damaged = ckpts / "step-000000030" / "model.params"
    damaged.write_bytes(damaged.read_bytes()[:100])

    train(heldout, run_dir, "--resume", "auto", "--checkpoint-steps", "5",
          "--keep-checkpoints", "1", "--max-steps", "25")
    err = capsys.readouterr().err
    assert "step-000000030: model.params is damaged" in err
    assert steps_in(ckpts) == [25, 30]  # the new line's newest, and the damaged one

    train(heldout, run_dir, "--resume", "auto", "--max-steps", "35")
    out = capsys.readouterr().out
    first = re.search(r"\[Epoch 0 Batch (\d+)/37\]", out)
    assert first and first.group(1) == "30", out  # resumed from step 25, not from 0
