"""`dist-lm chaos` (dist_lm/tools/chaos.py, tools/chaos_checks.py): the fault schedule
drawn from a seed and replayed from its file, what the campaign reads from the job's
logs (steps lost, time to training again, each fault's share), the metrics.jsonl check,
bad input; and, in the slow tier, a short campaign on 4 simulated nodes.

The short campaign builds its own cluster (launch/chaos mounts the run directory's file
system before the nodes exist, so the suite's sim_cluster fixture does not fit); it
takes SIM_PREFIX, SIM_NET and SIM_STATE_DIR from the environment when set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pytest

from conftest import NO_NETNS, REPO, dist_lm, run
from dist_lm.errors import UsageError
from dist_lm.tools.chaos import KINDS, draw, launch_argv, schedule_from
from dist_lm.tools.chaos_checks import (Check, Fault, Line, Summary, attribute,
                                        metrics_gaps, table)


# --- the schedule -----------------------------------------------------------------------

def test_a_seed_draws_one_sequence_and_another_seed_another():
    kinds = list(KINDS)
    assert draw(7, 20, 4, 2, kinds) == draw(7, 20, 4, 2, kinds)
    assert draw(7, 20, 4, 2, kinds) != draw(8, 20, 4, 2, kinds)
    assert {f["kind"] for s in range(20) for f in draw(s, 20, 4, 2, kinds)} == set(KINDS)


@pytest.mark.parametrize("nodes,min_np", [(4, 2), (6, 2), (3, 1)])
def test_the_drawn_faults_respect_the_state_they_leave(nodes, min_np):
    """heal only a partitioned node, sshd-start only a stopped sshd, never node1 cut
    off nor given the preStop hook, never more than nodes - min_np - 1 nodes down at once."""
    for seed in range(200):
        down = {}
        for f in draw(seed, 30, nodes, min_np, list(KINDS)):
            kind, node = f["kind"], f["node"]
            assert 0.5 <= f["gap"] <= 1.5
            if kind in ("partition", "sshd-stop", "return-during-restart", "prestop"):
                assert node != "node1" and node not in down
            if kind == "partition":
                down[node] = "partition"
            elif kind == "sshd-stop":
                down[node] = "sshd"
            elif kind == "heal":
                assert down.pop(node) == "partition"
            elif kind == "sshd-start":
                assert down.pop(node) == "sshd"
            elif kind in ("kill-rank", "prestop"):
                assert node not in down
            assert len(down) <= nodes - min_np - 1


class Args:
    nodes, faults, seed, kinds, replay = 4, 6, 11, ",".join(KINDS), None


def test_a_written_schedule_replays_and_a_bad_one_is_one_line(tmp_path):
    sched = schedule_from(Args(), 2)
    assert sched["seed"] == 11 and len(sched["faults"]) == 6
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(sched))
    again = Args()
    again.replay, again.seed = str(path), 99
    assert schedule_from(again, 2) == sched
    again.nodes = 5
    with pytest.raises(UsageError, match="is for --nodes 4, not 5"):
        schedule_from(again, 2)
    path.write_text('{"faults": [{"kind": "meteor", "gap": 1}]}')
    again.nodes = 4
    with pytest.raises(UsageError, match="not a schedule.json"):
        schedule_from(again, 2)


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "1"], r"--nodes takes 2 to 12, not 1"),
    (["--kinds", "partition,meteor"], r"--kinds takes .*; not meteor"),
    (["--replay", "/nonexistent/schedule.json"],
     r"--replay /nonexistent/schedule.json: not a schedule.json"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    done = dist_lm("chaos", *argv, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"dist-lm: error: chaos: {message}.*",
                                            lines[0]), done.stderr


# --- what the campaign reads ------------------------------------------------------------

def out(t, epoch, batch):
    return Line(t, "out", f"[Epoch {epoch} Batch {batch}/100] loss 9.00, ppl 8103.08, "
                          f"throughput 100.00 samples/s")


def test_each_fault_gets_the_restarts_steps_lost_and_time_to_training_in_its_window():
    lines = [out(1, 0, 5), out(2, 0, 10), out(3, 0, 15), out(4, 0, 20),
             Line(20, "err", "dist-lm: elastic: restart 1: node4 lost (...); hosts a -> b, "
                             "ranks 4 -> 3; continuing from the checkpoint at step 10 "
                             "(10 step(s) lost)"),
             out(25, 0, 15), out(26, 0, 20), out(27, 0, 25),
             out(40, 0, 30), out(41, 1, 5)]
    worlds = [{"kind": "world", "step": 0, "time": 0.5},
              {"kind": "world", "step": 10, "time": 22.0}]
    faults = [Fault("partition", "node4", 5.0), Fault("heal", "node4", 30.0)]
    attribute(faults, lines, worlds, {(1, 5): 105}, end=50.0)
    cut, heal = faults
    assert (cut.restarts, cut.steps_lost, cut.said_lost) == (1, 10, 10)
    assert cut.resumed_s == pytest.approx(20.0)  # first train line after the world, 25 - 5
    assert (heal.restarts, heal.steps_lost, heal.said_lost, heal.resumed_s) == \
        (0, 0, None, None)


def test_a_world_started_by_a_new_supervisor_counts_its_steps_lost_too():
    """No restart line (the supervisor was killed and started again): the steps lost
    come from rank 0's lines and the world row alone."""
    lines = [out(1, 0, 30), out(2, 0, 35), out(9, 0, 30)]
    faults = [Fault("kill-supervisor", "node1", 1.5)]
    attribute(faults, lines, [{"kind": "world", "step": 25, "time": 8.0}], {}, end=10.0)
    assert (faults[0].restarts, faults[0].steps_lost, faults[0].said_lost) == (1, 10, None)
    assert faults[0].resumed_s == pytest.approx(7.5)


def test_metrics_gaps_names_steps_logged_twice_and_steps_missing():
    rows = [{"kind": "train", "step": s} for s in (5, 10, 10, 20)] + \
        [{"kind": "world", "step": 10}]
    assert metrics_gaps(rows, [5, 10, 15, 20]) == ([10], [15])
    assert metrics_gaps([{"kind": "train", "step": s} for s in (5, 10)], [5, 10]) == ([], [])


def test_the_table_counts_by_kind_and_a_failed_check_fails_the_summary():
    faults = [Fault("partition", "node3", 100.0, restarts=1, steps_lost=10, resumed_s=25.0),
              Fault("partition", "node2", 150.0, restarts=1, steps_lost=0, resumed_s=31.0),
              Fault("kill-rank", "node1", 200.0, survived=False)]
    summary = Summary(faults, [Check("job finished", True, "exit 0"),
                               Check("parameters", False, "max |diff| 1e-3")])
    assert not summary.ok
    text = table(summary, 100.0)
    assert re.search(r"^partition +2 +2 +2 +5 / 10 +28.0 / 31.0$", text, re.M), text
    assert re.search(r"^all +3 +2 +2 ", text, re.M), text
    assert "JOB ENDED" in text and "check FAIL parameters: max |diff| 1e-3" in text


def test_every_rank_gets_the_numerics_variables_of_the_uninterrupted_run(monkeypatch):
    """No rank runs beside mpirun: a BLAS setting the reference run had but the nodes'
    ranks lacked made the two compute apart (1.6e-3 after 9,000 steps)."""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    args = argparse.Namespace(nodes=4, controller="mpi")
    argv = launch_argv(args, REPO / "discover.sh", 2, ["--lr", "1"])
    exported = {argv[i + 1] for i, a in enumerate(argv[:argv.index("dist-lm", 1)])
                if a == "-x"}
    assert {"OPENBLAS_CORETYPE", "MXNET_ENGINE_TYPE", "OMP_NUM_THREADS=1"} <= exported
    assert "MKL_NUM_THREADS" not in exported and "OMP_NUM_THREADS" not in exported


# --- a short campaign -------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_short_campaign_survives_its_faults(tmp_path):
    """4 nodes, 4 faults over ~2 minutes, the recipe's dropout on, the run checked
    against one process."""
    env = {"SIM_PREFIX": os.environ.get("SIM_PREFIX", "dlmchaos"),
           "SIM_STATE_DIR": os.environ.get("SIM_STATE_DIR", str(tmp_path / "state"))}
    done = run(["bash", REPO / "launch" / "chaos", "--nodes", "4", "--duration", "100",
                "--faults", "4", "--seed", "2",
                "--kinds", "partition,heal,kill-rank,prestop,kill-launcher",
                "--work-dir", tmp_path / "work"],
               env=dict(env, VENV=os.path.dirname(os.path.dirname(sys.executable))),
               timeout=1450)
    if done.returncode == NO_NETNS:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    print(done.stdout[-6000:])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"^check ok   no process left", done.stdout, re.M)
    assert re.search(r"^all +4 +4 ", done.stdout, re.M), done.stdout[-3000:]
