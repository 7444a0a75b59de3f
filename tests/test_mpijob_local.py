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

The elastic overlay's launcher command is rewritten the same way by local_elastic_command,
with a local discovery script (operator_discovery writes one in the operator's format) in
place of /etc/mpi/discover_hosts.sh, for runs across simulated nodes.
"""

from __future__ import annotations

import json
import os
import re
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


def k8s_expand(text: str, env: dict) -> str:
    """`text` as Kubernetes expands a container's command and args: $(NAME) becomes the
    value of the container's variable NAME (left as it is when there is none), and $$
    becomes $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


def container_argv(container: dict) -> list[str]:
    """A container's command and args as Kubernetes runs them, $(NAME) expanded from its
    env (values given in the manifest)."""
    env = {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}
    return [k8s_expand(a, env) for a in container.get("command", []) + container.get("args", [])]


def launcher_argv(overlay: str = "base") -> list[str]:
    """The launcher's command and args as rendered from k8s/<overlay>, as the pod runs
    them ($(NAME) expanded)."""
    done = subprocess.run([tool("kubectl"), "kustomize", REPO / "k8s" / overlay],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (job,) = [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "MPIJob"]
    (launcher,) = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    return container_argv(launcher)


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
    return [str(a) for a in [BIN / "dist-lm", *wrapper[1:], *local_mpirun(mpirun),
                             *local_train(train, run_dir, train_args)]]


def local_mpirun(mpirun: list[str]) -> list[str]:
    """mpirun and its flags, plus root and one OpenMP thread per rank."""
    # The simulated nodes share this machine's cores. Given as the MPIJob gives any
    # numerics or threading setting: no rank runs beside mpirun to pass its own on.
    mpirun = [mpirun[0], "-x", "OMP_NUM_THREADS=1", *mpirun[1:]]
    if os.geteuid() == 0:  # CI runs as root; the image does not
        mpirun.insert(1, "--allow-run-as-root")
    return mpirun


def local_train(train: list[str], run_dir: Path, train_args: list = ()) -> list[str]:
    """The ranks' command with the tiny model, the offline data and run_dir, then
    train_args (else 6 steps). A --global-batch-size in train_args replaces the job's."""
    for flag in ("--data-dir", "--cache-dir", "--run-dir", "--model", "--context"):
        train = drop_option(train, flag)
    if "--global-batch-size" in train_args and "--global-batch-size" in train:
        train = drop_option(train, "--global-batch-size")
    assert train[train.index("--resume") + 1] == "auto"  # kept: a fresh run dir starts anew
    train += ["--train-file", WIKITEXT2 / "wiki.valid.tokens",
              "--valid-file", WIKITEXT2 / "wiki.test.tokens",
              "--test-file", WIKITEXT2 / "wiki.test.tokens",
              *TINY[:-2], "--context", "cpu", "--run-dir", run_dir]
    return train + (list(train_args) or ["--max-steps", "6", "--log-interval", "3"])


def elastic_launcher_argv() -> list[str]:
    """The launcher's argv of the elastic overlay: `dist-lm launch --min-np ...
    --host-discovery-script /etc/mpi/discover_hosts.sh ... mpirun ... dist-lm train ...`."""
    return launcher_argv("overlays/elastic")


def local_elastic_command(argv: list[str], run_dir: Path, discovery: Path,
                          launch: dict | None = None, train_args: list = ()) -> list[str]:
    """The elastic launcher's argv (elastic_launcher_argv()) with only what must differ
    here rewritten: the discovery script (`discovery`, which prints `host` or
    `host:slots` lines; operator_discovery writes one as the operator does), the
    wrapper's options in `launch` (e.g. {"--min-np": 2, "--blacklist-cooldown-range":
    (1, 5)}: each replaces the option's values, or is added), and as local_command: root,
    one OpenMP thread per rank, and the training options (tiny model, offline data,
    run_dir; train_args, else 6 steps)."""
    split = argv.index("train") - 1  # the ranks' command: dist-lm train ...
    wrapper = argv[:argv.index("mpirun")]
    mpirun, train = argv[len(wrapper):split], argv[split:]
    assert wrapper[:2] == ["dist-lm", "launch"], wrapper
    assert mpirun[0] == "mpirun" and train[:2] == ["dist-lm", "train"]
    assert "-np" not in mpirun  # the wrapper sizes each world itself

    options = {"--host-discovery-script": discovery, **(launch or {})}
    for flag, values in options.items():
        values = [values] if isinstance(values, (str, int, float, Path)) else list(values)
        wrapper = set_option(wrapper, flag, values)
    return [str(a) for a in [BIN / "dist-lm", *wrapper[1:], *local_mpirun(mpirun),
                             *local_train(train, run_dir, train_args)]]


def set_option(argv: list[str], flag: str, values: list) -> list[str]:
    """argv with `flag VALUES...` replacing the flag's values there, or appended."""
    if flag not in argv:
        return argv + [flag, *values]
    i = argv.index(flag)
    return argv[:i + 1] + list(values) + argv[i + 1 + len(values):]


def operator_discovery(path: Path, hosts: list[str]) -> Path:
    """A discovery script in the MPI Operator's format (updateDiscoverHostsInConfigMap,
    pkg/controller/mpi_job_controller.go): `#!/bin/sh`, then `echo HOST` per Running
    worker, sorted, without slots."""
    path.write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in sorted(hosts)))
    path.chmod(0o555)
    return path


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


def test_local_elastic_command_rewrites_only_what_differs_here(tmp_path):
    argv = elastic_launcher_argv()
    discovery = operator_discovery(tmp_path / "discover_hosts.sh", ["node3", "node2"])
    listed = subprocess.run([discovery], capture_output=True, text=True, timeout=10)
    assert listed.stdout == "node2\nnode3\n"
    run_dir = tmp_path / "run"
    command = local_elastic_command(
        argv, run_dir, discovery, launch={"--min-np": 1, "--blacklist-cooldown-range": (1, 5),
                                          "--grow-interval": 2},
        train_args=["--max-steps", "4", "--global-batch-size", "12"])

    at_mpirun, at_train = command.index("mpirun"), command.index("train") - 1
    wrapper, mpirun, train = command[:at_mpirun], command[at_mpirun:at_train], command[at_train:]
    rendered = argv[:argv.index("mpirun")]
    assert wrapper[0] == str(BIN / "dist-lm") and wrapper[1:2] == ["launch"]
    # Every rendered option kept, in its place; only the rewritten values differ.
    assert [a for a in wrapper[1:] if a.startswith("--")] == \
        [a for a in rendered[1:] if a.startswith("--")]
    assert " ".join(wrapper[1:]) == " ".join(rendered[1:]).replace(
        "/etc/mpi/discover_hosts.sh", str(discovery)).replace(
        "--min-np 2", "--min-np 1").replace(
        "--blacklist-cooldown-range 30 600", "--blacklist-cooldown-range 1 5").replace(
        "--grow-interval 300", "--grow-interval 2")

    flags = argv[argv.index("mpirun"):argv.index("train") - 1]
    assert [a for a in mpirun if a != "--allow-run-as-root"] == \
        [flags[0], "-x", "OMP_NUM_THREADS=1", *flags[1:]]
    assert train[:2] == ["dist-lm", "train"]  # found on the exported PATH, as in the pod
    assert train[train.index("--run-dir") + 1] == str(run_dir)
    assert train[train.index("--resume") + 1] == "auto"
    assert train.count("--global-batch-size") == 1 and train[-2:] == ["--global-batch-size", "12"]
    assert "--data-dir" not in train and "--train-file" in train


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
