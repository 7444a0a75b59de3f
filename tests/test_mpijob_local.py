"""Runs the MPIJob's launcher command for real, on this machine, as 2 ranks.

The command is taken from the rendered base MPIJob (k8s/base) and only what must differ
here is rewritten: the hostfile (the operator's environment variables, pointing at
`localhost slots=2`), `-np 2`, `--allow-run-as-root` when run as root, the data as the
offline WikiText-2 files, a tiny CPU model for 6 steps, and the run dir. Everything else,
the mpirun flags included, runs as the cluster would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, WIKITEXT2, run

VENV_BIN = REPO / ".venv" / "bin"
TIMEOUT = 240


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


def local_command(argv: list[str], run_dir: Path) -> list[str]:
    split = argv.index("dist-lm")
    mpirun, train = argv[:split], argv[split:]
    assert mpirun[0] == "mpirun" and train[:2] == ["dist-lm", "train"]

    i = mpirun.index("-np")
    mpirun[i + 1] = "2"
    if os.geteuid() == 0:  # CI runs as root; the image does not
        mpirun.insert(1, "--allow-run-as-root")

    for flag in ("--data-dir", "--cache-dir", "--run-dir", "--model", "--context"):
        train = drop_option(train, flag)
    assert train[train.index("--resume") + 1] == "auto"  # kept: a fresh run dir starts anew
    train += ["--train-file", WIKITEXT2 / "wiki.valid.tokens",
              "--valid-file", WIKITEXT2 / "wiki.test.tokens",
              "--test-file", WIKITEXT2 / "wiki.test.tokens",
              "--model", "custom", "--embed-size", "32", "--hidden-size", "32",
              "--num-layers", "1", "--max-steps", "6", "--log-interval", "3",
              "--context", "cpu", "--run-dir", run_dir]
    return [str(a) for a in mpirun + train]


@pytest.mark.dist
def test_launcher_command_trains_two_ranks(tmp_path):
    assert (WIKITEXT2 / "wiki.valid.tokens").is_file(), f"missing WikiText-2 in {WIKITEXT2}"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    command = local_command(launcher_argv(), run_dir)
    command[0] = tool("mpirun")
    env = {
        # What the MPI Operator sets in the launcher (its hostfile lists the workers).
        "OMPI_MCA_orte_default_hostfile": str(hostfile),
        "OMPI_MCA_orte_keep_fqdn_hostnames": "true",
        "OMPI_MCA_orte_set_default_slots": "2",
        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
    }
    proc = run(command, timeout=TIMEOUT, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(command)}\n{output}"
    assert (run_dir / "config.json").is_file() and (run_dir / "final.params").is_file(), output
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == 2
