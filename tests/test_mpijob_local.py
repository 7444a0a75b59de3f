"""Runs the MPIJob's launcher command for real: across simulated nodes, and on this machine.

The command is taken from the rendered base MPIJob (k8s/base) and only what must differ
here is rewritten: the hostfile (the operator's environment variables), `-np`,
`--allow-run-as-root` when run as root, the data as the offline WikiText-2 files, a tiny
CPU model for a few steps, and the run dir. Everything else, the wrapper and the mpirun
flags included, runs as the cluster would run it.

Across nodes (launch/sim-cluster, 4 nodes): node1 plays the launcher pod and node2..node4
the workers, so that no rank runs beside mpirun (as in the MPIJob, where the launcher
pod holds no rank) and every rank is started over ssh. The run must take the same steps
as one process with the global batch. On this machine (`localhost slots=2`): the shape of
the single-node overlay, several slots on one worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, SIM, TINY, VALID, WIKITEXT2, max_param_diff, run, sim_cluster

VENV_BIN = REPO / ".venv" / "bin"
TIMEOUT = 240
# Where float noise is not amplified (as tests/test_distributed.py): dropout 0, lr 1, the
# global-norm clip active at every step; 12 columns split over the ranks.
RECIPE = ["--dropout", "0", "--lr", "1", "--clip", "0.1", "--log-interval", "5",
          "--epochs", "1", "--global-batch-size", "12"]


def tool(name: str) -> str:
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed (see launch/setup-env.sh and launch/constraints.txt)")


def launcher_argv() -> list[str]:
    done = subprocess.run([tool("kubectl"), "kustomize", REPO / "k8s" / "base"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (job,) = [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "MPIJob"]
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return launcher["command"] + launcher["args"]


def drop_option(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE`."""
    assert flag in argv, f"{flag} missing from {argv}"
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def local_command(argv: list[str], run_dir: Path, np: int = 2,
                  train_args: list = ()) -> list[str]:
    """The launcher's argv with only what must differ here rewritten: -np, root, one
    OpenMP thread per rank, and the training options (tiny model, offline data, run dir;
    train_args, else 6 steps)."""
    split = argv.index("train") - 1  # the ranks' command: dist-lm train ...
    wrapper = argv[:argv.index("mpirun")]
    mpirun, train = argv[len(wrapper):split], argv[split:]
    assert wrapper == ["dist-lm", "launch"], wrapper
    assert mpirun[0] == "mpirun" and train[:2] == ["dist-lm", "train"]

    i = mpirun.index("-np")
    mpirun[i + 1] = str(np)
    # The simulated nodes share this machine's cores. Given as the MPIJob gives any
    # numerics or threading setting: no rank runs beside mpirun to pass its own on.
    mpirun[1:1] = ["-x", "OMP_NUM_THREADS=1"]
    if os.geteuid() == 0:  # CI runs as root; the image does not
        mpirun.insert(1, "--allow-run-as-root")

    for flag in ("--data-dir", "--cache-dir", "--run-dir", "--model", "--context"):
        train = drop_option(train, flag)
    assert train[train.index("--resume") + 1] == "auto"  # kept: a fresh run dir starts anew
    train += ["--train-file", WIKITEXT2 / "wiki.valid.tokens",
              "--valid-file", WIKITEXT2 / "wiki.test.tokens",
              "--test-file", WIKITEXT2 / "wiki.test.tokens",
              *TINY[:-2], "--context", "cpu", "--run-dir", run_dir]
    train += list(train_args) or ["--max-steps", "6", "--log-interval", "3"]
    return [str(a) for a in [BIN / "dist-lm", *wrapper[1:], *mpirun, *train]]


def operator_env(hostfile: Path, slots: int) -> dict:
    """What the MPI Operator sets in the launcher (its hostfile lists the workers)."""
    return {
        "OMPI_MCA_orte_default_hostfile": str(hostfile),
        "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
        "OMPI_MCA_orte_set_default_slots": str(slots),
        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
        # The image's ENV, which the launcher forwards (-x LD_LIBRARY_PATH).
        "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", "/usr/local/lib"),
    }


@pytest.mark.dist
def test_launcher_command_trains_two_slots_on_one_worker(tmp_path):
    assert (WIKITEXT2 / "wiki.valid.tokens").is_file(), f"missing WikiText-2 in {WIKITEXT2}"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    command = local_command(launcher_argv(), run_dir)
    proc = run(command, timeout=TIMEOUT, env=operator_env(hostfile, 2), cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)}\n{output}"
    assert (run_dir / "config.json").is_file() and (run_dir / "final.params").is_file(), output
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with sim_cluster("dlmjob", tmp_path_factory, 4) as sim:
        yield sim


@pytest.mark.dist
def test_launcher_command_across_nodes_equals_one_process(cluster, heldout, tmp_path):
    """3 workers x 1 slot, started over ssh from a launcher node that holds no rank: the
    same steps as one process with the 12 columns (< 1e-5). (A numerics setting made
    only in the launcher's environment reaches no rank here: every rank takes rank 0's,
    test_multinode.py; the ~3e-8 it changes is below this bound.)"""
    steps = ["--max-steps", "20", "--train-file", VALID, "--valid-file", heldout,
             "--test-file", heldout, *RECIPE]
    env = {"MXNET_USE_MKLDNN_RNN": "0"}  # another LSTM kernel: numerics differ (~3e-8)
    one = tmp_path / "one"
    single = run([BIN / "dist-lm", "train", *TINY, *steps, "--run-dir", one],
                 env=env, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in (2, 3, 4)))
    run_dir = tmp_path / "run"
    command = local_command(launcher_argv(), run_dir, np=3,
                            train_args=[*steps, "--check-sync-interval", "5"])
    proc = run([SIM, "exec", "node1", *command], timeout=TIMEOUT,
               env={**cluster.env, **operator_env(hostfile, 1), **env})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)}\n{output}"
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == 3
    diff = max_param_diff(one / "final.params", run_dir / "final.params")
    print(f"\nMPIJob command, 3 workers x 4 columns vs 1 process x 12: max |diff| {diff:.2e}")
    assert diff < 1e-5
