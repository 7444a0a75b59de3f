"""Elastic `dist-lm launch` on this machine: its reading of hosts and command lines, and
whole elastic jobs under mpirun on localhost (growing, restart limit, waiting for hosts,
a stop signal, an error that a restart would meet again). Across simulated nodes (a
partitioned node, a killed remote rank, both controllers): tests/test_elastic_nodes.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, TINY, data_args, max_param_diff, run, start, wait_for
from dist_lm.runtime import discovery
from dist_lm.runtime.discovery import Cooldowns, DiscoveryFailed, choose, parse_hosts
from dist_lm.runtime.elastic import check_command, world_argv
from dist_lm.config import LaunchConfig
from dist_lm.errors import UsageError
from dist_lm.runtime.procs import kill_session

# Two layers with dropout on (masks belong to columns, so every world draws one
# process's masks) and lr 1, where float noise is not amplified (tests/test_distributed.py).
RECIPE = ["--num-layers", "2", "--dropout", "0.3", "--lr", "1", "--clip", "0.1", "--epochs", "1",
          "--global-batch-size", "4", "--log-interval", "4", "--keep-checkpoints", "20"]
MPIRUN = ["mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
          "-bind-to", "none", "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH"]


# --- hosts -----------------------------------------------------------------------------------

def test_discovery_lines_are_read_strictly():
    assert parse_hosts("node1\nnode2:4\n\n# a comment\nnode1:2\n", 3) == \
        [("node1", 5), ("node2", 4)]
    for bad in ("node1 slots=2", "node1:0", "node1:x", "-rf"):
        with pytest.raises(DiscoveryFailed, match="not `host` or `host:slots`"):
            parse_hosts(bad, 1)


def test_discovery_script_failures_are_one_line(tmp_path):
    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho 'kubectl: forbidden' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(DiscoveryFailed, match=r"exited 3: kubectl: forbidden"):
        discovery.discover(str(script), 1)
    script.write_text("#!/bin/sh\nsleep 30\n")
    with pytest.raises(DiscoveryFailed, match="did not finish within 0.5s"):
        discovery.discover(str(script), 1, timeout_s=0.5)
    (tmp_path / "plain").write_text("")
    assert "not executable" in discovery.executable(str(tmp_path / "plain"))
    assert "no such file" in discovery.executable(str(tmp_path / "missing"))


def test_a_world_keeps_its_hosts_first_and_stops_at_max_np():
    available = [("a", 2), ("b", 2), ("c", 2)]
    assert choose(available, 5) == [("a", 2), ("b", 2), ("c", 1)]
    assert choose(available, 6, keep=["c", "a"]) == [("c", 2), ("a", 2), ("b", 2)]
    assert choose(available, 3, keep=["b"]) == [("b", 2), ("a", 1)]


def test_a_failed_host_sits_out_a_cooldown_that_doubles():
    now = [100.0]
    cool = Cooldowns(10, 25, clock=lambda: now[0])
    assert cool.fail("n4") == 10 and cool.usable([("n3", 1), ("n4", 1)]) == [("n3", 1)]
    now[0] += 10.5
    assert not cool.cooling("n4")
    assert cool.fail("n4") == 20 and cool.next_return() == pytest.approx(20)
    assert cool.fail("n4") == 25  # capped at MAX


def test_the_command_an_elastic_job_runs():
    cfg = LaunchConfig(host_discovery_script="/bin/true")
    train = ["dist-lm", "train", "--resume", "auto", "--global-batch-size", "20"]
    argv, g = check_command(["mpirun", "-x", "PATH", *train], cfg)
    assert g == 20 and argv[-2:] == ["--checkpoint-minutes", "5"]
    assert world_argv(argv, [("n1", 2), ("n2", 1)])[:7] == \
        ["mpirun", "-np", "3", "-H", "n1:2,n2:1", "-x", "DIST_LM_WORLD"]
    hvd = world_argv(["horovodrun", "--gloo", *train], [("n1", 1)])
    assert hvd[:5] == ["horovodrun", "-np", "1", "-H", "n1:1"] and "-x" not in hvd
    # The user's own cadence is left alone.
    assert check_command(["mpirun", *train, "--checkpoint-steps", "50"], cfg)[0][-1] == "50"
    for bad, words in [(["mpirun", "-np", "2", *train], "leave -np out"),
                       (["mpirun", "-H", "a,b", *train], "leave -H out"),
                       (["mpirun", "--hostfile", "h", *train], "leave -hostfile out"),
                       (["mpirun", *train[:2], "--global-batch-size", "4"], "--resume auto"),
                       (["mpirun", *train[:4]], "--global-batch-size G"),
                       (["python", *train], "mpirun or horovodrun")]:
        with pytest.raises(UsageError, match=re.escape(words)):
            check_command(bad, cfg)


@pytest.mark.parametrize("flags,words", [
    (["--min-np", "2"], "--min-np needs --host-discovery-script"),
    (["--host-discovery-script", "/bin/true", "--min-np", "3", "--max-np", "2"],
     "--min-np 3 is above --max-np 2"),
    (["--host-discovery-script", "/bin/true", "--max-np", "8"],
     "--max-np 8 is above --global-batch-size 4"),
    (["--host-discovery-script", "/nonexistent/discover.sh"], "no such file"),
    (["--host-discovery-script", "/bin/true", "--blacklist-cooldown-range", "9", "1"],
     "--blacklist-cooldown-range: out of range"),
])
def test_bad_elastic_flags_are_one_line(flags, words):
    proc = run([BIN / "dist-lm", "launch", *flags, "mpirun", "dist-lm", "train", "--resume",
                "auto", "--global-batch-size", "4"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


# --- whole jobs on localhost ------------------------------------------------------------------

SLOW_STEPS = """
import os, time
if os.environ.get("OMPI_COMM_WORLD_RANK") is not None:
    import dist_lm.training.train as train
    _step = train.train_step

    def train_step(run, states):  # the tiny model's steps take ~1 ms: time to act
        time.sleep(0.05)
        return _step(run, states)

    train.train_step = train_step
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A sitecustomize for the ranks (mpirun passes PYTHONPATH on): `site(code)`. In front
    of the PYTHONPATH the tests run with, which may name the dist_lm under test."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p))
    return lambda code: (folder / "sitecustomize.py").write_text(code)


def discovery_file(tmp_path: Path, hosts: str) -> tuple[Path, Path]:
    """A discovery script that prints the file it reads: the test edits the file."""
    listed = tmp_path / "hosts"
    listed.write_text(hosts)
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {listed}\n")
    script.chmod(0o755)
    return script, listed


def elastic(script, heldout, run_dir, *flags, train=()):
    return [BIN / "dist-lm", "launch", "--host-discovery-script", script,
            "--discovery-interval", "0.5", "--blacklist-cooldown-range", "1", "2", *flags,
            *MPIRUN, BIN / "dist-lm", "train", *data_args(heldout, heldout, heldout), *TINY,
            *RECIPE, "--run-dir", run_dir, "--resume", "auto", *train]


@pytest.fixture(scope="module")
def single(heldout, tmp_path_factory):
    """One process with the 4 columns, 24 steps: what every elastic run must end at."""
    out = tmp_path_factory.mktemp("single")
    proc = run([BIN / "dist-lm", "train", *data_args(heldout, heldout, heldout), *TINY,
                *RECIPE, "--max-steps", "24", "--run-dir", out], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def world_rows(run_dir: Path) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "world"]


@pytest.mark.dist
@pytest.mark.slow
def test_a_job_grows_when_a_slot_appears_and_ends_where_one_process_ends(
        single, heldout, tmp_path, site):
    site(SLOW_STEPS)
    script, listed = discovery_file(tmp_path, "localhost:1\n")
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(elastic(script, heldout, run_dir, "--min-np", "1", "--max-np", "2",
                         "--grow-interval", "0", train=["--max-steps", "24"]), log)
    try:
        wait_for(log, r"Batch 8/", proc)
        listed.write_text("localhost:2\n")
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    restart = re.findall(r"dist-lm: elastic: restart 1: new hosts to grow onto; hosts "
                         r"localhost:1 -> localhost:2, ranks 1 -> 2; continuing from the "
                         r"checkpoint at step (\d+) \(0 step\(s\) lost\)", text)
    assert len(restart) == 1, text
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == 2
    diff = max_param_diff(single / "final.params", run_dir / "final.params")
    print(f"\ngrew 1 -> 2 ranks at step {restart[0]}: max |diff| to one process {diff:.1e}")
    assert diff < 1e-5


KILL_EACH_WORLD = """
import os, signal
if os.environ.get("OMPI_COMM_WORLD_RANK") == "1":
    import dist_lm.training.train as train
    _step, first = train.train_step, []

    def train_step(run, states):
        first.append(run.progress.step) if not first else None
        if run.progress.step == first[0] + 3:  # three steps into every world
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(run, states)

    train.train_step = train_step
"""


@pytest.mark.dist
@pytest.mark.medium
def test_the_reset_limit_ends_a_job_that_keeps_failing(heldout, tmp_path, site):
    site(KILL_EACH_WORLD)
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    proc = run(elastic(script, heldout, tmp_path / "run", "--min-np", "1", "--reset-limit",
                       "1", train=["--checkpoint-steps", "2"]), timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 137, text
    assert len(re.findall(r"dist-lm: elastic: restart \d", text)) == 1, text
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"dist-lm: error: job failed: 1 restarts after failures \(--reset-limit "
                    r"1\), and again: rank 1 on \S+ was killed by signal 9", last), text


@pytest.mark.medium
def test_too_few_slots_ends_after_the_wait_with_one_line(heldout, tmp_path, site):
    script, _ = discovery_file(tmp_path, "")
    proc = run(elastic(script, heldout, tmp_path / "run", "--min-np", "2",
                       "--elastic-timeout", "2"), timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "dist-lm: error: job failed: fewer than --min-np 2 slots usable for " \
                        "2s (--elastic-timeout): none", proc.stderr
    assert not (tmp_path / "run").exists()  # no rank ever started


@pytest.mark.dist
@pytest.mark.medium
def test_bad_input_is_not_restarted(heldout, tmp_path, site):
    site("")
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    proc = run(elastic(script, heldout, tmp_path / "run",
                       train=["--train-file", tmp_path / "missing.txt"]), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "dist-lm: elastic: restart" not in proc.stderr
    assert re.search(r"dist-lm: error: job failed: \[rank \d on \S+\] .*missing\.txt",
                     proc.stderr.strip().splitlines()[-1]), proc.stderr


@pytest.mark.dist
@pytest.mark.medium
def test_sigterm_stops_an_elastic_job_with_a_checkpoint_and_no_restart(heldout, tmp_path,
                                                                       site):
    site(SLOW_STEPS)
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(elastic(script, heldout, run_dir), log)
    try:
        wait_for(log, r"Batch 4/", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, log.read_text()
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert "dist-lm: elastic: restart" not in text, text
    assert re.search(r"dist-lm: stopped: job stopped:", text), text
    assert list((run_dir / "checkpoints").glob("step-*"))


def test_no_launcher_is_one_line():
    proc = subprocess.run([BIN / "dist-lm", "launch", "--grace", "5"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of rank `rank` of the job that trains into run_dir (the launcher runs in a
    session of its own)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and b"train" in cmdline and \
                str(run_dir).encode() in cmdline:
            return int(entry.name)
    pytest.fail(f"no rank {rank} trains into {run_dir}")


@pytest.mark.dist
@pytest.mark.slow
def test_a_stop_signal_to_one_ranks_pod_restarts_the_job_without_it_and_ends_exactly(
        single, heldout, tmp_path, site):
    """A worker pod's preStop hook signals the ranks of that pod only: they stop with the
    others at one step with a checkpoint, that host sits out, and the job goes on."""
    site(SLOW_STEPS)
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = start(elastic(script, heldout, run_dir, "--max-np", "2",
                         train=["--max-steps", "24"]), log)
    try:
        wait_for(log, r"Batch 4/", proc)
        os.kill(rank_pid(run_dir, 1), signal.SIGUSR1)
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    host = re.escape(socket.gethostname())
    assert re.search(rf"dist-lm: elastic: restart 1: {host} stopped by a signal there "
                     rf"\(\[rank 1 on {host}\] stopped by a signal at step (\d+), checkpoint "
                     rf"written\); .* continuing from the checkpoint at step \1 \(0 step",
                     text), text
    diff = max_param_diff(single / "final.params", run_dir / "final.params")
    assert diff < 1e-5


def test_a_launcher_that_cannot_start_is_not_restarted(tmp_path):
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    proc = run([BIN / "dist-lm", "launch", "--host-discovery-script", script,
                tmp_path / "bin" / "mpirun", "dist-lm", "train", "--resume", "auto",
                "--global-batch-size", "4"], timeout=60)
    assert proc.returncode == 127, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "restart" not in proc.stderr, proc.stderr
    assert lines[-1] == f"dist-lm: error: job failed: cannot start {tmp_path}/bin/mpirun: " \
                        f"No such file or directory", proc.stderr


@pytest.mark.dist
@pytest.mark.medium
def test_a_run_directory_still_locked_is_waited_for_not_taken_as_bad_input(
        heldout, tmp_path, site):
    """The lock held by a rank of the last world on a lost node lapses once that rank
    ends: the job waits (1 s, 2 s, ...) and starts again, and is not ended as exit 2."""
    from dist_lm.training.rundir import make_run_dir

    site("")
    script, _ = discovery_file(tmp_path, "localhost:2\n")
    run_dir, log = tmp_path / "run", tmp_path / "log"
    holder = make_run_dir(str(run_dir), is_root=True)  # as a leftover rank 0 holds it
    try:
        proc = start(elastic(script, heldout, run_dir, "--max-np", "2",
                             train=["--max-steps", "8"]), log)
        wait_for(log, r"dist-lm: elastic: the run directory is still locked \(.*in use by "
                      r"another job.*\); starting again in 1s", proc)
    finally:
        holder.release()
    try:
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        kill_session(proc.pid)
    assert (run_dir / "final.params").exists()
