"""The elastic supervisor's restart logic against fakes, in seconds: a fake `mpirun` (a
shell script that prints what a world's launcher and ranks would print, records the
hosts it was given and exits with a given code), a fake ssh that every host answers, and
discovery scripts that misbehave. Whole elastic jobs under the real mpirun:
tests/test_elastic.py.

- a host that mpirun blames by its short name sits out its cooldown while the discovery
  script lists it by its full name;
- a run directory still locked (exit 5) is waited for on its own deadline, not counted
  against --reset-limit, and ends the job with one line when the deadline passes;
- a stop signal between two worlds starts no new world and ends as a stop;
- a SIGUSR1 that reaches a rank after the ranks agreed to stop (a second pod's preStop
  hook) still marks it as leaving;
- a transient storage error ends the ranks with exit 7, not 2 (bad input);
- a discovery script whose background child holds its output open cannot hang it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, run
from dist_lm.runtime import discovery
from dist_lm.runtime.discovery import Cooldowns, DiscoveryFailed, same_host
from dist_lm.runtime.launch import Signals, run_launcher
from dist_lm.runtime.procs import kill_session

TRAIN = ["dist-lm", "train", "--resume", "auto", "--global-batch-size", "4"]


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def record(**fields) -> str:
    return "dist-lm-record: " + json.dumps(fields)


class Fakes:
    """A fake mpirun whose n-th call (from 1) runs the shell snippet worlds[n] (the last
    one for later calls) and records its -H, and a fake ssh that answers for any host."""

    def __init__(self, tmp_path: Path, worlds: list[str]):
        self.dir = tmp_path
        self.calls = tmp_path / "calls"
        for i, body in enumerate(worlds, 1):
            executable(tmp_path / f"world{i}.sh", "#!/bin/sh\n" + body + "\n")
        bindir = tmp_path / "bin"
        bindir.mkdir()
        self.mpirun = executable(bindir / "mpirun", textwrap.dedent(f"""\
            #!/bin/sh
            hosts=""; prev=""
            for a in "$@"; do [ "$prev" = "-H" ] && hosts="$a"; prev="$a"; done
            echo "$hosts" >> {self.calls}
            n=$(wc -l < {self.calls})
            [ -x {tmp_path}/world$n.sh ] || n={len(worlds)}
            exec {tmp_path}/world$n.sh
            """))
        self.ssh = executable(tmp_path / "ssh", "#!/bin/sh\nexit 0\n")

    def worlds(self) -> list[str]:
        """The -H of each world started."""
        return self.calls.read_text().split() if self.calls.exists() else []

    def launch(self, script: Path, *flags) -> list:
        return [BIN / "dist-lm", "launch", "--host-discovery-script", script,
                "--discovery-interval", "60", *flags, self.mpirun, "-mca", "plm_rsh_agent",
                self.ssh, *TRAIN]


def listing(tmp_path: Path, hosts: str) -> Path:
    return executable(tmp_path / "discover.sh", f"#!/bin/sh\nprintf '{hosts}'\n")


# --- 1. one host, several names ------------------------------------------------------------

def test_a_host_is_one_host_under_its_short_and_full_names_and_any_case():
    assert same_host("w-2", "w-2.job.ns.svc")
    assert same_host("W-2.Job.NS.svc", "w-2.job.ns.svc.cluster.local.")
    assert not same_host("w-2", "w-20.job.ns.svc")
    assert not same_host("w-2.a", "w-2.b")  # two domains: two hosts
    assert same_host("10.0.0.1", "10.0.0.1") and not same_host("10.0.0.1", "10.0.0.10")
    assert not same_host("node1", "10.0.0.1")


def test_a_host_blamed_by_its_short_name_cools_down_under_its_full_name():
    now = [0.0]
    cool = Cooldowns(10, 40, clock=lambda: now[0])
    listed = [("w-1.job.ns.svc", 1), ("w-2.job.ns.svc", 1)]
    assert cool.fail("w-2") == 10
    assert cool.usable(listed) == [("w-1.job.ns.svc", 1)]
    assert cool.fail("W-2.job.ns.svc") == 20  # the same host's second failure
    now[0] += 25
    assert cool.usable(listed) == listed
    # The last world's hosts stay first, under whichever name the script gives them now.
    assert discovery.choose(listed, 2, keep=["W-2"]) == [("w-2.job.ns.svc", 1),
                                                         ("w-1.job.ns.svc", 1)]


def test_the_next_world_leaves_out_a_host_mpirun_blamed_by_its_short_name(tmp_path):
    """mpirun names the node `w-2`; the discovery script lists `w-2.job.ns.svc`."""
    fakes = Fakes(tmp_path, [
        "echo 'mpirun noticed that process rank 1 with PID 7008 on node w-2 exited on "
        "signal 9 (Killed).' >&2; exit 137",
        "exit 0"])
    script = listing(tmp_path, "w-1.job.ns.svc\\nw-2.job.ns.svc\\n")
    done = run(fakes.launch(script, "--min-np", "1", "--reset-limit", "3"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert fakes.worlds() == ["w-1.job.ns.svc:1,w-2.job.ns.svc:1", "w-1.job.ns.svc:1"], \
        done.stderr
    assert "restart 1: w-2 lost" in done.stderr, done.stderr


# --- 2. a run directory still locked -------------------------------------------------------

BUSY = "run directory /runs/x is in use by another job (host w-1, pid 42, since " \
       "2024-01-01 00:00:00 UTC); stop it or choose another --run-dir"


def busy_world() -> str:
    """Both ranks refuse the run directory, as run_everywhere makes them: exit 5."""
    lines = [record(event="exit", rank=r, size=2, host=f"w-{r}", pid=100 + r, code=5,
                    kind="error", reason=(BUSY if r == 0 else f"rank 0: {BUSY}"))
             for r in (0, 1)]
    return "".join(f"echo '{x}' >&2; " for x in lines) + "exit 5"


def test_a_locked_run_directory_is_waited_for_and_not_counted_against_the_reset_limit(
        tmp_path):
    fakes = Fakes(tmp_path, [busy_world(), busy_world(), "exit 0"])
    script = listing(tmp_path, "w-0\\nw-1\\n")
    done = run(fakes.launch(script, "--reset-limit", "0"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(fakes.worlds()) == 3, done.stderr
    waits = [x for x in done.stderr.splitlines() if "run directory is still locked" in x]
    assert len(waits) == 2 and "starting again in 1s" in waits[0] and \
        "starting again in 2s" in waits[1], done.stderr
    assert "not counted against --reset-limit" in waits[0] and "restart" not in done.stderr


def test_a_run_directory_locked_past_the_busy_timeout_ends_the_job_with_one_line(tmp_path):
    fakes = Fakes(tmp_path, [busy_world()])
    script = listing(tmp_path, "w-0\\nw-1\\n")
    start = time.monotonic()
    done = run(fakes.launch(script, "--busy-timeout", "1.5"), timeout=60)
    assert done.returncode == 5, done.stderr
    assert time.monotonic() - start < 20
    assert len(fakes.worlds()) >= 2, done.stderr  # at 0, after 1 s, (after 0.5 s more)
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"dist-lm: error: job failed: the run directory was still locked after " \
                   f"1.5s (--busy-timeout): [rank 0 on w-0] {BUSY}", done.stderr


def test_the_busy_timeout_defaults_to_the_training_commands_longest_wait():
    from dist_lm.config import LaunchConfig
    from dist_lm.runtime.elastic import BUSY_MARGIN_S, busy_timeout

    cfg = LaunchConfig(host_discovery_script="/bin/true")
    assert busy_timeout(TRAIN, cfg) == 1800 + BUSY_MARGIN_S
    assert busy_timeout([*TRAIN, "--watchdog-s", "3000"], cfg) == 3000 + BUSY_MARGIN_S
    assert busy_timeout([*TRAIN, "--checkpoint-timeout-s", "0"], cfg) == 1800 + BUSY_MARGIN_S
    cfg.busy_timeout = 30.0
    assert busy_timeout(TRAIN, cfg) == 30


# --- 3a. a stop between two worlds ---------------------------------------------------------

def leaving_world(*leaving: int, ranks: int = 3) -> str:
    """Every rank stops with a checkpoint; those in `leaving` got the stop signal."""
    lines = [record(event="exit", rank=r, size=ranks, host=f"w-{r}", pid=100 + r,
                    code=143, kind="stopped", signalled=r in leaving, step=10, checkpoint=10,
                    reason="stopped by a signal at step 10, checkpoint written")
             for r in range(ranks)]
    return "".join(f"echo '{x}' >&2; " for x in lines) + "exit 143"


def test_a_stop_signal_between_two_worlds_starts_no_world_and_ends_as_a_stop(tmp_path):
    fakes = Fakes(tmp_path, [leaving_world(1, ranks=2), "sleep 30"])
    # The second look for hosts (the one between the worlds) takes a while; the test
    # signals the supervisor then.
    looks, between = tmp_path / "looks", tmp_path / "between"
    script = executable(tmp_path / "discover.sh", textwrap.dedent(f"""\
        #!/bin/sh
        echo x >> {looks}
        if [ "$(wc -l < {looks})" -eq 2 ]; then touch {between}; sleep 2; fi
        printf 'w-0\\nw-1\\n'
        """))
    proc = subprocess.Popen([str(c) for c in fakes.launch(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not between.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert between.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 143, err
    assert fakes.worlds() == ["w-0:1,w-1:1"], err  # no second world
    assert err.strip().splitlines()[-1] == \
        "dist-lm: stopped: job stopped while it waited to start again", err


def test_a_stop_that_came_before_the_launcher_started_does_not_start_it(tmp_path):
    fakes = Fakes(tmp_path, ["exit 0"])
    signals = Signals()
    signals.received.append(signal.SIGTERM)  # as its handler would, between two worlds
    ending = run_launcher([str(fakes.mpirun), "-np", "1", "-H", "w-0:1", *TRAIN], signals)
    assert (ending.code, ending.verdict) == (143, "stopped")
    assert fakes.worlds() == []


# --- 3b. every leaving pod -----------------------------------------------------------------

STOP_FLAG = """
import os, signal, sys
from dist_lm.runtime.lifecycle import StopFlag
flag = StopFlag()
flag.install()
flag.arm()
flag.agreed = True  # the ranks agreed to stop: this rank is writing the stop checkpoint
os.kill(os.getpid(), getattr(signal, sys.argv[1]))
print(flag.signalled)
"""


@pytest.mark.parametrize("sig,leaving", [("SIGUSR1", True), ("SIGTERM", False)])
def test_a_sigusr1_after_the_ranks_agreed_to_stop_still_marks_the_rank_as_leaving(
        sig, leaving):
    """A second pod's preStop hook (SIGUSR1) just after the first's: that pod goes away
    too. SIGTERM then is the launcher ending the ranks, not this rank's own."""
    done = subprocess.run([sys.executable, "-c", STOP_FLAG, sig], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(leaving)


def test_every_host_whose_ranks_got_the_stop_signal_is_left_out_of_the_next_world(tmp_path):
    fakes = Fakes(tmp_path, [leaving_world(1, 2), "exit 0"])
    script = listing(tmp_path, "w-0\\nw-1\\nw-2\\n")
    done = run(fakes.launch(script, "--reset-limit", "0"), timeout=60)
    assert done.returncode == 0, done.stderr
    assert fakes.worlds() == ["w-0:1,w-1:1,w-2:1", "w-0:1"], done.stderr


# --- 3c. storage that fails for a while ----------------------------------------------------

@pytest.mark.parametrize("code,exit_code", [(errno.ENOLCK, 7), (errno.ESTALE, 7),
                                            (errno.EIO, 7), (errno.EACCES, 2)])
def test_a_transient_storage_error_ends_the_ranks_with_its_own_exit_code(code, exit_code):
    from dist_lm.errors import UsageError
    from dist_lm.runtime.dist import run_everywhere

    class OneRank:
        size = 1

        def allgather_object(self, obj, name):
            return [obj]

    def lock():  # as training/rundir.py reports a failed flock
        try:
            raise OSError(code, os.strerror(code))
        except OSError as err:
            raise UsageError(f"cannot lock run directory /runs/x: {err.strerror}") from None

    with pytest.raises(UsageError) as raised:
        run_everywhere(OneRank(), lock, "run-dir")
    assert raised.value.exit_code == exit_code
    assert str(raised.value) == f"cannot lock run directory /runs/x: {os.strerror(code)}"


def test_the_supervisor_starts_again_after_a_transient_storage_error(tmp_path):
    line = record(event="exit", rank=0, size=1, host="w-0", pid=100, code=7, kind="error",
                  reason="cannot lock run directory /runs/x: No locks available")
    fakes = Fakes(tmp_path, [f"echo '{line}' >&2; exit 7", "exit 0"])
    done = run(fakes.launch(listing(tmp_path, "w-0\\n")), timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(fakes.worlds()) == 2
    assert "the world failed with no host to blame ([rank 0 on w-0] cannot lock run " \
           "directory /runs/x: No locks available); starting again in 2s" in done.stderr


# --- 3d. a discovery script that keeps its output open -------------------------------------

def test_a_discovery_script_whose_child_holds_its_output_open_cannot_hang_it(tmp_path):
    """The script prints its hosts and exits, leaving a child of its own session (setsid,
    out of reach of a session kill) with its stdout."""
    pidfile = tmp_path / "child.pid"
    script = executable(tmp_path / "discover.sh", textwrap.dedent(f"""\
        #!/bin/sh
        echo w-0
        setsid sh -c 'echo $$ > {pidfile}; exec sleep 30' &
        """))
    outcome = []
    looker = threading.Thread(target=lambda: outcome.append(_discover(script)), daemon=True)
    start = time.monotonic()
    looker.start()
    try:
        looker.join(timeout=15)
        assert not looker.is_alive(), "discovery hung on the child's open stdout"
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        looker.join(timeout=10)
    assert time.monotonic() - start < 6
    assert isinstance(outcome[0], DiscoveryFailed)
    assert str(outcome[0]) == f"{script} did not finish within 1s (it exited, but a process " \
                              f"it started kept its output open); ended it and the " \
                              f"processes it started"


def _discover(script):
    try:
        return discovery.discover(str(script), 1, timeout_s=1)
    except DiscoveryFailed as err:
        return err


def test_a_discovery_time_out_is_said_in_one_line_and_counts_as_no_hosts(tmp_path):
    script = executable(tmp_path / "discover.sh", "#!/bin/sh\nsleep 2 &\nsleep 30\n")
    start = time.monotonic()
    with pytest.raises(DiscoveryFailed, match=r"did not finish within 0.5s; ended it"):
        discovery.discover(str(script), 1, timeout_s=0.5)
    assert time.monotonic() - start < 4
