"""Resume, preemption, failing ranks, damaged checkpoints, non-finite values, soak.

Every multi-process run is bounded by a timeout; a hang fails the test.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (BIN, TINY, VALID, data_args, dist_lm, launcher, max_param_diff, run,
                      start, wait_for)
from dist_lm.training.checkpoint import list_checkpoints, verify
from dist_lm.runtime.procs import kill_session

pytestmark = pytest.mark.dist
# dropout stays on (0.2): resume must reproduce the dropout masks too.
COMMON = ["--max-steps", "40", "--log-interval", "10",
          "--epochs", "1", "--lr", "1"]
STOP_BOUND_S = 30  # Kubernetes' default grace period


def train_args(heldout, run_dir, *extra):
    return [BIN / "dist-lm", "train", *data_args(VALID, heldout, heldout), *TINY, *COMMON,
            "--run-dir", run_dir, *extra]


def finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        pytest.fail(f"did not exit within {timeout}s")


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_then_resume_equals_an_uninterrupted_run(ranks, heldout, tmp_path):
    wrap = (lambda cmd: launcher("gloo", 2, *cmd)) if ranks == 2 else (lambda cmd: cmd)
    columns = ["--batch-size", "10" if ranks == 2 else "20"]
    whole = run(wrap(train_args(heldout, tmp_path / "whole", *columns)), timeout=300)
    assert whole.returncode == 0, whole.stderr

    log = tmp_path / "part.log"
    proc = start(wrap(train_args(heldout, tmp_path / "part", *columns)), log)
    wait_for(log, r"Batch 10/", proc)
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM) if ranks == 1 else proc.send_signal(signal.SIGTERM)
    code = finish(proc, STOP_BOUND_S)
    stopped_s = time.time() - sent
    text = log.read_text()
    assert ranks == 2 or code == 143, text  # horovodrun reports its own code for ranks
    assert code != 0 and "checkpoint written" in text, text
    assert stopped_s < STOP_BOUND_S
    print(f"\nSIGTERM at {ranks} rank(s): all exited {stopped_s:.1f}s after the signal")
    (ckpt,) = list_checkpoints(tmp_path / "part" / "checkpoints")
    stopped_at = verify(ckpt).meta["step"]
    assert 10 <= stopped_at < 40

    again = run(wrap(train_args(heldout, tmp_path / "part", *columns, "--resume", "auto")),
                timeout=300)
    assert again.returncode == 0, again.stderr
    if ranks == 1:
        assert (tmp_path / "whole" / "final.params").read_bytes() == \
            (tmp_path / "part" / "final.params").read_bytes()
    else:
        assert max_param_diff(tmp_path / "whole" / "final.params",
                              tmp_path / "part" / "final.params") < 1e-6
    a, b = train_losses(tmp_path / "whole"), train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [10, 20, 30, 40]  # no step logged twice
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "part"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [10, 20, 30, 40]


def rank_pid(rank, marker):
    """The pid of the dist-lm process of `rank` whose command line holds marker."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"dist-lm" in c for c in cmd[:3]) and marker.encode() in b" ".join(cmd):
            ranks = {e.split(b"=", 1)[1] for e in env
                     if e.startswith((b"HOROVOD_RANK=", b"OMPI_COMM_WORLD_RANK="))}
            if str(rank).encode() in ranks:
                return int(pid)
    return None


KILL_BOUND_S = 60


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_killing_a_rank_ends_the_job_and_resume_finishes_it(controller, heldout, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(heldout, run_dir, "--batch-size", "10", "--checkpoint-steps", "10",
                      "--watchdog-s", "30")
    log = tmp_path / "log"
    proc = start(launcher(controller, 2, *args), log)
    wait_for(log, r"Batch 20/", proc)
    pid = rank_pid(1, str(run_dir))
    assert pid, "rank 1 not found"
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    code = finish(proc, KILL_BOUND_S)
    assert code != 0
    ended_s = time.time() - killed
    assert ended_s < KILL_BOUND_S
    print(f"\nSIGKILL of rank 1 under {controller}: the job exited {ended_s:.1f}s later")
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert verify(newest).meta["step"] >= 10  # intact: every digest matches
    again = run(launcher(controller, 2, *args, "--resume", "auto"), timeout=300)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "final.params").is_file()
    assert sorted(train_losses(run_dir)) == [10, 20, 30, 40]


def make_checkpoints(heldout, run_dir):
    proc = dist_lm(*train_args(heldout, run_dir, "--checkpoint-steps", "10")[1:],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    return list_checkpoints(run_dir / "checkpoints")


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(heldout, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = make_checkpoints(heldout, run_dir)
    assert len(ckpts) == 3  # steps 20, 30, 40 kept (--keep-checkpoints 3)
    newest = Path(ckpts[-1]) / "model.params"
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = dist_lm(*train_args(heldout, run_dir, "--resume", "auto", "--max-steps", "50")[1:],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"warning: checkpoint .*step-000000040: model.params is damaged",
                     proc.stderr)
    assert "Batch 40/" in proc.stdout  # steps 31-40 were trained again
    strict = dist_lm(*train_args(heldout, tmp_path / "other", "--resume", ckpts[-1],
                                 "--resume-strict")[1:], timeout=120)
    assert strict.returncode == 2 and "model.params is damaged" in strict.stderr


def test_a_crash_while_saving_leaves_no_half_written_checkpoint(heldout, tmp_path):
    run_dir = tmp_path / "run"
    make_checkpoints(heldout, run_dir)
    before = {p: verify(p).meta["files"] for p in list_checkpoints(run_dir / "checkpoints")}
    # A file-size limit makes the next parameter file fail mid-write (EFBIG), as a full
    # disk would; Python ignores SIGXFSZ, so the write raises.
    limit = 600_000
    assert (Path(list(before)[-1]) / "model.params").stat().st_size > limit
    cmd = [str(c) for c in train_args(heldout, run_dir, "--resume", "auto", "--max-steps",
                                      "50", "--checkpoint-steps", "5")]
    import resource
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the checkpoint of step 45" in lines[0] and \
        "previous checkpoint is intact" in lines[0], proc.stderr
    names = os.listdir(run_dir / "checkpoints")
    assert not [n for n in names if n.startswith(".tmp")], names
    for path, files in before.items():
        assert verify(path).meta["files"] == files


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_values_are_detected(policy, heldout, tmp_path):
    # lr 1e38 without clipping overflows the parameters to Inf/NaN within a few steps.
    proc = dist_lm(*train_args(heldout, tmp_path, "--lr", "1e38", "--clip", "0",
                               "--nonfinite", policy, "--checkpoint-steps", "5")[1:],
                   timeout=300)
    if policy == "stop":
        assert proc.returncode == 3, proc.stderr
        assert "non-finite loss or gradient" in proc.stderr
        for path in list_checkpoints(tmp_path / "checkpoints"):
            params = __import__("mxnet").nd.load(str(Path(path) / "model.params"))
            assert all(np.isfinite(v.asnumpy()).all() for v in params.values())
    else:
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        skipped = [r["train/nonfinite_steps"] for r in rows if r["kind"] == "train"]
        assert skipped[-1] > 0 and skipped == sorted(skipped)


@pytest.mark.slow
def test_soak_no_memory_growth_and_no_drift(tmp_path):
    words = (VALID.read_text().split())[:60000]
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(words[i % 200] for i in range(60000)) + "\n")
    proc = run(launcher("gloo", 2, BIN / "dist-lm", "train", *data_args(corpus, corpus, corpus),
                        "--model", "custom", "--embed-size", "16", "--hidden-size", "16",
                        "--num-layers", "1", "--context", "cpu", "--batch-size", "4",
                        "--bptt", "5", "--epochs", "1", "--log-interval", "100",
                        "--check-sync-interval", "250", "--run-dir", tmp_path / "run"),
               timeout=900)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if '"train"' in line]
    steps = rows[-1]["step"]
    assert steps >= 1400, steps
    rss = [r["system/rss_mb_max"] for r in rows]
    settled = rss[len(rss) // 4]
    print(f"soak: {steps} steps at 2 ranks, max RSS per rank {rss[0]:.0f} MB at step "
          f"{rows[0]['step']}, {settled:.0f} MB at step {rows[len(rss) // 4]['step']}, "
          f"{rss[-1]:.0f} MB at step {steps}")
    assert rss[-1] - settled < 25, rss


def test_the_watchdog_ends_a_process_that_makes_no_progress():
    code = ("import time\nfrom dist_lm.runtime.lifecycle import Watchdog\n"
            "with Watchdog(1.0) as w:\n"
            "    for _ in range(3):\n        time.sleep(0.4)\n        w.beat()\n"
            "    time.sleep(30)\n")
    started = time.time()
    proc = run([BIN / "python", "-c", code], timeout=60)
    assert proc.returncode == 4
    assert time.time() - started < 10
    assert re.search(r"dist-lm: error: no training progress for [12]s \(--watchdog-s 1\)",
                     proc.stderr), proc.stderr


# A rank under a watchdog, started by a parent (its launcher's stand-in) that reports the
# rank's pid and then waits; the rank's stderr goes to a file, as to an sshd session.
ORPHAN_PARENT = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
print(rank.pid, flush=True)
time.sleep(120)
"""
ORPHAN_RANK = """
import sys, time
from dist_lm.runtime import launcher_env
from dist_lm.runtime.lifecycle import STOP, Watchdog
launcher_env.note_launcher_parent()
STOP.install(); STOP.arm()
with Watchdog(600, stop_grace_s=2, orphaned=launcher_env.launcher_gone):
    print("watching", file=sys.stderr, flush=True)
    while not STOP.signum:  # the training loop: it stops at its next step
        time.sleep(0.05)
    print("asked to stop", file=sys.stderr, flush=True)
    time.sleep(60)  # a stop that never ends (a peer is gone from its collective)
"""
# What ORPHAN_RANK says when its launcher is gone: the stop, then the end after the grace.
ORPHAN_SAYS = (r"watching\nasked to stop\ndist-lm: error: .*the launcher that started this "
               r"rank is gone \(its parent process ended \d+s ago\) and the rank has not "
               r"stopped; exiting\n")


def alive(pid: int) -> bool:
    """Running (a zombie, ended and not yet reaped by init, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def watching(err: Path, timeout: float = 60) -> None:
    """Until ORPHAN_RANK's watchdog runs."""
    deadline = time.monotonic() + timeout
    while "watching" not in (err.read_text() if err.exists() else ""):
        assert time.monotonic() < deadline, "the rank did not start its watchdog"
        time.sleep(0.1)


def seconds_to_end(pid: int, bound: float = 10):
    """How long pid takes to end from now; None if it still runs after `bound` seconds."""
    start = time.monotonic()
    while alive(pid) and time.monotonic() - start < bound:
        time.sleep(0.1)
    return time.monotonic() - start if not alive(pid) else None


@pytest.mark.parametrize("launched", [True, False])
def test_a_rank_whose_launcher_is_gone_stops_and_ends_within_its_grace(launched, tmp_path):
    """Its parent (a stand-in for the launcher) killed: the rank, handed to init, would
    otherwise run on until its watchdog (600 s here). It is asked to stop as by SIGTERM
    (the stop checkpoint the other ranks may still take part in) and ended after the stop
    grace (2 s here) when that stop does not end. A single process outlives its parent
    (as under nohup) untouched. test_multinode.py cuts a real ssh session instead."""
    env = dict(os.environ, **({"HOROVOD_RANK": "1"} if launched else {}))
    for var in () if launched else ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                                    "PMIX_RANK"):
        env.pop(var, None)
    err = tmp_path / "rank.err"
    parent = subprocess.Popen([BIN / "python", "-c", ORPHAN_PARENT, ORPHAN_RANK, err],
                              stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        rank = int(parent.stdout.readline())
        watching(err)
        parent.kill()
        parent.wait()
        took = seconds_to_end(rank)
    finally:
        kill_session(parent.pid)
    said = err.read_text()
    if launched:
        # The grace, plus up to a second until the watchdog looks, with room.
        assert took is not None and 2 < took < 8, (took, said)
        assert re.search(ORPHAN_SAYS, said), said
    else:
        assert took is None and "asked to stop" not in said, said


# --- a stop during evaluation ------------------------------------------------------------------

EVAL_STOP_BOUND_S = 10  # two evaluation batches, a checkpoint and the exit, with room


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_signal_during_validation_stops_within_the_bound_and_resume_redoes_it(
        ranks, heldout, tmp_path):
    """One short epoch on the held-out text, then validation on the whole WikiText-2
    training split (about 3,000 batches): the signal comes as validation starts."""
    from conftest import WIKITEXT2

    big = WIKITEXT2 / "wiki.train.tokens"
    wrap = (lambda cmd: launcher("gloo", 2, *cmd)) if ranks == 2 else (lambda cmd: cmd)
    args = [BIN / "dist-lm", "train", *data_args(heldout, big, heldout), *TINY,
            "--global-batch-size", "20", "--epochs", "1", "--log-interval", "10",
            "--lr", "1"]
    log = tmp_path / "log"
    proc = start(wrap([*args, "--run-dir", tmp_path / "part"]), log)
    wait_for(log, r"\[Epoch 0\] throughput", proc)
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM) if ranks == 1 else proc.send_signal(signal.SIGTERM)
    finish(proc, STOP_BOUND_S)
    stopped_s = time.time() - sent
    text = log.read_text()
    assert "during evaluation on a signal; checkpoint written" in text, text
    assert "valid loss" not in text, text
    assert stopped_s < EVAL_STOP_BOUND_S, text
    print(f"\nSIGTERM during validation at {ranks} rank(s): exited {stopped_s:.1f}s later")
    (ckpt,) = list_checkpoints(tmp_path / "part" / "checkpoints")
    progress = verify(ckpt).meta["progress"]
    assert (progress["epoch"], progress["batch"]) == (0, progress["step"])  # all trained

    if ranks == 2:
        return
    again = run([*args, "--run-dir", tmp_path / "part", "--resume", "auto"], timeout=300)
    whole = run([*args, "--run-dir", tmp_path / "whole"], timeout=300)
    assert again.returncode == 0 and whole.returncode == 0, again.stderr + whole.stderr
    valid = re.compile(r"valid loss [0-9.]+, valid ppl [0-9.]+")
    assert valid.findall(again.stdout) == valid.findall(whole.stdout) != []
    assert (tmp_path / "whole" / "final.params").read_bytes() == \
        (tmp_path / "part" / "final.params").read_bytes()


# --- rank 0 failing to write best.params / final.params -------------------------------------

@pytest.mark.parametrize("name", ["best.params", "final.params"])
def test_a_failed_parameter_write_on_rank_0_ends_every_rank_with_its_message(
        name, heldout, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / name).mkdir(parents=True)  # rank 0 cannot replace a directory with a file
    proc = run(launcher("gloo", 2, BIN / "dist-lm", "train",
                        *data_args(heldout, heldout, heldout), *TINY, "--batch-size", "10",
                        "--epochs", "1", "--run-dir", run_dir), timeout=120)
    assert proc.returncode != 0
    errors = re.findall(r"dist-lm: error: \[rank (\d)\] ([^\n]*)", proc.stderr)
    assert sorted(r for r, _ in errors) == ["0", "1"], proc.stderr
    assert all(f"cannot write {run_dir / name}" in e for _, e in errors), proc.stderr
    # horovodrun prints a traceback of its own when a rank fails; the ranks print none.
    assert not re.search(r"\[\d\]<stderr>:Traceback", proc.stderr), proc.stderr


# --- --checkpoint-minutes ----------------------------------------------------------------------

def test_time_based_checkpoints_at_two_ranks_are_written_once_each(heldout, tmp_path):
    """Every 0.5 s: each request must give one checkpoint, not one at the agreed step
    and another at the next (the request sent just before the first was written)."""
    run_dir = tmp_path / "run"
    proc = run(launcher("gloo", 2, *train_args(heldout, run_dir, "--batch-size", "10",
                                               "--max-steps", "200",
                                               "--checkpoint-minutes", str(0.5 / 60),
                                               "--keep-checkpoints", "1000")), timeout=300)
    assert proc.returncode == 0, proc.stderr
    steps = [verify(p).meta["step"] for p in list_checkpoints(run_dir / "checkpoints")]
    timed = steps[:-1]  # the last is the --max-steps pause
    assert len(timed) >= 2, steps
    assert all(b - a > 1 for a, b in zip(timed, timed[1:])), steps


# --- resume at another rank count ------------------------------------------------------------

def test_resume_at_another_rank_count_with_the_global_batch_kept(heldout, tmp_path):
    """2 ranks for 20 steps, then 1 process for 20 more, --global-batch-size 20 throughout:
    the same parameters as 1 process for 40 steps, to float32 reduction noise."""
    recipe = ["--global-batch-size", "20", "--dropout", "0", "--clip", "0.1"]
    whole = run(train_args(heldout, tmp_path / "whole", *recipe), timeout=300)
    assert whole.returncode == 0, whole.stderr
    first = run(launcher("mpi", 2, *train_args(heldout, tmp_path / "part", *recipe,
                                               "--max-steps", "20")), timeout=300)
    assert first.returncode == 0, first.stderr
    second = run(train_args(heldout, tmp_path / "part", *recipe, "--resume", "auto"),
                 timeout=300)
    assert second.returncode == 0, second.stderr
    assert "Batch 40/" in second.stdout
    assert max_param_diff(tmp_path / "whole" / "final.params",
                          tmp_path / "part" / "final.params") < 2e-6
