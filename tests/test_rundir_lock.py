"""One job per run directory: a second job is refused with one line naming the holder,
and leaves the first one's files alone; a killed holder's lock file blocks nobody; reading
a run directory in use (generate, report) still works."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from conftest import BIN, TINY, VALID, data_args, dist_lm, launcher, run, start, wait_for
from dist_lm.training.checkpoint import list_checkpoints, verify
from dist_lm.errors import UsageError
from dist_lm.runtime.procs import kill_session
from dist_lm.training.rundir import QuietRunDir, RunDir, make_run_dir


def in_use(run_dir, pid):
    """The refusal's text, naming a holder on this host."""
    return (rf"run directory {re.escape(str(run_dir))} is in use by another job "
            rf"\(host {re.escape(socket.gethostname())}, pid {pid}, since "
            rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); stop it or choose another --run-dir")


def test_a_locked_run_directory_refuses_a_second_writer_until_released(tmp_path):
    first = make_run_dir(str(tmp_path), is_root=True)
    with pytest.raises(UsageError, match=in_use(tmp_path, os.getpid())):
        RunDir(str(tmp_path))
    assert isinstance(make_run_dir(str(tmp_path), is_root=False), QuietRunDir)  # no lock
    first.release()
    RunDir(str(tmp_path)).release()


def test_the_lock_of_a_killed_holder_blocks_no_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom dist_lm.training.rundir import RunDir\n"
                               f"RunDir({str(tmp_path)!r})\nprint('locked', flush=True)\n"
                               "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UsageError, match=in_use(tmp_path, holder.pid)):
            RunDir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / ".lock").read_text()  # left behind
    RunDir(str(tmp_path)).release()


def train_args(heldout, run_dir, *extra):
    return ["train", *data_args(VALID, heldout, heldout), *TINY, "--log-interval", "10",
            "--run-dir", run_dir, *extra]


def snapshot(run_dir):
    """What a second job must not change: the metrics and the checkpoints."""
    return ((run_dir / "metrics.jsonl").read_bytes(),
            {p: verify(p).meta["files"] for p in list_checkpoints(run_dir / "checkpoints")})


@pytest.mark.medium
def test_a_second_job_in_a_run_directory_in_use_is_refused(heldout, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    first = start([BIN / "dist-lm", *train_args(heldout, run_dir, "--epochs", "1000",
                                                "--checkpoint-steps", "10")], log)
    try:
        wait_for(log, r"Batch 30/", first)
        os.kill(first.pid, signal.SIGSTOP)  # its files stay as they are, its lock held
        before = snapshot(run_dir)
        assert before[1], "no checkpoint yet"
        second = dist_lm(*train_args(heldout, run_dir, "--resume", "auto"), timeout=120)
        assert second.returncode == 5, second.stderr
        assert re.fullmatch(rf"dist-lm: error: {in_use(run_dir, first.pid)}\n",
                            second.stderr), second.stderr
        assert snapshot(run_dir) == before

        newest = list_checkpoints(run_dir / "checkpoints")[-1]
        sample = dist_lm("generate", "--run-dir", run_dir, "--params",
                         os.path.join(newest, "model.params"), "--words", "5", timeout=120)
        assert sample.returncode == 0, sample.stderr
        report = dist_lm("report", run_dir, "--out", tmp_path / "report.png", timeout=120)
        assert report.returncode == 0, report.stderr
    finally:
        kill_session(first.pid)
    first.wait()
    step = verify(newest).meta["step"]
    again = dist_lm(*train_args(heldout, run_dir, "--resume", "auto", "--max-steps",
                                str(step + 5)), timeout=300)
    assert again.returncode == 0, again.stderr
    assert verify(list_checkpoints(run_dir / "checkpoints")[-1]).meta["step"] == step + 5


@pytest.mark.dist
@pytest.mark.medium
def test_at_two_ranks_the_refusal_is_one_line_on_every_rank(heldout, tmp_path):
    run_dir = tmp_path / "run"
    holder = make_run_dir(str(run_dir), is_root=True)  # as a job's rank 0 holds it
    try:
        proc = run(launcher("mpi", 2, BIN / "dist-lm", *train_args(
            heldout, run_dir, "--batch-size", "10", "--max-steps", "5")), timeout=120)
        listed = sorted(os.listdir(run_dir))
    finally:
        holder.release()
    assert proc.returncode == 5, proc.stderr
    errors = re.findall(r"^dist-lm: error: \[rank (\d)\] (.*)$", proc.stderr, re.M)
    assert sorted(r for r, _ in errors) == ["0", "1"], proc.stderr
    assert all(re.fullmatch(r"(rank 0: )?" + in_use(run_dir, os.getpid()), e)
               for _, e in errors), proc.stderr
    assert "Traceback" not in proc.stderr
    assert listed == [".lock"]  # nothing written, nothing truncated
    assert os.listdir(run_dir) == []  # the holder removed its lock file as it released it
