"""The settings whose numbers depend on the rank count N (`Config.world_size_dependence`):
the elastic supervisor refuses them unless told to accept them, and a training run
records and says whether it has any."""

from __future__ import annotations

import json

import pytest

from conftest import BIN, TINY, data_args, parse_config, run
from dist_lm.cli import main

# Each setting, the words of its reason, and the flags a run needs besides it.
SETTINGS = [
    (["--clip-mode", "local"], "--clip-mode local (each rank clips its own gradient"),
    (["--lr-scaling", "linear"], "--lr-scaling linear (the lr is scaled with the rank"),
    (["--lr-scaling", "sqrt"], "--lr-scaling sqrt (the lr is scaled with the rank"),
    (["--fp16-allreduce"], "--fp16-allreduce (each rank's gradient is rounded to float16"),
]


def test_a_global_batch_with_default_settings_is_invariant():
    assert parse_config("--global-batch-size", "20").world_size_dependence() == []
    # The AWD recipe brings its own global batch of 80 columns.
    assert parse_config("--model", "awd_lstm_lm_600").world_size_dependence() == []
    assert parse_config().world_size_dependence() == \
        ["no --global-batch-size (the global batch is ranks x --batch-size)"]


@pytest.mark.parametrize("flags,words", SETTINGS)
def test_each_setting_is_a_reason(flags, words):
    (reason,) = parse_config("--global-batch-size", "20", *flags).world_size_dependence()
    assert reason.startswith(words)


def launch(*flags, train=()):
    """`dist-lm launch` in elastic mode with a discovery script that lists no host: a
    command it accepts waits --elastic-timeout for hosts, then ends with exit 1."""
    return run([BIN / "dist-lm", "launch", "--host-discovery-script", "/bin/true",
                "--elastic-timeout", "0.2", *flags, "mpirun", "dist-lm", "train",
                "--resume", "auto", *train], timeout=60)


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def accepted(proc) -> bool:
    """The supervisor took the command and looked for hosts (exit 1: there were none)."""
    return proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "dist-lm: error: job failed: fewer than --min-np 1 slots usable")


@pytest.mark.parametrize("flags,words", SETTINGS)
def test_the_elastic_supervisor_refuses_each_setting_unless_told(flags, words):
    refused = launch(train=["--global-batch-size", "4", *flags])
    assert refused.returncode == 2, refused.stderr
    line = one_line(refused)
    assert line.startswith(f"dist-lm: error: the training command's {words}"), line
    assert line.endswith("elastic mode changes between worlds; pass "
                         "--allow-world-size-dependence to run it anyway"), line
    proc = launch("--allow-world-size-dependence", train=["--global-batch-size", "4", *flags])
    assert accepted(proc), proc.stderr


def test_every_reason_is_named_in_the_one_line():
    line = one_line(launch(train=["--global-batch-size", "4", "--clip-mode", "local",
                                  "--fp16-allreduce"]))
    assert "--clip-mode local (" in line and "--fp16-allreduce (" in line, line


def test_no_global_batch_is_refused_even_with_the_flag():
    """Each world's G would be its own N x --batch-size, and a checkpoint resumes only
    with the global batch it was trained with: the flag cannot make that work."""
    for flags in ([], ["--allow-world-size-dependence"]):
        proc = launch(*flags, train=["--batch-size", "4"])
        assert proc.returncode == 2, proc.stderr
        assert "elastic mode needs the training command's --global-batch-size G" in \
            one_line(proc)


def test_a_global_batch_from_a_config_file_or_recipe_is_read(tmp_path):
    """The supervisor reads the training command as the ranks do, not only its flags."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"run": {"global_batch_size": 4},
                                  "optim": {"clip_mode": "local"}}))
    proc = launch(train=["--config", config])
    assert proc.returncode == 2 and "--clip-mode local (" in one_line(proc), proc.stderr
    proc = launch(train=["--model", "awd_lstm_lm_600"])  # the AWD recipe's 80 columns
    assert accepted(proc), proc.stderr


def test_the_flag_needs_elastic_mode():
    proc = run([BIN / "dist-lm", "launch", "--allow-world-size-dependence", "mpirun",
                "dist-lm", "train"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--allow-world-size-dependence needs --host-discovery-script" in one_line(proc)


@pytest.mark.parametrize("flags,reasons", [
    (["--global-batch-size", "4"], []),
    (["--batch-size", "4", "--clip-mode", "local"],
     ["no --global-batch-size", "--clip-mode local"]),
])
def test_a_run_records_and_says_whether_it_depends_on_the_rank_count(
        flags, reasons, heldout, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *data_args(heldout, heldout, heldout), *TINY, "--epochs", "1",
                 "--max-steps", "1", "--run-dir", str(run_dir), *flags]) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["world_size_invariant"] is (not reasons)
    assert [r.split(" (")[0] for r in record["world_size_dependence"]] == reasons
    said = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("The numbers ")]
    if reasons:
        assert said == ["The numbers depend on the rank count: "
                        + "; ".join(record["world_size_dependence"])]
    else:
        assert said == ["The numbers do not depend on the rank count: each step is the one "
                        "process with the 4 global columns takes"]
