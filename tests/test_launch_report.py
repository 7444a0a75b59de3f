"""How `dist-lm launch` learns what ended a job: the ranks' own records first
(dist_lm/runtime/selfreport.py), then a probe of the silent ranks' hosts, the launcher's
words last (dist_lm/runtime/jobreport.py). Fast: the decisions from fed lines, the records
that real dist-lm processes write, the probe on this machine, and the supervisor over
local launchers (the same across simulated nodes: tests/test_multinode.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
from io import BytesIO

import pytest

from conftest import BIN, run
from dist_lm.runtime import selfreport
from dist_lm.runtime.jobreport import JobReport, probe_hosts
from dist_lm.runtime.launch import _relay, ask_for_records
from dist_lm.runtime.procs import kill_session

HOSTS3 = ["node1", "node2", "node3"]
PIDS = {0: 101, 1: 102, 2: 103}
HOST = socket.gethostname()


def start(rank, host=None, pid=None, size=3):
    return selfreport.PREFIX + json.dumps({"event": "start", "rank": rank, "size": size,
                                           "host": host or HOSTS3[rank],
                                           "pid": pid or PIDS[rank]})


def exit_(rank, code, reason, kind=None, host=None):
    kind = kind or ("ok" if code == 0 else "error")
    return selfreport.PREFIX + json.dumps({"event": "exit", "rank": rank, "size": 3,
                                           "host": host or HOSTS3[rank], "pid": PIDS[rank],
                                           "code": code, "kind": kind, "reason": reason})


def started3():
    return [start(r) for r in range(3)]


LOST_PEER = "lost a peer rank: Horovod shut down after a peer rank failed or stopped answering"
WATCHDOG = ("no training progress for 31s (--watchdog-s 30): a peer rank may have died or "
            "stopped answering; exiting")
STOPPED = "stopped by a signal at step 22, checkpoint written"


def fake_probe(unreachable=None, alive=()):
    """What probe_hosts would find: the hosts that do not answer (host -> ssh's line),
    and the pids that still run on those that do. Records which hosts were asked."""
    asked = []

    def probe(targets):
        asked.append(dict(targets))
        return {h: ((unreachable or {}).get(h), [p for p in pids if p in alive])
                for h, pids in targets.items()}

    probe.asked = asked
    return probe


def report_of(lines, hosts=HOSTS3, probe=None, code=1, stop_asked=False):
    report = JobReport(hosts)
    for line in lines:
        report.feed(line + "\n")
    return report.cause(code, stop_asked, probe=probe)


# --- what the ranks said ---------------------------------------------------------------------

def test_a_ranks_exit_record_says_why_before_the_symptoms_of_the_others():
    lines = [*started3(), exit_(0, 4, LOST_PEER), exit_(1, 2, "--train-file x: no such file")]
    probe = fake_probe()
    assert report_of(lines, probe=probe, code=2) == \
        ("error", "[rank 1 on node2] --train-file x: no such file")
    assert probe.asked == []  # a rank said why: nothing to probe
    tagged = [f"[{i % 3}]<stderr>:{x}" for i, x in enumerate(lines)]
    assert report_of(tagged, code=1)[1] == \
        "[rank 1 on node2] --train-file x: no such file"


def test_a_stop_that_was_asked_for_is_the_stop_whatever_else_happened():
    lines = [*started3(), exit_(1, 143, STOPPED, kind="stopped"), exit_(0, 4, LOST_PEER),
             "Connection to node3 closed by remote host.",
             "Process 2 exit with status code 255."]
    assert report_of(lines, stop_asked=True, probe=fake_probe()) == \
        ("stopped", f"[rank 1 on node2] {STOPPED}")
    # Not asked for: rank 2, silent and gone, is the story.
    assert report_of(lines, probe=fake_probe()) == \
        ("error", "rank 2 on node3 was killed (no exit record)")


def test_a_stop_nobody_here_asked_for_is_still_a_stop():
    """A worker's preStop hook stops the ranks: every one says it stopped."""
    lines = [start(0, size=2), start(1, size=2), exit_(0, 143, STOPPED, "stopped"),
             exit_(1, 143, STOPPED, "stopped")]
    assert report_of(lines, hosts=HOSTS3[:2], code=143, probe=fake_probe()) == \
        ("stopped", f"[rank 0 on node1] {STOPPED}")
    # The hook then ends the node's sshd, and mpirun says it lost the daemon there.
    lost = "ORTE has lost communication with a remote daemon."
    assert report_of([*lines, lost], hosts=HOSTS3[:2], code=143, probe=fake_probe()) == \
        ("stopped", f"[rank 0 on node1] {STOPPED}")
    # A rank that did not say it stopped, on a node that answers: not a stop.
    assert report_of([*lines[:-1], lost], hosts=HOSTS3[:2], code=143,
                     probe=fake_probe(alive={102})) == \
        ("error", "rank 1 on node2 hung or lost its launcher: no exit record, and its "
                  "process (pid 102) still ran when the job failed")


def test_a_second_stop_signal_while_the_stop_winds_down_keeps_the_job_a_stop():
    """The ranks stopped with a checkpoint; one is signalled again as it shuts down (Open
    MPI ends the job on the first exit 143): its record is a stop, so is the job."""
    done = python_rank("""
        import os, signal
        from dist_lm.runtime.lifecycle import STOP
        from dist_lm.runtime.selfreport import exit_record
        STOP.install()
        STOP.arm()
        os.kill(os.getpid(), signal.SIGTERM)  # the agreed stop: the flag only
        STOP.arm(False)                       # the loop is done; shutting down
        with exit_record():
            os.kill(os.getpid(), signal.SIGTERM)
        """)
    assert done.returncode == 143
    (end,) = records_in(done.stderr)
    assert (end["code"], end["kind"]) == (143, "stopped")
    lines = [start(0, size=2), start(1, size=2), exit_(1, 143, STOPPED, "stopped"),
             exit_(0, 143, end["reason"], end["kind"])]
    assert report_of(lines, hosts=HOSTS3[:2], code=143, probe=fake_probe())[0] == "stopped"


def test_addresses_are_hosts_of_their_own():
    """Ranks placed by address: 10.0.0.1 and 10.0.0.2 are two hosts, while a qualified
    name and its short name are one."""
    from dist_lm.runtime.jobreport import same_host
    assert not same_host("10.0.0.1", "10.0.0.2")
    assert same_host("10.0.0.1", "10.0.0.1")
    assert not same_host("node1", "10.0.0.1")
    assert same_host("w-0.svc", "w-0") and not same_host("w-0.svc", "w-1")


# --- the ranks that said nothing: the probe -------------------------------------------------

def test_a_silent_rank_whose_host_answers_and_whose_pid_is_gone_was_killed():
    lines = [*started3(), exit_(0, 4, LOST_PEER), exit_(1, 4, LOST_PEER)]
    probe = fake_probe(alive={101, 102})
    assert report_of(lines, probe=probe) == \
        ("error", "rank 2 on node3 was killed (no exit record)")
    assert probe.asked == [{"node3": [103]}]  # only the silent rank's host, its pid
    # The signal, where the launcher names it: mpirun ...
    mpirun = "mpirun noticed that process rank 2 with PID 7008 on node node3 exited on " \
             "signal 9 (Killed)."
    assert report_of([*lines, mpirun], probe=fake_probe()) == \
        ("error", "rank 2 on node3 was killed by signal 9 (Killed; no exit record)")
    # ... or horovodrun, for a worker on its own host (128 + N).
    local = [start(0, "here", 101, 2), start(1, "here", 102, 2),
             exit_(0, 4, LOST_PEER, host="here"), "Process 1 exit with status code 137."]
    assert report_of(local, hosts=["here"] * 2, probe=fake_probe()) == \
        ("error", "rank 1 on here was killed by signal 9 (Killed; no exit record)")


def test_a_silent_rank_whose_host_does_not_answer_is_a_lost_node():
    lines = [*started3(), exit_(0, 4, WATCHDOG)]
    probe = fake_probe(unreachable={"node3": "port 22: No route to host"}, alive={102})
    assert report_of(lines, probe=probe) == \
        ("error", "node node3 (rank 2) stopped answering: it does not answer ssh now "
                  "(port 22: No route to host)")


def test_ranks_that_never_started_on_a_host_ssh_cannot_reach():
    """No rank reported (mpirun could not start its daemon on node3): the command line
    says where they would have run."""
    probe = fake_probe(unreachable={"node3": "port 22: Connection refused"})
    assert report_of(["ORTE was unable to reliably start one or more daemons."],
                     probe=probe) == \
        ("error", "cannot reach node3 (rank 2) over ssh: port 22: Connection refused")
    assert probe.asked == [{"node1": [], "node2": [], "node3": []}]


def test_the_rank_gone_when_the_job_began_to_fail_is_told_from_those_ended_after_it():
    """mpirun ends the other ranks once one is gone, and they leave no record either: the
    probe taken as the job began to fail saw which was gone then."""
    lines = started3()
    report = JobReport(HOSTS3)
    for line in lines:
        report.feed(line)
    report.probe(fake_probe(alive={101, 102}))     # as the job began to fail
    assert report.cause(1, False, probe=fake_probe()) == \
        ("error", "rank 2 on node3 was killed (no exit record)")
    # Probed only after the launcher ended them all, none is told apart: all are named.
    assert report_of(lines, probe=fake_probe()) == \
        ("error", "rank 0 on node1 was killed (no exit record; ranks 1, 2 left none either)")


def test_a_silent_rank_that_still_runs_hung_or_lost_its_launcher():
    lines = [*started3(), exit_(0, 4, WATCHDOG), exit_(1, 4, WATCHDOG)]
    assert report_of(lines, probe=fake_probe(alive={103})) == \
        ("error", "rank 2 on node3 hung or lost its launcher: no exit record, and its "
                  "process (pid 103) still ran when the job failed")


def test_the_hosts_a_rank_names_and_the_launcher_names_are_one_host():
    """The hostfile's qualified name is the one ssh reaches; a rank says its short name."""
    hosts = ["w-0.svc", "w-1.svc"]
    lines = [start(0, "w-0", 101, 2), start(1, "w-1", 102, 2),
             exit_(0, 4, LOST_PEER, host="w-0")]
    probe = fake_probe()
    assert report_of(lines, hosts=hosts, probe=probe) == \
        ("error", "rank 1 on w-1.svc was killed (no exit record)")
    assert probe.asked == [{"w-1.svc": [102]}]


# --- the weaker records, then the launcher --------------------------------------------------

def test_the_symptoms_when_nothing_else_is_known():
    lines = [*started3(), exit_(0, 4, WATCHDOG), exit_(1, 4, LOST_PEER),
             exit_(2, 143, "ended by signal 15 (Terminated)")]
    assert report_of(lines, probe=fake_probe()) == \
        ("error", "[rank 2 on node3] ended by signal 15 (Terminated)")
    assert report_of(lines[:-1] + [exit_(2, 4, WATCHDOG)], probe=fake_probe()) == \
        ("error", f"[rank 0 on node1] {WATCHDOG}")


def test_without_records_the_launcher_has_the_last_word():
    assert report_of([], hosts=None, code=-9) == \
        ("error", "the launcher was killed by signal 9 (Killed)")
    assert report_of([], hosts=None, code=7) == \
        ("error", "the launcher exited with code 7")


def test_a_killed_launchers_code_is_the_first_causes():
    report = JobReport(HOSTS3)
    for line in [*started3(), exit_(0, 4, LOST_PEER), exit_(2, 3, "non-finite loss")]:
        report.feed(line)
    assert report.failed_code() == 3
    assert JobReport(HOSTS3).failed_code() == 1


# --- the lines themselves --------------------------------------------------------------------

def test_records_spliced_into_one_line_are_each_read():
    report = JobReport(HOSTS3)
    assert report.feed(start(1) + start(2) + "\n") is None
    assert (report.ranks[1].pid, report.ranks[2].pid) == (102, 103)


def test_records_are_read_and_kept_from_the_user_and_other_lines_pass():
    text = (f"{start(0)}\n"
            f"[1]<stderr>:{start(1)}\n"
            "[1]<stderr>:dist-lm: error: [rank 1] --train-file x: no such file\n"
            # a fragment of another rank's line that a record was spliced onto
            f"Traceback (most recent call last):{exit_(1, 2, 'x: no such file')}\n"
            "Epoch 1 Batch 10/20\n").encode()
    sink, report = BytesIO(), JobReport(HOSTS3)
    _relay(BytesIO(text), sink, report)
    assert sink.getvalue().decode().splitlines() == [
        "[1]<stderr>:dist-lm: error: [rank 1] --train-file x: no such file",
        "Traceback (most recent call last):",
        "Epoch 1 Batch 10/20"]
    assert (report.ranks[0].pid, report.ranks[1].pid, report.ranks[1].exit["code"]) == \
        (101, 102, 2)
    assert report.failing_since is not None  # a rank's error is the job failing


def test_horovodruns_own_traceback_shrinks_to_its_last_line():
    text = (b"[0]<stderr>:Traceback (most recent call last):\n"
            b"[0]<stderr>:  File \"x.py\", line 1\n"
            b"Process 2 exit with status code 255.\n"
            b"Traceback (most recent call last):\n"
            b"  File \"/v/bin/horovodrun\", line 8, in <module>\n"
            b"    sys.exit(run_commandline())\n"
            b"RuntimeError: Horovod detected that one or more processes exited\n"
            b"Process name: 2\n")
    sink, report = BytesIO(), JobReport(HOSTS3)
    _relay(BytesIO(text), sink, report, drop_tracebacks=True)
    assert sink.getvalue().splitlines() == [
        b"[0]<stderr>:Traceback (most recent call last):", b"[0]<stderr>:  File \"x.py\", line 1",
        b"Process 2 exit with status code 255.",
        b"RuntimeError: Horovod detected that one or more processes exited", b"Process name: 2"]
    assert report.launcher_exits == [(2, 255)]


def test_the_supervisor_asks_the_ranks_for_records_through_the_launcher():
    argv, env = ask_for_records(["mpirun", "-np", "2", "dist-lm", "train"], "mpirun")
    assert argv == ["mpirun", "-x", selfreport.REQUEST, "-np", "2", "dist-lm", "train"]
    assert env[selfreport.REQUEST] == "1"
    argv, env = ask_for_records(["horovodrun", "-np", "2", "x"], "horovodrun")
    assert argv == ["horovodrun", "-np", "2", "x"] and env[selfreport.REQUEST] == "1"


# --- the records real processes write ----------------------------------------------------------

RANK1 = {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", selfreport.REQUEST: "1"}


def records_in(stderr):
    found = [selfreport.parse(x)[0] for x in stderr.splitlines()]
    return [r for rs in found for r in rs]


def test_a_dist_lm_rank_reports_its_start_and_its_end_when_asked():
    done = run([BIN / "dist-lm", "train", "--no-such-flag"], env=RANK1, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    # The command line's error names the subcommand (cli.py).
    (human,) = [x for x in lines if x.startswith("dist-lm train: error: [rank 1] ")]
    assert len(lines) == 3, done.stderr
    begin, end = records_in(done.stderr)  # in this order, the human line between
    assert begin == {"event": "start", "rank": 1, "size": 2, "host": HOST,
                     "pid": begin["pid"]} and begin["pid"] > 0
    assert end == {**begin, "event": "exit", "code": 2, "kind": "error", "signalled": False,
                   "reason": human.removeprefix("dist-lm train: error: [rank 1] ")}


def test_a_rank_writes_no_record_unless_asked():
    done = run([BIN / "dist-lm", "train", "--no-such-flag"],
               env={**RANK1, selfreport.REQUEST: ""}, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr


def python_rank(code, env=RANK1):
    return run([BIN / "python", "-c", textwrap.dedent(code)], env=env, timeout=60)


def test_the_watchdogs_exit_and_a_signals_end_leave_exit_records():
    done = python_rank("""
        from dist_lm.runtime.lifecycle import exit_now
        exit_now("no training progress for 31s")
        """)
    assert done.returncode == 4
    (end,) = records_in(done.stderr)
    assert (end["code"], end["kind"], end["reason"]) == \
        (4, "error", "no training progress for 31s")
    done = python_rank("""
        import os, signal
        from dist_lm.runtime.lifecycle import STOP
        from dist_lm.runtime.selfreport import exit_record
        STOP.install()
        with exit_record():
            os.kill(os.getpid(), signal.SIGTERM)
        """)
    assert done.returncode == 143
    (end,) = records_in(done.stderr)
    # A stop signal outside training is a stop, not an error (lifecycle marks its exit).
    assert (end["code"], end["kind"], end["reason"]) == \
        (143, "stopped", "ended by signal 15 (Terminated)")
    done = python_rank("""
        from dist_lm.runtime.selfreport import exit_record
        with exit_record():
            raise KeyError("vocab")
        """)
    assert done.returncode == 1 and "Traceback" in done.stderr
    (end,) = records_in(done.stderr)
    assert (end["code"], end["reason"]) == (1, "KeyError: 'vocab'")


# --- the probe ---------------------------------------------------------------------------------

def test_the_probe_tells_running_from_gone_here_and_reads_ssh_where_a_host_does_not_answer():
    gone = subprocess.Popen(["true"])
    gone.wait()
    found = probe_hosts({HOST: [os.getpid(), gone.pid],
                         "127.0.0.2": [os.getpid()]},   # loopback; nothing listens on 9
                        ["ssh", "-p", "9", "-o", "StrictHostKeyChecking=no"], timeout_s=5)
    assert found[HOST] == (None, [os.getpid()])
    reason, alive = found["127.0.0.2"]
    assert reason == "port 9: Connection refused" and alive == []


# --- the supervisor over local launchers ------------------------------------------------------

# Rank 1 reports its start, then is killed and leaves no exit record; rank 0 ends as
# dist-lm's ranks do, with a record: it reports that it lost its peer, or, when the
# launcher ends it first, the signal.
KILLED_RANK = textwrap.dedent("""
    import os, signal, time
    from dist_lm.runtime import selfreport
    from dist_lm.runtime.lifecycle import STOP, exit_now
    STOP.install()
    selfreport.started()
    if os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    with selfreport.exit_record():
        time.sleep(1)
        exit_now("lost a peer rank: Connection reset by peer")
    """)


def supervised(*argv, timeout=120):
    proc = subprocess.Popen([str(BIN / "dist-lm"), "launch", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"))
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
    return proc.returncode, out, err


def assert_last_line(err, expected):
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1] == f"dist-lm: error: job failed: {expected}", err
    assert selfreport.PREFIX not in err, err  # the records stay with the supervisor


@pytest.mark.dist
@pytest.mark.medium
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_a_rank_killed_under_a_local_launcher_is_named_from_its_records(launcher):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 and launcher == "mpirun" else []
    extra = ["--gloo"] if launcher == "horovodrun" else []
    code, _, err = supervised(launcher, *root, "-np", "2", "-H", "localhost:2", *extra,
                              BIN / "python", "-c", KILLED_RANK)
    assert code != 0
    assert_last_line(err, f"rank 1 on {HOST} was killed by signal 9 (Killed; no exit record)")


@pytest.mark.medium
def test_a_rank_killed_is_named_where_the_launcher_says_nothing():
    """Two ranks started by a shell, which prints nothing about them: the records and
    the probe alone find the one that was killed."""
    script = (f"HOROVOD_RANK=1 HOROVOD_SIZE=2 {BIN}/python -c \"$0\" & "
              f"HOROVOD_RANK=0 HOROVOD_SIZE=2 {BIN}/python -c \"$0\"; wait; exit 1")
    code, _, err = supervised("bash", "-c", script, KILLED_RANK)
    assert code == 1
    assert_last_line(err, f"rank 1 on {HOST} was killed (no exit record)")


def test_a_launcher_killed_by_a_signal_exits_128_plus_it_with_one_line():
    code, _, err = supervised("bash", "-c", "kill -KILL $$")
    assert code == 137
    assert err.splitlines()[-1] == \
        "dist-lm: error: job failed: the launcher was killed by signal 9 (Killed)", err


def test_sighup_to_the_wrapper_stops_the_launcher_as_sigterm_does():
    """The terminal or ssh session the job was started from goes away: the launcher is
    asked to stop, and the wrapper stays to say how it ended."""
    proc = subprocess.Popen([BIN / "dist-lm", "launch", "bash", "-c",
                             "trap 'echo stopped on TERM; exit 7' TERM; echo ready; "
                             "while :; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 7 and out == "stopped on TERM\n", (out, err)
    assert err.splitlines()[-1] == "dist-lm: error: job failed: the launcher exited with code 7"


def test_the_request_for_records_is_this_processs_not_its_childrens():
    done = python_rank("""
        import os, subprocess, sys
        from dist_lm.runtime import selfreport
        selfreport.started()
        subprocess.run([sys.executable, "-c", "from dist_lm.runtime import selfreport; "
                        "selfreport.started()"], check=True)
        print(os.environ.get(selfreport.REQUEST))
        """)
    assert done.returncode == 0 and done.stdout == "None\n", done
    assert [r["event"] for r in records_in(done.stderr)] == ["start"]


# --- for an elastic restart -------------------------------------------------------------------

def fed(lines, hosts=HOSTS3, probe=None) -> JobReport:
    report = JobReport(hosts)
    for line in lines:
        report.feed(line + "\n")
    if probe is not None:
        report.probe(probe)
    return report


def test_the_lost_hosts_are_those_that_stopped_answering_not_those_ended_after():
    # node3 unreachable; node2's rank, ended by the launcher afterwards, is gone too.
    report = fed(started3(), probe=fake_probe(unreachable={"node3": "timed out"}, alive={101}))
    assert report.lost_hosts() == ["node3"]
    # All answer: the rank killed first, as the launcher names it (horovodrun's order).
    report = fed([*started3(), "Process 2 exit with status code 255.",
                  "Process 1 exit with status code 255."], probe=fake_probe(alive={101}))
    assert report.lost_hosts() == ["node3"]
    # mpirun's word alone, no records at all.
    report = fed(["mpirun noticed that process rank 1 with PID 7008 on node node2 exited "
                  "on signal 9 (Killed)."], hosts=None)
    assert report.lost_hosts() == ["node2"]
    # Every rank said how it ended: nothing lost.
    report = fed([*started3(), *(exit_(r, 4, WATCHDOG) for r in range(3))],
                 probe=fake_probe())
    assert report.lost_hosts() == []


def signalled_stop(rank, signalled):
    record = json.loads(exit_(rank, 143, STOPPED, "stopped")[len(selfreport.PREFIX):])
    return selfreport.PREFIX + json.dumps({**record, "signalled": signalled})


def test_the_host_whose_ranks_got_the_stop_signal_is_leaving():
    report = fed([*started3(), signalled_stop(0, False), signalled_stop(1, True),
                  signalled_stop(2, False)])
    assert report.leaving_hosts() == ["node2"] and report.lost_hosts() == []
    assert report.cause(143, False) == ("stopped", f"[rank 1 on node2] {STOPPED}")


@pytest.mark.parametrize("code,hopeless", [(2, True), (3, True), (4, False), (1, False),
                                           (137, False)])
def test_only_bad_input_and_non_finite_values_are_not_worth_a_restart(code, hopeless):
    report = fed([*started3(), exit_(1, code, "why")])
    assert report.hopeless() is hopeless


def test_how_far_the_job_got_from_progress_and_exit_records():
    progress = [selfreport.PREFIX + json.dumps({"event": "progress", "rank": 0, "size": 3,
                                                "host": "node1", "pid": 101, **f})
                for f in ({"checkpoint": 20}, {"step": 25}, {"step": 30})]
    assert fed(started3()).progress() == (None, None)
    assert fed([*started3(), *progress]).progress() == (30, 20)
    record = json.loads(exit_(1, 4, WATCHDOG)[len(selfreport.PREFIX):])
    later = selfreport.PREFIX + json.dumps({**record, "step": 33, "checkpoint": 30})
    assert fed([*started3(), *progress, later]).progress() == (33, 30)


def test_a_program_mpirun_cannot_find_is_the_last_line_not_its_exit_code(tmp_path):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    proc = run([BIN / "dist-lm", "launch", "mpirun", *root, "-np", "2", "-H", "localhost:2",
                "dist-lm-not-installed"], timeout=60, cwd=tmp_path)
    assert proc.returncode == 134, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"dist-lm: error: job failed: mpirun could not find dist-lm-not-installed on "
        f"{HOST} (not installed there, or not on the PATH the ranks get: mpirun -x PATH)")
