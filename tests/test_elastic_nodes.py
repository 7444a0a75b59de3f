"""Elastic jobs across simulated nodes (launch/sim-cluster, 4 nodes, one rank each,
launched from node1): the job shrinks when a node is lost and grows back when it returns,
and ends with the parameters of one uninterrupted process with the same global batch.

- node4 cut off mid-run: the world ends, node4 sits out its cooldown, training goes on
  with 3 ranks; node4 healed: once it is listed and answers ssh the job grows back to 4.
  Under the elastic MPIJob's launcher command (rendered from k8s/overlays/elastic, with
  mpirun) and under `horovodrun --gloo`.
- a remote rank SIGKILLed: its node sits out, and comes back.
- a node the discovery script still lists (as the MPI Operator lists a pod on a lost
  node) that never comes back: the job finishes on the others.
- --min-np no longer met: the job ends after --elastic-timeout with one line.
Each: no process left on any node, every restart on the console and in metrics.jsonl
(the world rows), the newest checkpoint intact. The steps are slowed down (a
sitecustomize for the ranks, from outside the product) so that a run outlasts the
faults; the figures printed are the ones docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import BIN, TINY, VALID, data_args, max_param_diff, run, sim_cluster
from test_multinode import Job, job_processes, newest_checkpoint, wait_until_nothing_runs
from test_mpijob_local import elastic_launcher_argv, local_elastic_command, operator_env

STEPS = 200
# The recipe's dropout on, two layers: masks belong to columns, so every world of the
# elastic job draws one process's masks and the run ends where one process ends.
RECIPE = ["--num-layers", "2", "--dropout", "0.2", "--lr", "1", "--clip", "0.1",
          "--max-steps", str(STEPS),
          "--log-interval", "5", "--epochs", "1", "--global-batch-size", "12",
          "--checkpoint-steps", "10", "--keep-checkpoints", "30"]
# Short cooldowns and change windows, so that a node's return shows within the run.
LAUNCH = {"--min-np": 3, "--max-np": 4, "--blacklist-cooldown-range": (5, 10),
          "--grow-interval": 10, "--discovery-interval": 1}
SLOW_STEPS = """
import os, time
if os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("HOROVOD_RANK"):
    import dist_lm.training.train as train
    _step = train.train_step

    def train_step(run, states):  # ~0.2 s a step: the run outlasts a node's loss
        time.sleep(0.2)
        return _step(run, states)

    train.train_step = train_step
"""
# Lists the nodes whose sshd accepts a connection now: the simulated stand-in for the
# operator's list of running worker pods.
LIVE_NODES = """#!/bin/bash
for n in node1 node2 node3 node4; do
  timeout 1 bash -c "exec 3<>/dev/tcp/$n/22" 2>/dev/null && echo "$n"
done
true
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with sim_cluster("dlmelas", tmp_path_factory, 4) as sim:
        yield sim


@pytest.fixture(scope="module")
def single(tmp_path_factory, heldout):
    """One process with all 12 columns: where every elastic run must end."""
    out = tmp_path_factory.mktemp("single")
    proc = run([BIN / "dist-lm", "train", *train_args(heldout, out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def site(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SLOW_STEPS)
    return {"PYTHONPATH": str(folder)}


@pytest.fixture(autouse=True)
def nothing_left_running(request):
    yield
    if "cluster" in request.fixturenames:
        sim = request.getfixturevalue("cluster")
        for node in ("node1", "node2", "node3", "node4"):
            sim("heal", node)
        for _, pid, _ in job_processes(sim):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def train_args(heldout, run_dir) -> list:
    return [*data_args(VALID, heldout, heldout), *TINY, *RECIPE, "--run-dir", run_dir]


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "discover.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


def mpijob_command(heldout, run_dir, discovery, **launch) -> list:
    """The elastic MPIJob's launcher command (k8s/overlays/elastic), rewritten where it
    must differ here; mpirun also passes the sitecustomize's PYTHONPATH on."""
    cmd = local_elastic_command(elastic_launcher_argv(), run_dir, discovery,
                                launch={**LAUNCH, **launch},
                                train_args=train_args(heldout, run_dir))
    at = cmd.index("mpirun") + 1
    return cmd[:at] + ["-x", "PYTHONPATH"] + cmd[at:]


def gloo_command(heldout, run_dir, discovery, **launch) -> list:
    flags = [str(x) for flag, v in {**LAUNCH, **launch}.items()
             for x in [flag, *(v if isinstance(v, tuple) else [v])]]
    return [BIN / "dist-lm", "launch", "--host-discovery-script", discovery, *flags,
            "horovodrun", "--gloo", "--disable-cache", "--network-interface", "eth0",
            BIN / "dist-lm", "train", *train_args(heldout, run_dir), "--resume", "auto"]


def start_job(cluster, heldout, tmp_path, controller, discovery,
              **launch) -> tuple[Job, Path]:
    """The elastic job started on node1 under a controller; its output in tmp_path."""
    run_dir = tmp_path / "run"
    make = mpijob_command if controller == "mpi" else gloo_command
    env = {"PYTHONPATH": str(tmp_path / "site")}
    if controller == "mpi":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(1, 5)))
        env.update(operator_env(hostfile, 1))
    job = Job(cluster, make(heldout, run_dir, discovery, **launch), env, tmp_path)
    job.cluster = cluster
    return job, run_dir


def wait_line(job: Job, pattern: str, timeout: float, after: int = 0,
              stream: str = "err") -> re.Match:
    """The first match of pattern in the job's stderr (the supervisor's lines) or stdout
    (rank 0's), past offset `after` of that stream."""
    path = job.err if stream == "err" else job.out
    deadline = time.monotonic() + timeout
    while True:
        m = re.compile(pattern, re.M).search(path.read_text(), after)
        if m:
            return m
        if job.proc.poll() is not None or time.monotonic() > deadline:
            job.wait(1)
            pytest.fail(f"no {pattern!r} within {timeout}s:\n{job.text()[-6000:]}")
        time.sleep(0.1)


def training_again(job: Job, timeout: float = 120) -> None:
    """Until rank 0 logs a step it trained after this call."""
    wait_line(job, rf"^{TAG}\[Epoch 0 Batch \d+/", timeout, len(job.out.read_text()), "out")


def trained(job: Job, step: int, timeout: float = 240) -> None:
    wait_line(job, rf"^{TAG}\[Epoch 0 Batch {step}/", timeout, stream="out")


TAG = r"(?:\[\d+\]<stdout>:)?"  # horovodrun's in front of a rank's line


def world_rows(run_dir: Path) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["world/ranks"], r["world/restarts"]) for r in rows if r["kind"] == "world"]


def assert_ends_like_one_process(job: Job, run_dir: Path, single: Path, ranks: int) -> float:
    assert job.wait(300) == 0, job.text()[-6000:]
    wait_until_nothing_runs(job.cluster, time.monotonic() + 60)
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == ranks
    newest_checkpoint(run_dir)  # every digest of the newest checkpoint matches
    diff = max_param_diff(single / "final.params", run_dir / "final.params")
    assert diff < 1e-5, diff
    return diff


# --- shrink and grow --------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_a_lost_node_shrinks_the_job_and_its_return_grows_it(controller, cluster, single,
                                                             heldout, site, tmp_path):
    discovery = script(tmp_path, LIVE_NODES)
    job, run_dir = start_job(cluster, heldout, tmp_path, controller, discovery)
    trained(job, 30)
    cluster.ok("partition", "node4")
    cut = time.monotonic()
    restart = wait_line(job, r"dist-lm: elastic: restart 1: node4 lost .*ranks 4 -> 3; "
                             r"continuing from the checkpoint at step (\d+) \((\d+) step", 120)
    training_again(job)
    again = time.monotonic() - cut
    cluster.ok("heal", "node4")
    healed = time.monotonic()
    wait_line(job, r"dist-lm: elastic: restart 2: new hosts to grow onto; .*"
                   r"ranks 3 -> 4; continuing from the checkpoint at step (\d+) "
                   r"\(0 step", 120, restart.end())
    training_again(job)
    bigger = time.monotonic() - healed
    diff = assert_ends_like_one_process(job, run_dir, single, 4)
    assert again < 90, again
    assert world_rows(run_dir) == [(4, 0), (3, 1), (4, 2)]
    print(f"\n{controller}: node4 cut at step ~30: training again on 3 ranks {again:.1f}s "
          f"after the cut (from the checkpoint at step {restart.group(1)}, "
          f"{restart.group(2)} steps lost); node4 back: training on 4 ranks "
          f"{bigger:.1f}s after the heal (cooldown 5 s, change window 10 s); "
          f"max |diff| to one process {diff:.1e}")


@pytest.mark.dist
@pytest.mark.slow
def test_a_killed_remote_rank_sets_its_node_aside_until_its_cooldown_ends(
        cluster, single, heldout, site, tmp_path):
    job, run_dir = start_job(cluster, heldout, tmp_path, "gloo", script(tmp_path, LIVE_NODES))
    trained(job, 30)
    (victim,) = [pid for ns, pid, c in job_processes(cluster)
                 if ns.endswith("-node3") and "dist-lm train" in c and str(run_dir) in c]
    os.kill(victim, signal.SIGKILL)
    restart = wait_line(job, r"dist-lm: elastic: restart 1: node3 lost \(rank 2 on node3 was "
                             r"killed.*ranks 4 -> 3", 120)
    wait_line(job, r"dist-lm: elastic: restart 2: new hosts to grow onto; hosts "
                   r"node1:1,node2:1,node4:1 -> node1:1,node2:1,node4:1,node3:1", 120,
              restart.end())
    diff = assert_ends_like_one_process(job, run_dir, single, 4)
    print(f"\nrank 2 on node3 SIGKILLed (Gloo): 3 ranks, then 4 again; max |diff| {diff:.1e}")


@pytest.mark.dist
@pytest.mark.slow
def test_a_listed_node_that_never_returns_leaves_the_job_on_the_others(
        cluster, single, heldout, site, tmp_path):
    listed = script(tmp_path, "#!/bin/sh\nprintf 'node1\\nnode2\\nnode3\\nnode4\\n'\n")
    job, run_dir = start_job(cluster, heldout, tmp_path, "mpi", listed)
    trained(job, 30)
    cluster.ok("partition", "node4")
    wait_line(job, r"dist-lm: elastic: restart 1: node4 lost .*ranks 4 -> 3", 120)
    # Listed, out of its cooldown, and still cut off: asked, left out, never grown onto.
    wait_line(job, r"dist-lm: elastic: node4 is listed but does not answer ssh", 120)
    diff = assert_ends_like_one_process(job, run_dir, single, 3)
    assert "restart 2" not in job.text()
    print(f"\nnode4 lost for good, still listed: finished on 3 ranks, max |diff| {diff:.1e}")


@pytest.mark.dist
@pytest.mark.slow
def test_min_np_no_longer_met_ends_the_job_with_one_line(cluster, heldout, site, tmp_path):
    job, run_dir = start_job(cluster, heldout, tmp_path, "mpi", script(tmp_path, LIVE_NODES),
                             **{"--min-np": 4, "--elastic-timeout": 10})
    trained(job, 30)
    cluster.ok("partition", "node4")
    cut = time.monotonic()
    code = job.wait(120)
    ended = time.monotonic() - cut
    wait_until_nothing_runs(cluster, time.monotonic() + 60)
    assert code != 0
    lines = [x for x in job.err.read_text().splitlines() if x.strip()]
    assert re.fullmatch(r"dist-lm: error: job failed after node node4 \(rank 3\) stopped "
                        r"answering.*: fewer than --min-np 4 slots usable for 10s "
                        r"\(--elastic-timeout\): node1:1,node2:1,node3:1", lines[-1]), \
        "\n".join(lines[-20:])
    _, step = newest_checkpoint(run_dir)
    assert step >= 30
    print(f"\nnode4 lost with --min-np 4: ended {ended:.1f}s after the cut, checkpoint at "
          f"step {step} intact\n{lines[-1]}")
