"""Across nodes: the launch paths as users run them, on a simulated cluster.

launch/sim-cluster makes 4 "nodes" (network namespaces with their own address, host name
and sshd; one module fixture, torn down whatever happens). The launch paths:
launch/train-workstation.sh with HOSTS (`horovodrun --gloo -H ...` and the README's
`mpirun -H ...`, both under the project's wrapper, dist-lm launch) and the
MPIJob's own launcher command (rendered from k8s/base, as tests/test_mpijob_local.py).

- Equivalence: N ranks on N nodes x b columns take the same steps as 1 process x N*b
  columns, N = 2, 3, 4, under MPI and Gloo (< 1e-5).
- Faults, each ending the whole job within 60 s (launcher and every process on every
  node), with one last line naming the lost node or rank, the newest checkpoint intact
  and `--resume auto` on the healed cluster ending where an uninterrupted run ends: a
  node partitioned mid-training (then healed), a remote rank killed with SIGKILL, a
  node whose sshd is down at launch; and a node that is away for a few seconds only,
  which the job rides out. And a remote rank whose ssh session is cut (as horovodrun ends
  it), which stops and ends by itself.
- Environment: every rank takes rank 0's settings that change numerics.

The tests skip, with one line, only where this machine cannot create network namespaces
(sim-cluster exits 77). The unit tests of the wrapper's reading of a command line at the
end need no cluster; its reading of the ranks' records and of the launchers' words is
tested without one in test_launch_report.py and test_launch_patterns.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (BIN, REPO, SIM, TINY, VALID, data_args, max_param_diff, run, sim_cluster,
                      wait_until_asleep_in_c)
from dist_lm.training.checkpoint import list_checkpoints, verify
from dist_lm.runtime.launch import rank_hosts
from dist_lm.runtime.procs import kill_session

WORKSTATION = REPO / "launch" / "train-workstation.sh"
END_BOUND_S = 60
# Where float noise is not amplified (tests/test_distributed.py): dropout 0, lr 1, the
# global-norm clip active at every step. 12 columns over all ranks, split over 2, 3 or 4.
RECIPE = ["--dropout", "0", "--lr", "1", "--clip", "0.1", "--max-steps", "40",
          "--log-interval", "5", "--epochs", "1", "--global-batch-size", "12",
          "--checkpoint-steps", "10", "--keep-checkpoints", "10"]


def hosts(n: int, first: int = 1) -> str:
    return ",".join(f"node{i}:1" for i in range(first, first + n))


def train_args(heldout, run_dir, *extra) -> list:
    return [*data_args(VALID, heldout, heldout), *TINY, *RECIPE, "--run-dir", run_dir,
            *extra]


def workstation(controller: str, n: int, heldout, run_dir, *extra) -> tuple[list, dict]:
    """launch/train-workstation.sh across node1..nodeN: (command, environment)."""
    env = {"CONTROLLER": controller, "HOSTS": hosts(n), "IFACE": "eth0"}
    return ["bash", WORKSTATION, *train_args(heldout, run_dir, *extra)], env


class Job:
    """A launch started on node1, its output in files, its end timed."""

    def __init__(self, cluster, cmd, env, log_dir: Path, node="node1"):
        self.out, self.err = log_dir / "stdout", log_dir / "stderr"
        full = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
                    **cluster.env, **env)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(c) for c in [SIM, "exec", node, *cmd]],
                                         stdout=out, stderr=err, env=full,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out.read_text()):
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before {pattern!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                kill_session(self.proc.pid)
                pytest.fail(f"no {pattern!r} within {timeout}s:\n{self.text()}")
            time.sleep(0.1)

    def wait_for_checkpoint(self, run_dir: Path, step: int, timeout: float = 240) -> None:
        """Until step `step`'s checkpoint is complete: its log line comes before it."""
        done = run_dir / "checkpoints" / f"step-{step:09d}"
        deadline = time.monotonic() + timeout
        while not done.is_dir():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                kill_session(self.proc.pid)
                pytest.fail(f"no checkpoint at step {step} within {timeout}s:\n{self.text()}")
            time.sleep(0.1)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(self.proc.pid)
            pytest.fail(f"did not end within {timeout:.0f}s:\n{self.text()}")

    def summary(self, *names) -> str:
        """The wrapper's one line, which must be the last word, naming `names`."""
        lines = [x for x in self.err.read_text().splitlines() if x.strip()]
        ours = [x for x in lines if x.startswith("dist-lm: error: job failed:")]
        assert len(ours) == 1 and lines[-1] == ours[0], "\n".join(lines[-30:])
        for name in names:
            assert re.search(rf"\b{name}\b", ours[0]), ours[0]
        return ours[0]


def job_processes(cluster) -> list:
    """Every live process in the cluster's nodes except the sshd daemons themselves."""
    daemons = set(cluster.sshd_pids().values())
    found = []
    for ns in cluster.namespaces():
        pids = run(["ip", "netns", "pids", ns]).stdout.split()
        for pid in map(int, pids):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if pid in daemons or re.search(r"^State:\s+[ZX]", status, re.M):
                continue
            found.append((ns, pid, cmdline.decode(errors="replace")))
    return found


def wait_until_nothing_runs(cluster, deadline: float) -> float:
    """Waits until no process of the job is left on any node; the time that took from
    the deadline's start. Leftovers at the deadline fail the test (and are killed)."""
    while (left := job_processes(cluster)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        for _, pid, _ in left:  # inside this test's own nodes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"still running {END_BOUND_S}s after the fault: "
                    f"{[(ns, pid, c[:120]) for ns, pid, c in left]}")
    return time.monotonic()


def train_losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"}


def resume_on_the_healed_cluster(cluster, controller, heldout, run_dir, tmp_path,
                                 uninterrupted) -> float:
    """`--resume auto` of run_dir on node1..node3 runs to its end where the uninterrupted
    run ended (assert_same_run)."""
    (tmp_path / "again").mkdir()
    again = Job(cluster, *workstation(controller, 3, heldout, run_dir, "--resume", "auto"),
                tmp_path / "again")
    assert again.wait(300) == 0, again.text()
    return assert_same_run(uninterrupted(controller), run_dir)


def assert_same_run(reference: Path, resumed: Path) -> float:
    """The resumed run ended where the uninterrupted one did: parameters to 1e-6 (the
    interrupted log interval is reduced in another order), every logged loss alike."""
    diff = max_param_diff(reference / "final.params", resumed / "final.params")
    assert diff < 1e-6, diff
    a, b = train_losses(reference), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(5, 41, 5))
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-6)
    return diff


def newest_checkpoint(run_dir: Path):
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    return newest, verify(newest).meta["step"]  # verify: every digest matches


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with sim_cluster("dlmnode", tmp_path_factory, 4) as sim:
        yield sim


@pytest.fixture(autouse=True)
def nothing_left_running(request):
    """After a test on the cluster, what its job left on the nodes (a failed test's job
    may be mid-run) is killed, so that the next test starts on idle nodes."""
    yield
    if "cluster" in request.fixturenames:
        for _, pid, _ in job_processes(request.getfixturevalue("cluster")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def single(tmp_path_factory, heldout):
    """One process with all 12 columns: what every N-rank run must reproduce."""
    out = tmp_path_factory.mktemp("single")
    proc = run([BIN / "dist-lm", "train", *train_args(heldout, out)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def uninterrupted(cluster, heldout, tmp_path_factory):
    """3 ranks on node1..node3 under a controller, never stopped (run once each)."""
    done = {}

    def get(controller: str) -> Path:
        if controller not in done:
            out = tmp_path_factory.mktemp(f"three-{controller}") / "run"
            cmd, env = workstation(controller, 3, heldout, out, "--check-sync-interval", "10")
            job = Job(cluster, cmd, env, out.parent)
            assert job.wait(300) == 0, job.text()
            done[controller] = out
        return done[controller]

    return get


# --- equivalence ------------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.parametrize("controller,n", [("mpi", 2), ("mpi", 3), ("mpi", 4),
                                          ("gloo", 2), ("gloo", 3), ("gloo", 4)])
def test_n_nodes_take_the_same_steps_as_one_process(controller, n, cluster, single,
                                                    uninterrupted, heldout, tmp_path):
    if n == 3:
        out = uninterrupted(controller)
    else:
        out = tmp_path / "run"
        # --check-sync-interval: every 10 steps all ranks hold bit-identical parameters.
        cmd, env = workstation(controller, n, heldout, out, "--check-sync-interval", "10")
        job = Job(cluster, cmd, env, tmp_path)
        assert job.wait(300) == 0, job.text()
    assert json.loads((out / "run.json").read_text())["ranks"] == n
    diff = max_param_diff(single / "final.params", out / "final.params")
    print(f"\n{controller}: {n} nodes x {12 // n} columns vs 1 process x 12, 40 steps: "
          f"max |diff| {diff:.2e}")
    assert diff < 1e-5


# --- faults -----------------------------------------------------------------------------------

@pytest.mark.dist
def test_a_partitioned_node_ends_the_mpijob_and_resume_on_the_healed_cluster_is_exact(
        cluster, heldout, tmp_path):
    """The MPIJob's launcher command, node4 as the launcher pod, workers node1..node3;
    node3 (rank 2) is cut off mid-training and comes back once the job has ended. The
    resumed run ends where an uninterrupted run of the same command does (its ranks see
    the ssh sessions' environment, not the workstation runs' rank 0's)."""
    from test_mpijob_local import launcher_argv, local_command, operator_env

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in (1, 2, 3)))
    env = operator_env(hostfile, 1)

    def mpijob(run_dir, log_dir):
        cmd = local_command(launcher_argv(), run_dir, np=3,
                            train_args=train_args(heldout, run_dir)[:-2])
        log_dir.mkdir(exist_ok=True)
        return Job(cluster, cmd, env, log_dir, node="node4")

    whole = mpijob(tmp_path / "whole" / "run", tmp_path / "whole")
    assert whole.wait(300) == 0, whole.text()
    run_dir = tmp_path / "run"
    job = mpijob(run_dir, tmp_path)
    job.wait_for_checkpoint(run_dir, 20)
    cluster.ok("partition", "node3")
    cut = time.monotonic()
    try:
        code = job.wait(END_BOUND_S)
        ended = time.monotonic() - cut
    finally:
        cluster.ok("heal", "node3")  # the node comes back
    gone = wait_until_nothing_runs(cluster, cut + END_BOUND_S) - cut
    assert code != 0
    line = job.summary("node3")
    # Rank 2 reported its start on node3; ssh to node3 no longer answers.
    assert re.search(r"node node3 \(rank 2\) stopped answering", line), line
    print(f"\npartition of node3 under the MPIJob command: launcher ended {ended:.1f}s, "
          f"every process on every node {gone:.1f}s after the cut\n{line}")
    newest, step = newest_checkpoint(run_dir)
    assert step >= 20

    again = mpijob(run_dir, tmp_path / "again")
    assert again.wait(300) == 0, again.text()
    print(f"resumed from step {step}: max |diff| to the uninterrupted run "
          f"{assert_same_run(tmp_path / 'whole' / 'run', run_dir):.1e}")


@pytest.mark.dist
def test_a_remote_rank_killed_ends_the_gloo_job_and_resume_is_exact(
        cluster, uninterrupted, heldout, tmp_path):
    run_dir = tmp_path / "run"
    cmd, env = workstation("gloo", 3, heldout, run_dir)
    job = Job(cluster, cmd, env, tmp_path)
    job.wait_for_checkpoint(run_dir, 20)
    (victim,) = [pid for ns, pid, c in job_processes(cluster)
                 if ns.endswith("-node3") and "dist-lm train" in c and str(run_dir) in c]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code = job.wait(END_BOUND_S)
    ended = time.monotonic() - killed
    gone = wait_until_nothing_runs(cluster, killed + END_BOUND_S) - killed
    assert code != 0
    line = job.summary("rank 2", "node3")
    # From rank 2's start record (host, pid), its missing exit record, and the probe.
    assert re.search(r"rank 2 on node3 was killed \(no exit record", line), line
    print(f"\nSIGKILL of rank 2 on node3 under horovodrun --gloo: launcher ended {ended:.1f}s, "
          f"every process {gone:.1f}s after\n{line}")
    _, step = newest_checkpoint(run_dir)
    assert step >= 20
    resume_on_the_healed_cluster(cluster, "gloo", heldout, run_dir, tmp_path,
                                 uninterrupted)


@pytest.mark.dist
def test_a_rank_whose_ssh_session_is_cut_stops_and_ends(cluster, tmp_path):
    """The process tree horovodrun makes for a rank on another node: `ssh node2 CMD` runs
    the rank as the child of its sshd session. Killing the ssh client, as horovodrun ends
    a remote rank, ends that session and not the rank, which no signal reaches: it must
    stop, and end by itself after its stop grace (2 s here)."""
    from test_reliability import ORPHAN_RANK, ORPHAN_SAYS, seconds_to_end, watching

    err = tmp_path / "rank.err"
    remote = (f"cd {REPO} && HOROVOD_RANK=1 exec {BIN / 'python'} "
              f"-c {shlex.quote(ORPHAN_RANK)} 2> {err}")
    job = Job(cluster, ["ssh", "node2", remote], {}, tmp_path)
    watching(err)
    procs = job_processes(cluster)
    (rank,) = [p for ns, p, c in procs if ns.endswith("-node2") and "note_launcher" in c]
    (client,) = [p for ns, p, c in procs if ns.endswith("-node1") and c.startswith("ssh ")]
    parent = Path(f"/proc/{rank}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert Path(f"/proc/{parent}/cmdline").read_bytes().startswith(b"sshd: "), parent
    os.kill(client, signal.SIGKILL)
    took = seconds_to_end(rank)
    job.wait(10)
    said = err.read_text()
    assert took is not None and 2 < took < 8, (took, said)
    assert re.search(ORPHAN_SAYS, said), said
    print(f"\nssh client of a rank on node2 killed: the rank stopped and ended {took:.1f}s "
          f"later (stop grace 2 s)")


@pytest.mark.dist
def test_a_node_whose_sshd_is_down_at_launch_ends_the_job_and_resume_is_exact(
        cluster, uninterrupted, heldout, tmp_path):
    run_dir = tmp_path / "run"
    paused = Job(cluster, *workstation("mpi", 3, heldout, run_dir, "--max-steps", "20"),
                 tmp_path)
    assert paused.wait(300) == 0, paused.text()
    newest, step = newest_checkpoint(run_dir)
    before = {f.name: f.read_bytes() for f in Path(newest).iterdir()}

    sshd = cluster.sshd_pids()["node3"]
    os.kill(sshd, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{sshd}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        (tmp_path / "down").mkdir()
        job = Job(cluster, *workstation("mpi", 3, heldout, run_dir, "--resume", "auto"),
                  tmp_path / "down")
        started = time.monotonic()
        code = job.wait(END_BOUND_S)
        ended = time.monotonic() - started
        gone = wait_until_nothing_runs(cluster, started + END_BOUND_S) - started
    finally:
        state = cluster.state / "node3"
        cluster.ok("exec", "node3", "/usr/sbin/sshd", "-f", state / "sshd_config",
                   "-E", state / "sshd.log")
    assert code != 0
    line = job.summary("node3")
    print(f"\nnode3's sshd down at launch (mpirun): ended {ended:.1f}s, every process "
          f"{gone:.1f}s after the start\n{line}")
    assert newest_checkpoint(run_dir) == (newest, 20)
    assert {f.name: f.read_bytes() for f in Path(newest).iterdir()} == before

    deadline = time.monotonic() + 10
    while cluster("exec", "node1", "ssh", "node3", "true", timeout=30).returncode != 0:
        assert time.monotonic() < deadline, "node3's sshd did not come back"
        time.sleep(0.2)
    resume_on_the_healed_cluster(cluster, "mpi", heldout, run_dir, tmp_path,
                                 uninterrupted)


@pytest.mark.dist
def test_a_node_away_for_seconds_only_does_not_end_the_job(
        cluster, uninterrupted, heldout, tmp_path):
    """Shorter than the keepalives and Gloo's timeout: the connections carry on, and the
    run ends as if nothing happened."""
    run_dir = tmp_path / "run"
    job = Job(cluster, *workstation("gloo", 3, heldout, run_dir), tmp_path)
    job.wait_for(r"Batch 10/")
    cluster.ok("partition", "node3")
    try:
        time.sleep(5)
        assert job.proc.poll() is None, job.text()  # the job rode out the absence
    finally:
        cluster.ok("heal", "node3")
    assert job.wait(300) == 0, job.text()
    diff = max_param_diff(uninterrupted("gloo") / "final.params", run_dir / "final.params")
    print(f"\nnode3 away for 5 s (Gloo): the run finished, max |diff| to the uninterrupted "
          f"run {diff:.1e}")
    # Not bit for bit: which gradients Horovod fuses into one allreduce depends on timing.
    assert diff < 1e-6


@pytest.mark.dist
def test_sigterm_to_the_wrapper_stops_every_rank_with_a_checkpoint(cluster, heldout,
                                                                   tmp_path):
    """Under mpirun the wrapper turns SIGTERM into SIGUSR1, which mpirun forwards to every
    rank at once (its own SIGTERM would reach the ranks only after a delay)."""
    run_dir = tmp_path / "run"
    job = Job(cluster, *workstation("mpi", 3, heldout, run_dir), tmp_path)
    job.wait_for(r"Batch 10/")
    job.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert job.wait(END_BOUND_S) == 143, job.text()
    stopped = time.monotonic() - sent
    wait_until_nothing_runs(cluster, sent + END_BOUND_S)
    steps = re.findall(r"dist-lm: stopped: \[rank (\d)\] stopped by a signal at step (\d+), "
                       r"checkpoint written", job.err.read_text())
    assert sorted(r for r, _ in steps) == ["0", "1", "2"] and len({s for _, s in steps}) == 1, \
        job.err.read_text()[-4000:]
    _, step = newest_checkpoint(run_dir)
    assert step == int(steps[0][1])
    print(f"\nSIGTERM to the wrapper (mpirun, 3 nodes): every rank stopped at step {step} "
          f"with a checkpoint, {stopped:.1f}s after the signal")


# --- the environment --------------------------------------------------------------------------

# One write of the whole line: mpirun interleaves ranks' output write by write.
PRINT_SETTING = ("import os, socket; from dist_lm.runtime.launcher_env import configure_process; "
                 "{} os.write(1, ' '.join(['rank', os.environ['OMPI_COMM_WORLD_RANK'], "
                 "socket.gethostname(), str(os.environ.get('MXNET_USE_MKLDNN_RNN')), "
                 "'\\n']).encode())")


def mpirun_ranks_print(cluster, *launcher, configure: bool, node="node1", on_node2=None):
    """What each of 2 ranks sees of a setting made only where mpirun runs (on `node`):
    rank 0 on node1 (beside mpirun when node is node1), rank 1 on node2; on_node2: a
    value of the setting that node2's own environment holds."""
    code = PRINT_SETTING.format("configure_process();" if configure else "")
    rank = [BIN / "python", "-c", code]
    if on_node2 is not None:
        rank = ["bash", "-c", f'[ "$(hostname)" != node2 ] || '
                f'export MXNET_USE_MKLDNN_RNN={on_node2}; exec "$@"', "rank", *rank]
    done = run([SIM, "exec", node, *launcher, "--allow-run-as-root", "-np", "2",
                "-H", "node1:1,node2:1", *rank],
               env={**cluster.env, "MXNET_USE_MKLDNN_RNN": "0"}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(re.findall(r"rank (\d) (\S+) (\S+)", done.stdout))


@pytest.mark.dist
def test_ranks_on_other_nodes_take_rank_0s_numerics_settings(cluster):
    """Plain `mpirun -H` (the README's line) forwards only what -x names: the rank on
    node1, beside mpirun, sees a setting that the rank on node2 does not, until
    configure_process makes every rank's numerics variables rank 0's; the same under the
    wrapper, which adds nothing of its own."""
    assert mpirun_ranks_print(cluster, "mpirun", configure=False) == \
        [("0", "node1", "0"), ("1", "node2", "None")]
    assert mpirun_ranks_print(cluster, "mpirun", configure=True) == \
        [("0", "node1", "0"), ("1", "node2", "0")]
    wrapped = [BIN / "dist-lm", "launch", "mpirun"]
    assert mpirun_ranks_print(cluster, *wrapped, configure=True) == \
        [("0", "node1", "0"), ("1", "node2", "0")]


@pytest.mark.dist
def test_with_no_rank_beside_mpirun_every_rank_still_takes_rank_0s_settings(cluster):
    """The MPIJob's shape: mpirun under the wrapper on node4, the ranks on node1 and
    node2, whose environments differ. A setting made only where mpirun runs reaches no
    rank (`-x NAME=VALUE` would give it to all); whatever each node holds, every rank
    takes rank 0's, unset included."""
    wrapped = [BIN / "dist-lm", "launch", "mpirun"]
    assert mpirun_ranks_print(cluster, *wrapped, configure=False, node="node4",
                              on_node2="1") == [("0", "node1", "None"), ("1", "node2", "1")]
    assert mpirun_ranks_print(cluster, *wrapped, configure=True, node="node4",
                              on_node2="1") == [("0", "node1", "None"), ("1", "node2", "None")]


# --- the wrapper's reading of the ranks' records across nodes ---------------------------------

@pytest.mark.dist
def test_a_remote_rank_killed_under_mpirun_is_named_from_its_records(cluster):
    """Rank 1 on node2, started over ssh, reports its start and is killed: its record
    reaches the wrapper on node1 through mpirun (the wrapper names the request with -x),
    and the probe over ssh finds its pid gone."""
    from test_launch_report import KILLED_RANK

    done = run([SIM, "exec", "node1", BIN / "dist-lm", "launch", "mpirun",
                "--allow-run-as-root", "-np", "2", "-H", "node1:1,node2:1",
                BIN / "python", "-c", KILLED_RANK], env=cluster.env, timeout=120)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert lines[-1] == "dist-lm: error: job failed: rank 1 on node2 was killed by signal 9 " \
                        "(Killed; no exit record)", done.stderr
    assert "dist-lm-record" not in done.stdout + done.stderr


# --- the wrapper's reading of the launcher's command line (no cluster) ---------------------

def test_rank_hosts_follow_the_launchers_placement(tmp_path):
    assert rank_hosts(["mpirun", "-np", "4", "-H", "a:2,b:2", "x"]) == ["a", "a", "b", "b"]
    assert rank_hosts(["mpirun", "-np", "3", "-H", "a,b,a", "x"]) == ["a", "a", "b"]
    assert rank_hosts(["mpirun", "-np", "3", "-H", "a:2,b:2", "-map-by", "node", "x"]) == \
        ["a", "b", "a"]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# workers\nw-0.svc slots=2\nw-1.svc slots=2\n")
    assert rank_hosts(["horovodrun", "-np", "3", "--hostfile", str(hostfile), "x"]) == \
        ["w-0.svc", "w-0.svc", "w-1.svc"]
    assert rank_hosts(["mpirun", "-np", "8", "-H", "a:2", "x"]) is None


def test_a_rank_blocked_in_c_when_a_stop_signal_comes_ends_itself():
    """The main thread stuck in a C call (here usleep with the signal blocked in that
    thread, as a rank waits in a collective whose peer is gone) never runs Python's
    handler; the watchdog learns of the signal from the wakeup pipe and ends the process
    with one line after the stop grace."""
    code = ("import ctypes, signal\n"
            "from dist_lm.runtime.lifecycle import STOP, Watchdog\n"
            "signal.pthread_sigmask(signal.SIG_SETMASK, [])  # whatever the parent blocked\n"
            "STOP.install(); STOP.arm()\n"
            "with Watchdog(600, stop_grace_s=2):\n"
            "    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])\n"
            "    ctypes.CDLL(None).usleep(30_000_000)\n")
    proc = subprocess.Popen([BIN / "python", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_asleep_in_c(proc)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 4 and time.monotonic() - sent < 10, err
    (line,) = err.splitlines()
    assert re.fullmatch(r"dist-lm: error: a stop signal came [23]s ago and this rank is still "
                        r"blocked \(in a collective whose peer rank may be gone\); exiting "
                        r"without a checkpoint", line), err
