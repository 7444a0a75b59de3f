"""The launcher's words that `dist-lm launch` still reads (dist_lm/runtime/jobreport.py,
the last resort after the ranks' own records): each pattern against the example line
quoted at its definition, as the launcher prints it, and what the report takes from it."""

from dist_lm.runtime import jobreport
from dist_lm.runtime.jobreport import (DAEMON_LOST, DAEMON_NO_ROUTE, DAEMON_NOT_STARTED,
                                       HVD_EXIT, LAUNCHER_TAG, LAUNCHER_WORDS, NOT_FOUND,
                                       PEER_HUNG_UP, SIGNAL_DEATH, JobReport)

HOSTS3 = ["node1", "node2", "node3"]


def fed(*lines):
    report = JobReport(HOSTS3)
    kept = [report.feed(line + "\n") for line in lines]
    return report, kept


def test_every_pattern_quotes_its_example_line_at_its_definition():
    """The examples below are the ones in jobreport.py's comments, word for word."""
    source = open(jobreport.__file__, encoding="utf-8").read()
    for pattern, example in EXAMPLES.items():
        assert f"#   {example}\n" in source, example
        assert pattern.search(example), (pattern.pattern, example)
    assert set(EXAMPLES) == set(LAUNCHER_WORDS)


EXAMPLES = {
    SIGNAL_DEATH: "mpirun noticed that process rank 2 with PID 7008 on node node3 exited on "
                  "signal 9 (Killed).",
    HVD_EXIT: "Process 2 exit with status code 255.",
    DAEMON_NOT_STARTED: "ORTE was unable to reliably start one or more daemons.",
    DAEMON_LOST: "ORTE has lost communication with a remote daemon.",
    DAEMON_NO_ROUTE: "ORTE does not know how to route a message to the specified daemon",
    PEER_HUNG_UP: "An MPI communication peer process has unexpectedly disconnected.  This",
    NOT_FOUND: "mpirun was unable to find the specified executable file, and therefore",
    LAUNCHER_TAG: "[2]<stderr>:",
}


def test_mpiruns_signal_death_names_the_rank_its_node_and_the_signal():
    report, kept = fed(EXAMPLES[SIGNAL_DEATH])
    assert report.signal_deaths == [(2, "node3", 9)]
    assert report.failing_since is not None and kept == [EXAMPLES[SIGNAL_DEATH] + "\n"]
    assert report.cause(137, False) == \
        ("error", "rank 2 on node3 was killed by signal 9 (Killed)")
    # Open MPI 5 (PRRTE) prints it under its own name, and may leave out the name.
    prte = "prterun noticed that process rank 1 with PID 0 on node vm exited on signal 15."
    assert fed(prte)[0].signal_deaths == [(1, "vm", 15)]


def test_horovodruns_exit_line_names_the_rank_and_its_code():
    report, _ = fed(EXAMPLES[HVD_EXIT])
    assert report.launcher_exits == [(2, 255)] and report.failing_since is not None
    assert report.cause(1, False) == ("error", "rank 2 on node3 exited with code 255")
    # A worker that exits 0 is no failure.
    assert fed("Process 1 exit with status code 0.")[0].failing_since is None


def test_mpiruns_daemon_lines_say_the_job_is_failing():
    for line in (EXAMPLES[DAEMON_NOT_STARTED], EXAMPLES[DAEMON_LOST],
                 EXAMPLES[DAEMON_NO_ROUTE]):
        report, _ = fed(line)
        assert report.daemon_trouble and report.failing_since is not None, line
        assert report.cause(1, False) == \
            ("error", "mpirun could not start or lost one of its daemons on the other nodes")
    # Open MPI 3's wording of a lost node.
    assert fed("ORTE has lost communication with its daemon located on node:")[0].daemon_trouble


def test_a_ranks_mpi_library_seeing_its_peer_go_says_the_job_is_failing():
    report, _ = fed(EXAMPLES[PEER_HUNG_UP])
    assert report.failing_since is not None and not report.daemon_trouble


def test_what_is_left_of_a_record_under_horovodrun_is_its_tag_and_is_dropped():
    record = '[2]<stderr>:dist-lm-record: {"event": "start", "rank": 2, "host": "node3", ' \
             '"pid": 42}'
    report, kept = fed(record, "[2]<stderr>:dist-lm: error: [rank 2] no such file")
    assert LAUNCHER_TAG.fullmatch(EXAMPLES[LAUNCHER_TAG])
    assert kept == [None, "[2]<stderr>:dist-lm: error: [rank 2] no such file\n"]
    assert report.ranks[2].pid == 42
    # mpirun --tag-output's tag.
    assert LAUNCHER_TAG.fullmatch("[1,2]<stderr>:")
    assert not LAUNCHER_TAG.fullmatch("[2]<stderr>:text")


def test_no_other_launcher_text_is_read():
    """What the report once read from ssh, mpirun's boxes and Gloo's errors changes
    nothing now: the ranks' records and the probe say it."""
    lines = ["ssh: connect to host node3 port 22: Connection refused",
             "Timeout, server node3 not responding.",
             "  Remote daemon: [[1,0],2] on node node3",
             "  Peer host:  node3",
             "  Process name: [[11687,1],1]",
             "  Exit code:    3",
             "Primary job  terminated normally, but 1 process returned",
             "Terminating remaining workers after failure of Process 2."]
    report, kept = fed(*lines)
    assert kept == [x + "\n" for x in lines]
    assert report.failing_since is None and not report.signal_deaths
    assert report.cause(1, False) == ("error", "the launcher exited with code 1")


def test_a_program_mpirun_cannot_find_is_named_with_its_node():
    """mpirun's whole message (Open MPI 4.1.4, as printed here), then its exit code 134."""
    report, _ = fed(
        "-" * 74,
        EXAMPLES[NOT_FOUND],
        "did not launch the job.  This error was first reported for process",
        "rank 0; it may have occurred for other processes as well.",
        "",
        "Node:       node3",
        "Executable: dist-lm",
        "-" * 74,
        "2 total processes failed to start")
    assert report.cause(134, False) == (
        "error", "mpirun could not find dist-lm on node3 (not installed there, or not on "
                 "the PATH the ranks get: mpirun -x PATH)")
    assert report.lost_hosts() == ["node3"]  # an elastic job goes on without it
