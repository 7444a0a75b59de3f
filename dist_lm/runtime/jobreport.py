"""What ended a launched job, in one line, for `dist-lm launch` (launch.py).

The supervisor decides from what the job said about itself first (selfreport: every
rank's start record, with its host and pid, and its exit record, with its code and
reason), then from what it finds out itself, and only last from the launcher's words:

1. a rank's exit record that is a cause (not a lost peer, exit code 4, nor a signal)
   says why: `[rank 1 on node2] --train-file x: no such file`; a stop that was asked
   for ends as the ranks' stop record;
2. a rank with no exit record was killed, or its node was lost: its host is probed over
   ssh (bounded) and, where it answers, whether the rank's pid still runs: `node node3
   (rank 2) stopped answering: ...`, `cannot reach node3 (rank 2) over ssh: ...`,
   `rank 2 on node3 was killed (no exit record)`. The probe runs as soon as the job is
   seen failing, while the launcher is still ending the other ranks, so that the rank
   that was gone first is told apart from those the launcher ended after it;
3. the weaker records: a rank ended by a signal, a rank that lost its peer, a stop that
   nobody here asked for;
4. last, the launcher's words (LAUNCHER_WORDS below), each kept with the line it reads:
   the signal that killed a rank (only mpirun knows it), which rank horovodrun saw fail
   first, the program mpirun could not find on a node, and the lines that say the job
   is failing before the launcher ends.
For an elastic job (elastic.py) it also says which hosts were lost, which were leaving
(a stop signal reached their ranks), whether another start could help, and how far the
job got.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import (NonFiniteError, RanksOutOfSync, RunDirBusy, RunDirLost,
                      StorageUnavailable, UsageError)
from . import selfreport
from .discovery import same_host
from .procs import finish

# --- the launcher's words: the last resort -------------------------------------------------
# Each pattern reads one line that a launcher prints; tests/test_launch_patterns.py feeds
# each the example line quoted here.

# mpirun, when a rank dies of a signal (Open MPI 4.1, help-orterun.txt
# [orterun:proc-aborted-strsignal]; Open MPI 5's prterun prints the same words):
#   mpirun noticed that process rank 2 with PID 7008 on node node3 exited on signal 9 (Killed).
# The only word on which signal ended a rank that wrote no exit record.
SIGNAL_DEATH = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on "
                          r"signal (\d+)")
# horovodrun, when a worker's command exits non-zero (Horovod 0.28.1,
# horovod/runner/gloo_run.py):
#   Process 2 exit with status code 255.
# The code is ssh's for a worker on another host (255 when it lost the rank), 128 + N
# for a local worker killed by signal N. Says which rank failed first.
HVD_EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)")
# mpirun could not start a daemon on a node (Open MPI 4.1, help-errmgr-base.txt
# [failed-daemon-launch]):
#   ORTE was unable to reliably start one or more daemons.
DAEMON_NOT_STARTED = re.compile(r"ORTE was unable to reliably start one or more daemons")
# mpirun lost a node's daemon (Open MPI 4.1, help-errmgr-base.txt [node-died]; other
# releases of ORTE say "... with its daemon located on node:"); mpirun may then wait
# many minutes before it ends:
#   ORTE has lost communication with a remote daemon.
DAEMON_LOST = re.compile(r"ORTE has lost communication with (a remote daemon|its daemon)")
# mpirun cannot reach a node's daemon any more (Open MPI 4.1, help-errmgr-base.txt
# [no-path]):
#   ORTE does not know how to route a message to the specified daemon
DAEMON_NO_ROUTE = re.compile(r"ORTE does not know how to route a message")
# a rank's MPI library saw its peer go (Open MPI 4.1, help-mpi-btl-tcp.txt [peer hung
# up]), printed while the launcher has not yet ended the other ranks:
#   An MPI communication peer process has unexpectedly disconnected.  This
PEER_HUNG_UP = re.compile(r"An MPI communication peer process has unexpectedly disconnected")
# mpirun could not find the ranks' program on a node (Open MPI 4.1, help-orterun.txt
# [orterun:executable-not-found]), then names the node and the program on lines of their
# own, `Node:       node3` and `Executable: dist-lm`, and exits 134:
#   mpirun was unable to find the specified executable file, and therefore
NOT_FOUND = re.compile(r"mpirun was unable to find the specified executable file")
NOT_FOUND_DETAIL = re.compile(r"^\s*(Node|Executable):\s+(\S+)\s*$")
# The tag horovodrun (0.28.1, `[R]<stderr>:`) and mpirun --tag-output (Open MPI 4.1,
# `[1,R]<stderr>:`) put in front of a rank's line; alone, it is what is left of a line
# that held a record:
#   [2]<stderr>:
LAUNCHER_TAG = re.compile(r"\s*\[\d+(?:,\d+)?\]<std(?:out|err)>:\s*")

LAUNCHER_WORDS = (SIGNAL_DEATH, HVD_EXIT, DAEMON_NOT_STARTED, DAEMON_LOST, DAEMON_NO_ROUTE,
                  PEER_HUNG_UP, NOT_FOUND, LAUNCHER_TAG)
DAEMON_TROUBLE = (DAEMON_NOT_STARTED, DAEMON_LOST, DAEMON_NO_ROUTE)


# --- the ranks' hosts: the probe -----------------------------------------------------------

# Prints those of the pids that run (not zombies) on the host it runs on. /proc/PID/stat:
# "pid (comm) state ...", and comm may hold spaces and ')'.
ALIVE_SCRIPT = ('for p in {pids}; do s=$(cat /proc/$p/stat 2>/dev/null) && '
                'case "${{s##*) }}" in Z*|X*) ;; *) echo $p ;; esac; done; true')


def here(host: str) -> bool:
    return host in ("localhost", "127.0.0.1") or same_host(host, socket.gethostname())


def running(pid: int) -> bool:
    """Whether pid runs on this host (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def probe_hosts(targets: Dict[str, Sequence[int]], ssh: Sequence[str],
                timeout_s: float = 5.0) -> Dict[str, Tuple[Optional[str], List[int]]]:
    """For each host, (None if it answers ssh within timeout_s, else ssh's last line; the
    given pids that still run there). All hosts at once; this host without ssh."""
    connect = max(1, int(timeout_s) - 2)
    out: Dict[str, Tuple[Optional[str], List[int]]] = {}
    procs = {}
    for host, pids in targets.items():
        if here(host):
            out[host] = (None, [p for p in pids if running(p)])
            continue
        script = ALIVE_SCRIPT.format(pids=" ".join(str(int(p)) for p in pids) or "0")
        procs[host] = subprocess.Popen(
            [*ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}",
             "-o", "ConnectionAttempts=1", host, script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    for host, proc in procs.items():
        done = finish(proc, max(0.1, deadline - time.monotonic()))
        stdout, err = done.stdout, done.stderr
        if done.timed_out:
            out[host] = (f"no answer within {timeout_s:g}s", [])
            continue
        if proc.returncode != 0:
            lines = [x for x in err.strip().splitlines() if x.strip()]
            reason = lines[-1] if lines else f"ssh exited {proc.returncode}"
            out[host] = (reason.replace(f"ssh: connect to host {host} port ", "port "), [])
        else:
            out[host] = (None, [int(p) for p in stdout.split() if p.isdigit()])
    return out


# --- what the job said ---------------------------------------------------------------------

class Rank:
    """One rank as the supervisor knows it: where the launcher's command line places it,
    and what it said itself."""

    def __init__(self, rank: int, placed: Optional[str] = None):
        self.rank, self.placed = rank, placed
        self.host: Optional[str] = None     # from its start record
        self.pid: Optional[int] = None
        self.exit: Optional[dict] = None    # its exit record
        self.order = 0                      # when the exit record came, among the ranks'
        self.seen: Optional[str] = None     # the probe's finding: unreachable, gone, running

    @property
    def name(self) -> str:
        """Its host as the launcher names it (the name ssh reaches), else as it says."""
        if self.placed and (self.host is None or same_host(self.placed, self.host)):
            return self.placed
        return self.host or ""

    def where(self) -> str:
        return f"rank {self.rank} on {self.name}" if self.name else f"rank {self.rank}"

    def said(self) -> str:
        return f"[{self.where()}] {self.exit['reason']}"


Verdict = Tuple[str, str]   # ('error' or 'stopped', the sentence)
Probe = Callable[[Dict[str, Sequence[int]]], Dict[str, Tuple[Optional[str], List[int]]]]


class JobReport:
    """Reads the lines of a launched job (feed) and says what ended it (cause)."""

    def __init__(self, hosts: Optional[List[str]]):
        """hosts: where the launcher's command line places each rank, if it says."""
        self.ranks: Dict[int, Rank] = {r: Rank(r, h) for r, h in enumerate(hosts or [])}
        self.lock = threading.Lock()
        self.failing_since: Optional[float] = None
        self.signal_deaths: List[Tuple[int, str, int]] = []    # (rank, node, signal)
        self.launcher_exits: List[Tuple[int, int]] = []         # (rank, code), horovodrun
        self.daemon_trouble = False
        self.unreachable: Dict[str, str] = {}                   # host -> ssh's reason
        self.probed = threading.Event()
        self.reached: Dict[str, int] = {}   # step, checkpoint: from progress records
        self.not_found: Optional[Dict[str, str]] = None   # mpirun's Node, Executable

    # --- reading ---

    def feed(self, line: str) -> Optional[str]:
        """Takes in one line; returns what of it is for the user (None: nothing, it was
        a record)."""
        records, rest = selfreport.parse(line.rstrip("\n"))
        with self.lock:
            for record in records:
                self._record(record)
            self._launcher_words(rest)
        if not records:
            return line
        if LAUNCHER_TAG.fullmatch(rest) or not rest.strip():
            return None
        return rest + "\n"

    def _rank(self, rank: int) -> Rank:
        return self.ranks.setdefault(rank, Rank(rank))

    def _record(self, record: dict) -> None:
        rank = self._rank(record["rank"])
        rank.host, rank.pid = record.get("host") or rank.host, record.get("pid") or rank.pid
        size = record.get("size")
        for r in range(size if isinstance(size, int) else 0):
            self._rank(r)
        if record.get("event") == "progress":
            for key in ("step", "checkpoint"):
                if isinstance(record.get(key), int):
                    self.reached[key] = max(self.reached.get(key, 0), record[key])
        if record.get("event") == "exit" and rank.exit is None:
            rank.exit, rank.order = record, sum(r.exit is not None for r in self.ranks.values())
            if record.get("kind") == "error" and record.get("code"):
                self._failing()

    def _launcher_words(self, line: str) -> None:
        m = SIGNAL_DEATH.search(line)
        if m:
            self.signal_deaths.append((int(m.group(1)), m.group(2), int(m.group(3))))
            self._failing()
        m = HVD_EXIT.search(line)
        if m and int(m.group(2)) != 0:
            self.launcher_exits.append((int(m.group(1)), int(m.group(2))))
            self._failing()
        if any(p.search(line) for p in DAEMON_TROUBLE):
            self.daemon_trouble = True
            self._failing()
        if PEER_HUNG_UP.search(line):
            self._failing()
        if NOT_FOUND.search(line):
            self.not_found = {}
            self._failing()
        m = NOT_FOUND_DETAIL.match(line)
        if m and self.not_found is not None:
            self.not_found.setdefault(m.group(1), m.group(2))

    def _failing(self) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def failed_code(self) -> int:
        """The exit code of the rank that failed first, a cause before a lost peer (for a
        launcher that had to be killed); 1 when no rank said."""
        with self.lock:
            ended = sorted((r for r in self.ranks.values() if r.exit is not None
                            and r.exit.get("code")), key=lambda r: r.order)
            codes = [r.exit["code"] for r in ended] + [c for _, c in self.launcher_exits]
        codes.sort(key=lambda c: c == SYMPTOM_CODE)
        return codes[0] if codes else 1

    # --- probing ---

    def started(self) -> bool:
        """Whether any rank has said it started (a start or any other record)."""
        with self.lock:
            return any(r.pid is not None or r.exit is not None for r in self.ranks.values())

    def silent(self) -> List[Rank]:
        """The ranks known to be in the job that have not said how they ended."""
        with self.lock:
            return [r for _, r in sorted(self.ranks.items()) if r.exit is None and r.name]

    def probe(self, probe: Probe) -> None:
        """Finds out, for each rank that has not said how it ended, whether its host
        answers and whether it still runs there (Rank.seen); once, the first call."""
        if self.probed.is_set():
            return
        silent = self.silent()
        targets: Dict[str, List[int]] = {}
        for r in silent:
            targets.setdefault(r.name, []).extend([r.pid] if r.pid else [])
        found = probe(targets) if targets else {}
        with self.lock:
            for r in silent:
                reason, alive = found.get(r.name, (None, []))
                if reason is not None:
                    self.unreachable[r.name] = reason
                    r.seen = "unreachable"
                elif r.pid:
                    r.seen = "running" if r.pid in alive else "gone"
        self.probed.set()

    # --- deciding ---

    def cause(self, code: int, stop_asked: bool, probe: Optional[Probe] = None) -> Verdict:
        """What ended a launcher that exited with `code` (stop_asked: a stop signal was
        passed on to it), in the order of the module docstring."""
        verdict = self._said_by_ranks(stop_asked)
        if verdict:
            return verdict
        if probe is not None:
            self.probe(probe)  # no-op when the job was probed as it began to fail
        return self._found_by_probe() or self._said_weakly() or self._launcher_said(code)

    def _said_by_ranks(self, stop_asked: bool) -> Optional[Verdict]:
        with self.lock:
            ended = [r for r in self.ranks.values() if r.exit is not None]
        ended.sort(key=lambda r: r.order)
        causes = [r for r in ended if r.exit.get("kind") == "error"
                  and r.exit.get("code") not in (0, SYMPTOM_CODE)
                  and not by_signal(r.exit.get("code", 0))]
        # The rank a stop signal reached first (its pod is going away) before those that
        # stopped because the ranks agreed to.
        stops = sorted((r for r in ended if r.exit.get("kind") == "stopped"),
                       key=lambda r: not r.exit.get("signalled"))
        if stop_asked and stops and not causes:
            # Asked to stop, and ranks did so with a checkpoint: what else happened
            # while the job came down is not the story.
            return "stopped", stops[0].said()
        if causes:
            return "error", causes[0].said()
        return None

    def _found_by_probe(self) -> Optional[Verdict]:
        silent = self.silent()
        lost = [r for r in silent if r.seen == "unreachable"]
        if lost:
            host = lost[0].name
            reason = self.unreachable[host]
            if all(r.pid is None for r in lost if r.name == host):
                return "error", f"cannot reach {host}{self.ranks_on(host)} over ssh: {reason}"
            return "error", f"node {host}{self.ranks_on(host)} stopped answering: it does " \
                            f"not answer ssh now ({reason})"
        gone = [r for r in silent if r.seen == "gone"]
        if gone:
            return "error", self._killed(gone)
        hung = [r for r in silent if r.seen == "running"]
        if hung:
            r = hung[0]
            return "error", f"{r.where()} hung or lost its launcher: no exit record, and " \
                            f"its process (pid {r.pid}) still ran when the job failed"
        return None

    def _killed(self, gone: List[Rank]) -> str:
        """The sentence for ranks that ended without an exit record while their host
        answered: the one the launcher names first, with the signal it names."""
        first = self._first_killed(gone)
        sig = next((s for r, _, s in self.signal_deaths if r == first.rank), None)
        code = next((c for r, c in self.launcher_exits if r == first.rank), 0)
        if sig is None and by_signal(code):  # a local worker of horovodrun
            sig = code - 128
        others = [str(r.rank) for r in gone if r is not first]
        note = "no exit record"
        if others:
            note += f"; rank{'s' if len(others) > 1 else ''} {', '.join(others)} left none either"
        if sig is None:
            return f"{first.where()} was killed ({note})"
        return f"{first.where()} was killed by signal {sig} ({signal_name(sig)}; {note})"

    def _first_killed(self, gone: List[Rank]) -> Rank:
        named = [r for r, _, _ in self.signal_deaths] + [r for r, _ in self.launcher_exits]
        return next((r for n in named for r in gone if r.rank == n), gone[0])

    def _said_weakly(self) -> Optional[Verdict]:
        with self.lock:
            ended = [r for _, r in sorted(self.ranks.items()) if r.exit is not None]
        errors = [r for r in ended if r.exit.get("kind") == "error"]
        # The rank a stop signal reached first (its pod is going away) before those that
        # stopped because the ranks agreed to.
        stops = sorted((r for r in ended if r.exit.get("kind") == "stopped"),
                       key=lambda r: not r.exit.get("signalled"))
        if stops and not errors and not (self.daemon_trouble and self.silent()):
            # What mpirun says of its daemons as the stopped ranks' nodes go matters
            # only where a rank did not say how it ended.
            return "stopped", stops[0].said()
        # Ended by a signal (from outside, or from the launcher ending it) before those
        # that lost their peer.
        errors.sort(key=lambda r: not by_signal(r.exit.get("code", 0)))
        return ("error", errors[0].said()) if errors else None

    def _launcher_said(self, code: int) -> Verdict:
        if self.not_found is not None:
            what = self.not_found.get("Executable", "the ranks' program")
            where = self.not_found.get("Node")
            return "error", f"mpirun could not find {what}" + \
                (f" on {where}" if where else "") + \
                " (not installed there, or not on the PATH the ranks get: mpirun -x PATH)"
        if self.signal_deaths:
            rank, node, sig = self.signal_deaths[0]
            return "error", f"rank {rank} on {node} was killed by signal {sig} " \
                            f"({signal_name(sig)})"
        if self.launcher_exits:
            rank, rc = self.launcher_exits[0]
            return "error", f"{self._rank(rank).where()} exited with code {rc}" \
                            f"{exit_meaning(rc)}"
        if self.daemon_trouble:
            return "error", "mpirun could not start or lost one of its daemons on the " \
                            "other nodes"
        if code < 0:
            return "error", f"the launcher was killed by signal {-code} ({signal_name(-code)})"
        return "error", f"the launcher exited with code {code}"

    # --- for an elastic restart (elastic.py) ---

    def lost_hosts(self) -> List[str]:
        """The hosts the job lost: every host of a silent rank that no longer answers,
        else the host of the rank that was killed first (the launcher's order, as the
        verdict names it), else a node where mpirun could not find the ranks' program.
        Ranks the launcher ended after a failure are silent and gone too, but their hosts
        are not to blame."""
        silent = self.silent()
        unreachable = [r.name for r in silent if r.seen == "unreachable"]
        if unreachable:
            return list(dict.fromkeys(unreachable))
        gone = [r for r in silent if r.seen == "gone"]
        if gone:
            return [self._first_killed(gone).name]
        with self.lock:
            if self.not_found and "Node" in self.not_found:  # the program is missing there
                return [self.not_found["Node"]]
            return [node for _, node, _ in self.signal_deaths[:1]]

    def leaving_hosts(self) -> List[str]:
        """The hosts of ranks that a stop signal reached there (a worker pod's preStop
        hook: the pod is going away), not only the others' agreement; every such host,
        also one whose hook came after the ranks agreed to stop (lifecycle.StopFlag)."""
        with self.lock:
            return list(dict.fromkeys(
                r.name for _, r in sorted(self.ranks.items()) if r.exit is not None
                and r.exit.get("kind") == "stopped" and r.exit.get("signalled") and r.name))

    def hopeless(self) -> bool:
        """Whether a rank ended with an error that another start would meet again: bad
        input (exit 2), non-finite values (exit 3) or a run directory another job took
        over (exit 6), not a lost peer or node."""
        with self.lock:
            return any(r.exit is not None and r.exit.get("kind") == "error"
                       and r.exit.get("code") in (UsageError.exit_code,
                                                  NonFiniteError.exit_code,
                                                  RunDirLost.exit_code)
                       for r in self.ranks.values())

    def run_dir_busy(self) -> bool:
        """Whether a rank ended because the run directory was locked by someone else
        (exit 5): at a restart, most likely a rank of the last world that has not ended
        yet (elastic.py waits for it)."""
        with self.lock:
            return any(r.exit is not None and r.exit.get("code") == RunDirBusy.exit_code
                       for r in self.ranks.values())

    def progress(self) -> Tuple[Optional[int], Optional[int]]:
        """(the furthest step the job said it reached, the newest checkpoint step it said
        it wrote or resumed from), from rank 0's progress records and the exit records;
        None where nothing said (a launcher that kills its ranks leaves no exit records)."""
        with self.lock:
            exits = [r.exit for r in self.ranks.values() if r.exit is not None]
            reached = dict(self.reached)
        steps = [e["step"] for e in exits if isinstance(e.get("step"), int)]
        saved = [e["checkpoint"] for e in exits if isinstance(e.get("checkpoint"), int)]
        steps += [reached["step"]] if "step" in reached else []
        saved += [reached["checkpoint"]] if "checkpoint" in reached else []
        return (max(steps) if steps else None), (max(saved) if saved else None)

    def ranks_on(self, host: str) -> str:
        ranks = [str(r.rank) for _, r in sorted(self.ranks.items()) if r.name and
                 same_host(r.name, host)]
        if not ranks:
            return ""
        return f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)})"


# A rank that ends because another did (lost its peer, the watchdog, ranks out of step)
# exits 4 (docs/reliability.md): a symptom, not a cause.
SYMPTOM_CODE = RanksOutOfSync.exit_code


def by_signal(code: int) -> bool:
    """Whether an exit code is the shell's and Python's 128 + N for signal N."""
    return 128 < code < 128 + 65


def exit_meaning(code: int) -> str:
    if by_signal(code):
        return f" (killed by signal {code - 128} ({signal_name(code - 128)}))"
    return {2: " (bad input)", 3: " (non-finite values)",
            4: " (a peer rank was lost or ranks went out of step)",
            RunDirBusy.exit_code: " (the run directory is in use)",
            StorageUnavailable.exit_code: " (storage unavailable)",
            RunDirLost.exit_code: " (another job took over the run directory)"}.get(code, "")


def signal_name(number: int) -> str:
    """As the C library says it: 9 -> 'Killed', 15 -> 'Terminated'."""
    try:
        return signal.strsignal(number) or "unknown"
    except ValueError:
        return "unknown"
