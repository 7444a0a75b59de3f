"""A worker pod evicted mid-training (a node drain, a spot reclaim), on a simulated cluster.

launch/sim-cluster makes 3 nodes: node1 plays the launcher pod and runs the MPIJob's
launcher command (rendered from k8s/base, as tests/test_mpijob_local.py), node2 and node3
the worker pods, one rank each. Mid-run, node3's pod is "evicted": the worker's preStop
hook, read from the same rendering, runs inside node3 as the kubelet runs it
(`/bin/sh -c ...`). Expected: every rank stops at the same step with a checkpoint, the
hook returns once the ranks and orted there are gone, the job ends with exit 143 and the
wrapper's `dist-lm: stopped: ...` line, nothing of the job is left on any node, and the
launcher's restart (`--resume auto`) ends where an uninterrupted run of the same command
ends. Also: a repeated SIGUSR1 (the hook's and mpirun's, when a drained node held the
launcher too) is one stop request.

The cluster tests skip, with one line, only where this machine cannot create network
namespaces (sim-cluster exits 77).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from conftest import BIN, REPO, SIM, run, sim_cluster
from dist_lm.runtime.procs import kill_session
from test_mpijob_local import launcher_argv, local_command, operator_env, tool
from test_multinode import (END_BOUND_S, Job, assert_same_run, job_processes, newest_checkpoint,
                            train_args, wait_until_nothing_runs)
# Autouse here too: what a failed test's job left on the nodes is killed after it.
from test_multinode import nothing_left_running  # noqa: F401

WORKERS = ("node2", "node3")
STOPPED = re.compile(r"dist-lm: stopped: \[rank (\d)\] stopped by a signal at step (\d+), "
                     r"checkpoint written")


def worker_prestop() -> list[str]:
    """The worker container's preStop command, from the rendered base MPIJob."""
    done = subprocess.run([tool("kubectl"), "kustomize", REPO / "k8s" / "base"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (job,) = [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "MPIJob"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    return worker["lifecycle"]["preStop"]["exec"]["command"]


def mpijob(cluster, heldout, run_dir, log_dir) -> Job:
    """The MPIJob's launcher command on node1, one rank on each worker node."""
    hostfile = log_dir / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in WORKERS))
    cmd = local_command(launcher_argv(), run_dir, np=len(WORKERS),
                        train_args=train_args(heldout, run_dir)[:-2])
    return Job(cluster, cmd, operator_env(hostfile, 1), log_dir)


def last_line(job: Job) -> str:
    """The wrapper's one line, which must be the last word."""
    lines = [x for x in job.err.read_text().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def on_node(cluster, node: str) -> list:
    return [(pid, c) for ns, pid, c in job_processes(cluster) if ns == f"{cluster.prefix}-{node}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with sim_cluster("dlmevict", tmp_path_factory, 3) as sim:
        yield sim


@pytest.mark.dist
@pytest.mark.medium
def test_an_evicted_workers_prestop_stops_every_rank_with_a_checkpoint_and_resume_is_exact(
        cluster, heldout, tmp_path):
    prestop = worker_prestop()
    assert prestop[:2] == ["/bin/sh", "-c"]
    (tmp_path / "whole").mkdir()
    whole = mpijob(cluster, heldout, tmp_path / "whole" / "run", tmp_path / "whole")
    assert whole.wait(300) == 0, whole.text()

    run_dir = tmp_path / "run"
    job = mpijob(cluster, heldout, run_dir, tmp_path)
    job.wait_for_checkpoint(run_dir, 10)
    evicted = time.monotonic()
    hook = cluster.on("node3", *prestop, timeout=END_BOUND_S)
    hook_s = time.monotonic() - evicted
    left = on_node(cluster, "node3")
    code = job.wait(END_BOUND_S)
    ended = time.monotonic() - evicted
    gone = wait_until_nothing_runs(cluster, evicted + END_BOUND_S) - evicted
    assert not left, f"the hook returned with these still on node3: {left}"
    assert code == 143, job.text()[-4000:]

    steps = STOPPED.findall(job.err.read_text())
    assert sorted(r for r, _ in steps) == ["0", "1"] and len({s for _, s in steps}) == 1, \
        job.text()[-4000:]
    _, step = newest_checkpoint(run_dir)
    assert 10 < step == int(steps[0][1]) < 40
    line = last_line(job)
    assert re.fullmatch(r"dist-lm: stopped: job stopped: \[rank \d on node[23]\] stopped by "
                        rf"a signal at step {step}, checkpoint written", line), line
    print(f"\npreStop of node3's worker (MPIJob command, workers node2, node3): every rank "
          f"stopped at step {step} with a checkpoint; the hook returned {hook_s:.1f}s, the "
          f"launcher ended {ended:.1f}s (exit {code}), every process on every node was gone "
          f"{gone:.1f}s after it began\n{line}{hook.stdout}{hook.stderr}")

    (tmp_path / "again").mkdir()
    started = time.monotonic()
    again = mpijob(cluster, heldout, run_dir, tmp_path / "again")
    assert again.wait(300) == 0, again.text()
    print(f"the launcher's restart resumed from step {step} and ended in "
          f"{time.monotonic() - started:.1f}s: max |diff| to the uninterrupted run "
          f"{assert_same_run(tmp_path / 'whole' / 'run', run_dir):.1e}")


@pytest.mark.dist
@pytest.mark.medium
def test_a_drained_node_that_held_the_launcher_too_stops_every_rank_with_a_checkpoint(
        cluster, heldout, tmp_path):
    """The launcher pod's SIGTERM (its wrapper's SIGUSR1 through mpirun) and node3's
    preStop hook at once: rank 1 is asked twice, and that is still one stop."""
    run_dir = tmp_path / "run"
    job = mpijob(cluster, heldout, run_dir, tmp_path)
    job.wait_for_checkpoint(run_dir, 10)
    job.proc.send_signal(signal.SIGTERM)
    drained = time.monotonic()
    hook = subprocess.Popen([str(c) for c in [SIM, "exec", "node3", *worker_prestop()]],
                            env={**os.environ, **cluster.env}, start_new_session=True)
    try:
        assert hook.wait(END_BOUND_S) == 0
    finally:
        kill_session(hook.pid)
    code = job.wait(END_BOUND_S)
    ended = time.monotonic() - drained
    wait_until_nothing_runs(cluster, drained + END_BOUND_S)
    assert code == 143, job.text()[-4000:]
    steps = STOPPED.findall(job.err.read_text())
    assert sorted(r for r, _ in steps) == ["0", "1"] and len({s for _, s in steps}) == 1, \
        job.text()[-4000:]
    _, step = newest_checkpoint(run_dir)
    assert step == int(steps[0][1])
    print(f"\nlauncher and node3's worker stopped together: every rank stopped at step "
          f"{step} with a checkpoint, the launcher ended {ended:.1f}s after\n{last_line(job)}")


def test_sigusr1_again_is_the_same_stop_request_and_sigterm_again_ends_at_once():
    code = ("import os, signal\n"
            "from dist_lm.runtime.lifecycle import STOP\n"
            "STOP.install(); STOP.arm()\n"
            "for sig in (signal.SIGUSR1, signal.SIGUSR1):\n"
            "    os.kill(os.getpid(), sig)\n"
            "print(STOP.signum, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('still running', flush=True)\n")
    done = run([BIN / "python", "-c", code], timeout=60)
    assert (done.returncode, done.stdout) == (143, f"{int(signal.SIGTERM)}\n"), done
