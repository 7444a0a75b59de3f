"""What a training rank tells an elastic supervisor and what the run's history keeps of
each world: the exit record's step, newest checkpoint and whether this rank received the
stop signal (runtime/selfreport.py, lifecycle.py), the `world` record each start of
training writes from DIST_LM_WORLD, and the `checkpoint` records of each write's cost
(training/observe.py), read back from real runs of a tiny model."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import textwrap

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (BIN, TINY, data_args, launcher, records, run, wait_for,
                      wait_until_asleep_in_c)
from dist_lm.runtime import selfreport
from dist_lm.runtime.procs import kill_session
from test_reliability import STOP_BOUND_S, finish, rank_pid

pytestmark = pytest.mark.medium

# A single process asked for records as the supervisor asks a rank under it.
RANK0 = {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "1", selfreport.REQUEST: "1"}
FLAGS = ["--global-batch-size", "20", "--epochs", "1", "--log-interval", "2", "--lr", "1"]


def train_cmd(heldout, run_dir, *extra):
    return [BIN / "dist-lm", "train", *data_args(heldout, heldout, heldout), *TINY, *FLAGS,
            "--run-dir", run_dir, *extra]


def exit_records(text):
    found = [r for line in text.splitlines() for r in selfreport.parse(line)[0]]
    return {r["rank"]: r for r in found if r["event"] == "exit"}


def spawn(cmd, log, env):
    """cmd in its own session with env added, all output to the file log."""
    full = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1", **env)
    return subprocess.Popen([str(c) for c in cmd], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=full, start_new_session=True)


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory, heldout):
    """6 steps of a 36-step epoch, a checkpoint every 4: checkpoints at steps 4 and 6
    (the pause at --max-steps), under the request for records and no DIST_LM_WORLD."""
    run_dir = tmp_path_factory.mktemp("paused")
    done = run([*train_cmd(heldout, run_dir, "--max-steps", "6", "--checkpoint-steps", "4",
                           "--dist", "local")], env={**RANK0, selfreport.WORLD: ""})
    assert done.returncode == 0, done.stderr
    return run_dir, done


def test_the_exit_record_says_the_step_and_the_newest_checkpoint(paused_run, heldout,
                                                                 tmp_path):
    end = exit_records(paused_run[1].stderr)[0]
    assert (end["kind"], end["step"], end["checkpoint"], end["signalled"]) == \
        ("ok", 6, 6, False), end
    # Resumed at 6, the checkpoint of step 8 cannot be written (a file-size limit below a
    # parameter file's, as a full disk would): the rank got to step 8, and its newest
    # checkpoint is still the one it resumed from.
    run_dir = tmp_path / "run"
    shutil.copytree(paused_run[0], run_dir)
    size = (run_dir / "checkpoints" / "step-000000006" / "model.params").stat().st_size
    limit = size // 2
    assert limit > 100_000, size  # the other files a run writes stay below it
    cmd = train_cmd(heldout, run_dir, "--max-steps", "12", "--checkpoint-steps", "4",
                    "--resume", "auto", "--dist", "local")
    failed = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **RANK0),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                  (limit, limit)))
    assert failed.returncode == 2 and "cannot write the checkpoint of step 8" in \
        failed.stderr, failed.stderr
    end = exit_records(failed.stderr)[0]
    assert (end["kind"], end["step"], end["checkpoint"]) == ("error", 8, 6), end


def test_a_signalled_rank_says_so_and_that_its_checkpoint_is_where_it_stopped(
        heldout, tmp_path):
    log = tmp_path / "log"
    proc = spawn(train_cmd(heldout, tmp_path / "run", "--max-steps", "30", "--dist",
                           "local"), log, RANK0)
    try:
        wait_for(log, r"Batch 4/", proc)
        proc.send_signal(signal.SIGTERM)
        assert finish(proc, STOP_BOUND_S) == 143
    finally:
        kill_session(proc.pid)
    end = exit_records(log.read_text())[0]
    assert (end["kind"], end["signalled"]) == ("stopped", True), end
    assert 4 <= end["step"] < 30 and end["checkpoint"] == end["step"], end


@pytest.mark.dist
def test_of_two_ranks_only_the_one_that_got_the_signal_says_it_was_signalled(
        heldout, tmp_path):
    """SIGUSR1 (a worker pod's preStop hook) reaches rank 1 only; rank 0 stops because the
    ranks agreed to, and mpirun's ending of it once rank 1 has exited is no signal of its
    own."""
    run_dir = tmp_path / "two-ranks"
    cmd = launcher("mpi", 2, *train_cmd(heldout, run_dir, "--max-steps", "30"))
    cmd = [cmd[0], "-x", selfreport.REQUEST, *cmd[1:]]
    log = tmp_path / "log"
    proc = spawn(cmd, log, {selfreport.REQUEST: "1"})
    try:
        wait_for(log, r"Batch 4/", proc)
        os.kill(rank_pid(1, str(run_dir)), signal.SIGUSR1)
        assert finish(proc, STOP_BOUND_S) != 0
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    ends = exit_records(text)
    assert sorted(ends) == [0, 1], text
    assert [(ends[r]["kind"], ends[r]["signalled"]) for r in (0, 1)] == \
        [("stopped", False), ("stopped", True)], text
    step = ends[0]["step"]
    assert 4 <= step < 30 and [(e["step"], e["checkpoint"]) for e in ends.values()] == \
        [(step, step)] * 2, text


def python_rank(code, timeout=60):
    return run([BIN / "python", "-c", textwrap.dedent(code)], env=RANK0, timeout=timeout)


def test_a_signal_outside_training_is_this_ranks_own():
    """Before training (loading data, say) no watchdog runs: the handler notes it."""
    done = python_rank("""
        import os, signal
        from dist_lm.runtime.lifecycle import STOP
        from dist_lm.runtime.selfreport import exit_record
        STOP.install()
        with exit_record():
            os.kill(os.getpid(), signal.SIGUSR1)
        """)
    assert done.returncode == 143, done.stderr
    end = exit_records(done.stderr)[0]
    assert (end["kind"], end["signalled"]) == ("stopped", True), end


def test_a_signal_after_the_ranks_agreed_to_stop_is_not_this_ranks_own():
    """Rank 0 of two, whose peer asked to stop (its half of the allreduce: [1, 0]), is
    signalled while it shuts down, as mpirun ends the ranks once one has exited."""
    done = python_rank("""
        import os, signal
        import mxnet as mx
        from dist_lm.runtime.lifecycle import STOP, Agreement
        from dist_lm.runtime.selfreport import exit_record

        class PeerAskedToStop:
            size = 2
            def allreduce_sum(self, flags, name):
                return flags + mx.nd.array([1, 0])

        STOP.install()
        STOP.arm()
        agreement = Agreement(PeerAskedToStop(), 0, 0)
        assert agreement.poll(1) == (False, False)
        assert agreement.poll(2) == (True, True)
        STOP.arm(False)
        with exit_record():
            os.kill(os.getpid(), signal.SIGTERM)
        """)
    assert done.returncode == 143, done.stderr
    end = exit_records(done.stderr)[0]
    assert (end["kind"], end["signalled"]) == ("stopped", False), end


def test_a_rank_blocked_in_c_when_the_signal_comes_says_it_was_signalled():
    """Its handler never runs: the watchdog saw the signal and ends it after the grace."""
    code = textwrap.dedent("""
        import ctypes, signal
        from dist_lm.runtime.lifecycle import STOP, Watchdog
        from dist_lm.runtime.selfreport import exit_record
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # whatever the parent blocked
        STOP.install(); STOP.arm()
        with exit_record(), Watchdog(600, stop_grace_s=1):
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            ctypes.CDLL(None).usleep(30_000_000)
        """)
    full = dict(os.environ, **RANK0)
    proc = subprocess.Popen([BIN / "python", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full,
                            start_new_session=True)
    try:
        wait_until_asleep_in_c(proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 4, err
    end = exit_records(err)[0]
    assert (end["code"], end["signalled"]) == (4, True), end


def test_a_failing_description_leaves_the_record_whole():
    done = python_rank("""
        from dist_lm.runtime import selfreport
        selfreport.describe("training", lambda: {"step": 1 // 0})
        with selfreport.exit_record():
            pass
        """)
    assert done.returncode == 0, done.stderr
    end = exit_records(done.stderr)[0]
    assert (end["kind"], end["code"]) == ("ok", 0) and "step" not in end, end


# --- the run's history ---------------------------------------------------------------------

def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_each_start_of_training_records_its_world(paused_run, heldout, tmp_path):
    """The paused run had no DIST_LM_WORLD; resumed at step 6 in the supervisor's second
    world, the run's history shows both."""
    run_dir = tmp_path / "run"
    shutil.copytree(paused_run[0], run_dir)
    world = {"restart": 1, "reason": "node4 lost", "hosts": "localhost:1"}
    done = run(train_cmd(heldout, run_dir, "--max-steps", "8", "--resume", "auto"),
               env={selfreport.WORLD: json.dumps(world)})
    assert done.returncode == 0, done.stderr
    assert "World: 1 rank\n" in paused_run[1].stdout, paused_run[1].stdout
    assert "World: 1 rank (restart 1: node4 lost; hosts localhost:1)\n" in done.stdout, \
        done.stdout
    rows = [(r["step"], r["tokens"], r["world/ranks"], r["world/restarts"], r["reason"],
             r["hosts"]) for r in records(run_dir, "world")]
    assert rows == [(0, 0, 1, 0, None, None),
                    (6, 6 * 20 * 35, 1, 1, "node4 lost", "localhost:1")], rows
    assert scalars(run_dir, "world/ranks") == [(0, 1), (6, 1)]
    assert scalars(run_dir, "world/restarts") == [(0, 0), (6, 1)]


def test_each_checkpoint_records_its_write_time(paused_run):
    run_dir = paused_run[0]
    rows = records(run_dir, "checkpoint")
    assert [r["step"] for r in rows] == [4, 6] and all(
        r["checkpoint/write_s"] > 0 for r in rows), rows
    written = scalars(run_dir, "checkpoint/write_s")
    assert [s for s, _ in written] == [4, 6]
    assert [v for _, v in written] == pytest.approx([r["checkpoint/write_s"] for r in rows])
