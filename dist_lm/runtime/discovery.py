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

One host goes by several names: the script may print `w-2.job.ns.svc` where mpirun and
the rank itself say `w-2`. `same_host` is the one place that decides two names are one
host; the cooldowns and the job's report (jobreport.py) both ask it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .procs import run_bounded

Hosts = List[Tuple[str, int]]   # (host, slots), in rank order

HOST_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?::([1-9][0-9]*))?")


class DiscoveryFailed(Exception):
    """The discovery script could not be run or printed something that is not a host."""


TIMEOUT_S = 30.0   # the discovery script's time limit


def discover(script: str, slots_per_host: int, timeout_s: float = TIMEOUT_S) -> Hosts:
    """The hosts the script lists now, each once (slots summed), in its order. Bounded
    by timeout_s, however the script behaves: a process it leaves in the background that
    keeps its output open counts as not finishing (run_bounded)."""
    try:
        done = run_bounded([script], timeout_s)
    except OSError as err:
        raise DiscoveryFailed(f"cannot run {script}: {err.strerror}") from None
    if done.timed_out:
        raise DiscoveryFailed(f"{script} did not finish within {timeout_s:g}s"
                              + (" (it exited, but a process it started kept its output "
                                 "open)" if done.returncode is not None else "")
                              + "; ended it and the processes it started")
    out, err = done.stdout, done.stderr
    if done.returncode != 0:
        last = next((x for x in reversed(err.splitlines()) if x.strip()), "")
        raise DiscoveryFailed(f"{script} exited {done.returncode}"
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
    def place(i: int) -> int:
        kept = (k for k, name in enumerate(keep) if same_host(name, available[i][0]))
        return next(kept, len(keep) + i)

    order = sorted(range(len(available)), key=place)
    chosen: Hosts = []
    left = max_np
    for i in order:
        host, n = available[i]
        if left <= 0:
            break
        chosen.append((host, min(n, left)))
        left -= chosen[-1][1]
    return chosen


def same_host(a: str, b: str) -> bool:
    """The same host, by name, whatever its case and however much of its domain each
    name gives (w-2, W-2.job.ns.svc and w-2.job.ns.svc.cluster.local are one host;
    w-2.a and w-2.b are two), or by address, compared whole (10.0.0.1 and 10.0.0.2 are
    two; an address is never resolved, so it matches only itself)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if a == b:
        return True
    if not a or not b or _is_address(a) or _is_address(b):
        return False
    short, long_ = sorted((a.split("."), b.split(".")), key=len)
    return long_[:len(short)] == short


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Cooldowns:
    """The hosts that sit out after a failure, until when; a host is found under any of
    its names (same_host): mpirun may blame `w-2` while the script lists `w-2.job.ns.svc`."""

    def __init__(self, low_s: float, high_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.low, self.high, self.clock = low_s, high_s, clock
        self.failures: Dict[str, int] = {}
        self.until: Dict[str, float] = {}

    def _key(self, host: str) -> str:
        """The name host failed under before, if it did; else host."""
        return next((h for h in self.failures if same_host(h, host)), host)

    def fail(self, host: str) -> float:
        """Sets host aside; returns for how many seconds."""
        key = self._key(host)
        n = self.failures[key] = self.failures.get(key, 0) + 1
        seconds = min(self.high, self.low * 2 ** (n - 1))
        self.until[key] = self.clock() + seconds
        return seconds

    def cooling(self, host: str) -> bool:
        return self.until.get(self._key(host), 0.0) > self.clock()

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
