"""launch/sim-cluster driven from Python: the simulated nodes `bench-net` and `chaos`
build (network namespaces, an sshd per node; root only)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import UsageError

SIM = Path(__file__).resolve().parents[2] / "launch" / "sim-cluster"
NO_NETNS = 77  # sim-cluster's exit code where this machine cannot make network namespaces


def sim_cluster(what: str, env: dict, *args: str, check: bool = True, timeout: float = 300,
                no_netns: type = UsageError) -> subprocess.CompletedProcess:
    """`launch/sim-cluster ARGS` with env (its SIM_* settings). A machine without network
    namespaces raises no_netns, a failure (with check) UsageError: each one line, named
    by `what` (the command)."""
    done = subprocess.run([str(SIM), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode == NO_NETNS:
        raise no_netns(f"{what}: " + done.stderr.strip().splitlines()[-1])
    if check and done.returncode != 0:
        raise UsageError(f"{what}: sim-cluster {' '.join(args)} failed: "
                         f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done
