"""Which hosts an elastic job may use: the discovery script's list, less the hosts that
failed recently, in the order that keeps the job where it was.

A discovery script is any executable that prints one usable host per line, `host` or
`host:slots` (horovodrun's --host-discovery-script convention; the Kubeflow MPI Operator
writes one at /etc/mpi/discover_hosts.sh that lists the worker pods that run). It is run
with a time limit; what it prints is read strictly, since a misread line would place
ranks on a host that does not exist.

A host that failed (lost, unreachable, or whose pod was stopped) sits out a cooldown
that doubles with each failure of that host, from MIN up to MAX seconds (Horovod's
--blacklist-cooldown-range; Horovod without that flag never takes such a host back).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .procs import kill_session

Hosts = List[Tuple[str, int]]   # (host, slots), in rank order

HOST_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?::([1-9][0-9]*))?")


class DiscoveryFailed(Exception):
    """The discovery script could not be run or printed something that is not a host."""


def discover(script: str, slots_per_host: int, timeout_s: float = 30.0) -> Hosts:
    """The hosts the script lists now, each once (slots summed), in its order."""
    try:
        proc = subprocess.Popen([script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    except OSError as err:
        raise DiscoveryFailed(f"cannot run {script}: {err.strerror}") from None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.communicate()
        raise DiscoveryFailed(f"{script} did not finish within {timeout_s:g}s") from None
    if proc.returncode != 0:
        last = next((x for x in reversed(err.splitlines()) if x.strip()), "")
        raise DiscoveryFailed(f"{script} exited {proc.returncode}"
                              + (f": {last.strip()}" if last else ""))
    return parse_hosts(out, slots_per_host, script)


def parse_hosts(text: str, slots_per_host: int, source: str = "the discovery script") -> Hosts:
    hosts: Dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = HOST_LINE.fullmatch(line)
        if m is None:
            raise DiscoveryFailed(f"{source} printed {line[:80]!r}, not `host` or "
                                  f"`host:slots`")
        hosts[m.group(1)] = hosts.get(m.group(1), 0) + int(m.group(2) or slots_per_host)
    return list(hosts.items())


def slots(hosts: Hosts) -> int:
    return sum(n for _, n in hosts)


def render(hosts: Hosts) -> str:
    """As -H takes them: `node1:1,node2:1`."""
    return ",".join(f"{h}:{n}" for h, n in hosts)


def choose(available: Hosts, max_np: int, keep: Sequence[str] = ()) -> Hosts:
    """At most max_np slots of the available hosts: the hosts in `keep` (the world that
    ran last) first, in their order, so that ranks, rank 0 above all, stay where they
    were; then the others in the script's order. The last host may get fewer slots than
    it offers."""
    order = sorted(range(len(available)),
                   key=lambda i: (keep.index(available[i][0]) if available[i][0] in keep
                                  else len(keep) + i))
    chosen: Hosts = []
    left = max_np
    for i in order:
        host, n = available[i]
        if left <= 0:
            break
        chosen.append((host, min(n, left)))
        left -= chosen[-1][1]
    return chosen


class Cooldowns:
    """The hosts that sit out after a failure, until when."""

    def __init__(self, low_s: float, high_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.low, self.high, self.clock = low_s, high_s, clock
        self.failures: Dict[str, int] = {}
        self.until: Dict[str, float] = {}

    def fail(self, host: str) -> float:
        """Sets host aside; returns for how many seconds."""
        n = self.failures[host] = self.failures.get(host, 0) + 1
        seconds = min(self.high, self.low * 2 ** (n - 1))
        self.until[host] = self.clock() + seconds
        return seconds

    def cooling(self, host: str) -> bool:
        return self.until.get(host, 0.0) > self.clock()

    def usable(self, hosts: Hosts) -> Hosts:
        return [(h, n) for h, n in hosts if not self.cooling(h)]

    def next_return(self) -> Optional[float]:
        """Seconds until the next host comes back from its cooldown; None when none sits
        out."""
        waits = [t - self.clock() for t in self.until.values() if t > self.clock()]
        return min(waits) if waits else None


def executable(path: str) -> Optional[str]:
    """Why the discovery script cannot be run (one line), or None."""
    if not os.path.isfile(path):
        return f"--host-discovery-script {path}: no such file"
    if not os.access(path, os.X_OK):
        return f"--host-discovery-script {path}: not executable (chmod +x)"
    return None
