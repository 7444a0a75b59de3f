"""A checkpoint write longer than --watchdog-s (slow shared storage, a large optimizer
state) is progress: the job goes on, a stop signal during it still ends in the stop
checkpoint, and --checkpoint-timeout-s bounds it instead.

The slow storage is simulated from outside the product: a sitecustomize.py on PYTHONPATH
makes rank 0's checkpoint writes sleep first, and shortens the stop grace (30 s) so that
the test takes seconds."""

import os
import re
import signal
import time

import pytest

from conftest import BIN, TINY, data_args, launcher, run, start, wait_for
from dist_lm.training.checkpoint import list_checkpoints, verify
from dist_lm.runtime.procs import kill_session
from test_reliability import rank_pid

WRITE_S = 6     # each checkpoint write on rank 0
GRACE_S = 2     # the watchdog's stop grace in these jobs

SLOW_STORAGE = f"""
import os
import time

from dist_lm.runtime import lifecycle
from dist_lm.training import rundir

_write = rundir.RunDir.save_checkpoint  # rank 0's; other ranks have a QuietRunDir


def _slow_write(self, *args, **kwargs):
    print("slow checkpoint write begins", flush=True)
    time.sleep({WRITE_S})
    return _write(self, *args, **kwargs)


_init = lifecycle.Watchdog.__init__


def _short_grace(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.stop_grace = {GRACE_S}


rundir.RunDir.save_checkpoint = _slow_write
lifecycle.Watchdog.__init__ = _short_grace
"""


@pytest.fixture
def slow_storage(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_STORAGE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def job(heldout, run_dir, *extra, ranks=2):
    """`dist-lm train` at `ranks` ranks under mpirun (which passes PYTHONPATH on)."""
    cmd = [BIN / "dist-lm", "train", *data_args(heldout, heldout, heldout), *TINY,
           "--global-batch-size", "20", "--epochs", "1", "--log-interval", "5",
           "--run-dir", run_dir, *extra]
    if ranks == 1:
        return cmd
    wrapped = launcher("mpi", ranks, *cmd)
    return [wrapped[0], "-x", "PYTHONPATH", *wrapped[1:]]


def steps_of(run_dir):
    return [verify(p).meta["step"] for p in list_checkpoints(run_dir / "checkpoints")]


def test_a_wait_declared_to_the_watchdog_has_its_own_limit():
    code = ("import time\nfrom dist_lm.runtime.lifecycle import Watchdog\n"
            "with Watchdog(1.0) as w:\n"
            "    with w.waiting('the checkpoint write', 5, '--checkpoint-timeout-s'):\n"
            "        time.sleep(2.5)\n"
            "    print('written', flush=True)\n"
            "    with w.waiting('the checkpoint write', 2, '--checkpoint-timeout-s'):\n"
            "        time.sleep(30)\n")
    started = time.time()
    proc = run([BIN / "python", "-c", code], timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == "written\n"
    assert time.time() - started < 15
    assert re.fullmatch(r"dist-lm: error: the checkpoint write has not finished after [23]s "
                        r"\(--checkpoint-timeout-s 2\): .*; exiting\n", proc.stderr), proc.stderr


@pytest.mark.dist
@pytest.mark.medium
def test_a_checkpoint_write_longer_than_the_watchdog_limit_is_progress(
        heldout, tmp_path, slow_storage):
    run_dir = tmp_path / "run"
    proc = run(job(heldout, run_dir, "--max-steps", "10", "--watchdog-s", "3"), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("slow checkpoint write begins") == 1
    assert steps_of(run_dir) == [10]
    assert (run_dir / "final.params").is_file()


@pytest.mark.medium
def test_a_checkpoint_write_longer_than_its_own_limit_ends_the_job(
        heldout, tmp_path, slow_storage):
    proc = run(job(heldout, tmp_path / "run", "--max-steps", "10", "--watchdog-s", "3",
                   "--checkpoint-timeout-s", "2", ranks=1), timeout=180)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert re.search(r"^dist-lm: error: the checkpoint write has not finished after [23]s "
                     r"\(--checkpoint-timeout-s 2\)", proc.stderr, re.M), proc.stderr


@pytest.mark.dist
@pytest.mark.medium
def test_a_stop_signal_during_a_long_checkpoint_write_ends_in_the_stop_checkpoint(
        heldout, tmp_path, slow_storage):
    """SIGTERM to rank 1 while it waits in a collective for rank 0's write, longer than
    the stop grace: the rank's handler runs when the write is over, and every rank stops
    at the agreed step with a checkpoint."""
    run_dir = tmp_path / "run"
    log = tmp_path / "log"
    proc = start(job(heldout, run_dir, "--max-steps", "40", "--checkpoint-steps", "10",
                     "--watchdog-s", "60"), log)
    try:
        wait_for(log, r"slow checkpoint write begins", proc)
        time.sleep(0.5)  # rank 1 is in the collective by now
        pid = rank_pid(1, str(run_dir))
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGTERM)
        code = proc.wait(timeout=3 * WRITE_S + 30)
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert code == 143, text
    stopped = re.search(r"Stopping at step (\d+) on a signal; checkpoint written", text)
    assert stopped, text
    assert steps_of(run_dir) == [10, int(stopped.group(1))], text
    assert "exiting without a checkpoint" not in text
