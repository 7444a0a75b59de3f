"""`dist-lm launch LAUNCHER ARGS...`: a launcher (mpirun, horovodrun) supervised so that
the job ends whole.

`supervise` runs a launcher the way the project's launch paths do (the MPIJob's
launcher, launch/train-workstation.sh):

- it passes every line through, and ends with one line that says what ended the job and
  names the lost rank and node: `dist-lm: error: job failed: rank 2 on node3 was killed
  by signal 9 (Killed)`; never a launcher's traceback or help text as the last word;
- once the launcher reports a failure it has `grace_s` seconds to end; mpirun waits for
  a daemon on a partitioned node for many minutes, so after that its session is killed
  (every process it started on this node; the ranks elsewhere end when their daemon or
  ssh session does, or by their own watchdog);
- a first SIGTERM/SIGINT/SIGHUP asks the ranks to stop with a checkpoint. Under mpirun it
  becomes SIGUSR1, which mpirun forwards to every rank at once (dist-lm treats it as
  SIGTERM), whereas its own SIGTERM handling sends the ranks SIGCONT, waits
  odls_base_sigkill_timeout, and only then SIGTERM; a second signal is mpirun's SIGTERM
  and a third kills its session. horovodrun gets the first as SIGTERM (SIGINT as
  SIGINT) and gives its workers 5 s before it kills them; a second kills its session;
- under mpirun it forwards (`-x`) every variable that changes numerics or threading
  (launcher_env.numerics_env) set here, as horovodrun does with the whole environment:
  ranks started over ssh see only what `-x` names.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import RanksOutOfSync
from .procs import kill_session


# --- the launcher's command line ----------------------------------------------------------

MPIRUN = ("mpirun", "mpiexec", "orterun")
HOST_FLAGS = ("-H", "-host", "--host", "--hosts", "-hosts")
HOSTFILE_FLAGS = ("-hostfile", "--hostfile", "-machinefile", "--machinefile",
                  "--default-hostfile", "-default-hostfile")


def launcher_kind(argv: Sequence[str]) -> str:
    name = os.path.basename(argv[0])
    if name in MPIRUN:
        return "mpirun"
    return "horovodrun" if name == "horovodrun" else "other"


def option(argv: Sequence[str], flags: Sequence[str]) -> Optional[str]:
    """The value of the last of `flags` in argv (`-H a,b` or `--hosts=a,b`)."""
    value = None
    for i, arg in enumerate(argv):
        if arg in flags and i + 1 < len(argv):
            value = argv[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in flags:
            value = arg.split("=", 1)[1]
    return value


def mca(argv: Sequence[str], name: str) -> Optional[str]:
    """An MCA parameter's value from mpirun's argv (`--mca NAME V`, `-mca NAME V`) or
    from the environment (OMPI_MCA_NAME)."""
    value = os.environ.get(f"OMPI_MCA_{name}")
    for i, arg in enumerate(argv[:-2]):
        if arg in ("-mca", "--mca", "-gmca", "--gmca") and argv[i + 1] == name:
            value = argv[i + 2]
    return value


def slots_of(hosts: str) -> List[Tuple[str, int]]:
    """`a:2,b:2` or `a,a,b` -> [(a, 2), (b, 2)] / [(a, 2), (b, 1)], in order."""
    out: Dict[str, int] = {}
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition(":")
        out[name] = out.get(name, 0) + (int(count) if count.isdigit() else 1)
    return list(out.items())


def read_hostfile(path: str) -> List[Tuple[str, int]]:
    """`host slots=N` lines (mpirun's and horovodrun's hostfile format)."""
    out: Dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = next((int(w.split("=", 1)[1]) for w in words[1:]
                      if re.fullmatch(r"(max_)?slots=\d+", w) and w.startswith("slots")), 1)
        out[words[0]] = out.get(words[0], 0) + slots
    return list(out.items())


def rank_hosts(argv: Sequence[str]) -> Optional[List[str]]:
    """Host of each rank, as mpirun (filling each host's slots, the default and
    `-map-by slot`) and horovodrun place them; None when the command line does not say."""
    hosts = option(argv, HOST_FLAGS)
    slots = slots_of(hosts) if hosts else []
    if not slots:
        hostfile = option(argv, HOSTFILE_FLAGS)
        if hostfile is None and launcher_kind(argv) == "mpirun":
            hostfile = os.environ.get("OMPI_MCA_orte_default_hostfile")
        slots = read_hostfile(hostfile) if hostfile else []
    np_value = option(argv, ("-np", "-n", "--np", "-c"))
    if not slots or not np_value or not np_value.isdigit():
        return None
    np_ = int(np_value)
    by_node = "node" in (option(argv, ("-map-by", "--map-by")) or "") or \
        any(a in ("-bynode", "--bynode") for a in argv)
    if by_node:
        order = [h for h, _ in slots]
        return [order[r % len(order)] for r in range(np_)]
    placed = [h for h, n in slots for _ in range(n)]
    # Oversubscribed (more ranks than slots): mpirun refuses unless told; say nothing.
    return placed[:np_] if len(placed) >= np_ else None


def forward_numerics(argv: List[str], environ=os.environ) -> List[str]:
    """mpirun's argv with `-x NAME` for every numerics/threading variable set here that
    it does not forward already (a remote rank sees only what -x names)."""
    from .launcher_env import numerics_env

    named = {argv[i + 1].split("=", 1)[0] for i, a in enumerate(argv[:-1]) if a == "-x"}
    extra = []
    for name in sorted(numerics_env(environ)):
        if name not in named:
            extra += ["-x", name]
    return [argv[0], *extra, *argv[1:]]


# --- what the launcher and the ranks said ---------------------------------------------------

SIGNAL_DEATH = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on "
                          r"signal (\d+)(?: \(([^)]*)\))?")
MPI_PROCESS = re.compile(r"Process name:\s+\[\[\d+,\d+\],(\d+)\]")
MPI_EXIT = re.compile(r"Exit code:\s+(-?\d+)")
HVD_EXIT = re.compile(r"Process (\d+) exit with status code (-?\d+)")
# ssh's and horovodrun's words for a node it cannot reach: (pattern, reason or None for
# the pattern's second group).
SSH_FAILURES = [
    (re.compile(r"ssh: connect to host (\S+) (port \d+: [^\[]+)"), None),
    (re.compile(r"ssh: Could not resolve hostname (\S+?): (.+)"), None),
    (re.compile(r"Timeout, server (\S+) not responding"),
     "it stopped answering (ssh keepalive timeout)"),
    (re.compile(r"Connection to (\S+) closed by remote host"), "connection closed"),
    (re.compile(r"ssh not successful for host (\S+?):?$"), ""),
]
LOST_DAEMON = re.compile(r"Remote daemon:\s+\S+ on node (\S+)")
PEER_HOST = re.compile(r"^\s*Peer host:\s+(\S+)")
GLOO_PEER = re.compile(r"background loop uncaught exception: .*?\] (.*?\[(\d+\.\d+\.\d+\.\d+)\]"
                       r":\d+.*)")
# (A line's text ends where another rank's line begins: mpirun can splice two into one.)
RANK_LINE = re.compile(r"dist-lm: (error|stopped): \[rank (\d+)(?: on ([^\]]+))?\] "
                       r"(.*?)(?=dist-lm: |$)")
# mpirun's and horovodrun's words for "the job is failing".
FAILING = re.compile(r"Primary job\s+terminated normally, but \d+ process returned|"
                     r"mpirun noticed that process|ORTE was unable to reliably start|"
                     r"ORTE has lost communication|An MPI communication peer process has|"
                     r"Terminating remaining workers after failure|"
                     r"could not connect to some hosts via ssh|"
                     r"ORTE does not know how to route")
# dist-lm lines that are the symptom of a lost peer rather than the cause of a failure.
SYMPTOM = ("peer rank",)


class JobReport:
    """Reads the launcher's and the ranks' lines; says what ended the job, in one line."""

    def __init__(self, kind: str, hosts: Optional[List[str]]):
        self.kind, self.hosts = kind, hosts
        self.lock = threading.Lock()
        self.failing_since: Optional[float] = None
        self.signal_deaths: List[Tuple[int, str, str]] = []    # (rank, node, signal)
        self.ssh_failures: List[Tuple[str, str]] = []           # (node, reason)
        self.lost_nodes: List[str] = []
        self.peer_hosts: List[str] = []
        self.exits: List[Tuple[int, int]] = []                  # (rank, code)
        self.rank_lines: List[Tuple[str, int, str, str]] = []   # (kind, rank, host, text)
        self.gloo_peers: List[Tuple[str, str]] = []             # (address, what)
        self.daemon_failed = False
        self._mpi_process: Optional[int] = None

    def feed(self, line: str) -> None:
        with self.lock:
            self._feed(line.rstrip("\n"))

    def _feed(self, line: str) -> None:
        if FAILING.search(line) and self.failing_since is None:
            self.failing_since = time.monotonic()
        if "ORTE was unable to reliably start" in line or "ORTE has lost communication" in line:
            self.daemon_failed = True
        m = SIGNAL_DEATH.search(line)
        if m:
            name = m.group(4) or signal_name(int(m.group(3)))
            self.signal_deaths.append((int(m.group(1)), m.group(2), f"{m.group(3)} ({name})"))
        for pattern, reason in SSH_FAILURES:
            m = pattern.search(line)
            if m:
                node = m.group(1).strip("'\"")
                self.ssh_failures.append((node, m.group(2) if reason is None else reason))
        m = LOST_DAEMON.search(line)
        if m:
            self.lost_nodes.append(m.group(1))
        m = PEER_HOST.search(line)
        if m:
            self.peer_hosts.append(m.group(1))
        m = MPI_PROCESS.search(line)
        if m:
            self._mpi_process = int(m.group(1))
        m = MPI_EXIT.search(line)
        if m and self._mpi_process is not None:
            self.exits.append((self._mpi_process, int(m.group(1))))
            self._mpi_process = None
        m = HVD_EXIT.search(line)
        if m:
            self.exits.append((int(m.group(1)), int(m.group(2))))
            if self.failing_since is None and int(m.group(2)) != 0:
                self.failing_since = time.monotonic()
        m = GLOO_PEER.search(line)
        if m:
            self.gloo_peers.append((m.group(2), m.group(1)))
        for m in RANK_LINE.finditer(line):
            self.rank_lines.append((m.group(1), int(m.group(2)), m.group(3) or "",
                                    m.group(4)))

    def failed_exits(self) -> List[Tuple[int, int]]:
        with self.lock:
            return self._failed_exits()

    def _failed_exits(self) -> List[Tuple[int, int]]:
        """(rank, code) of the ranks that failed, causes first: a rank that lost its peer
        (exit code 4) is the symptom of another's end."""
        return sorted(((r, c) for r, c in self.exits if c != 0),
                      key=lambda e: e[1] == RanksOutOfSync.exit_code)

    def host_of(self, rank: int) -> Optional[str]:
        if self.hosts and 0 <= rank < len(self.hosts):
            return self.hosts[rank]
        return None

    def ranks_on(self, node: str) -> str:
        ranks = [str(r) for r, h in enumerate(self.hosts or []) if same_host(h, node)]
        if not ranks:
            return ""
        return f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)})"

    def where(self, rank: int, host: str = "") -> str:
        host = host or self.host_of(rank) or ""
        return f"rank {rank} on {host}" if host else f"rank {rank}"

    def cause(self, code: int, stopped_by_signal: bool,
              probe=None) -> Tuple[str, str]:
        """('error' or 'stopped', the sentence) for a launcher that exited with `code`."""
        with self.lock:
            stops = [r for r in self.rank_lines if r[0] == "stopped"]
            errors = [r for r in self.rank_lines if r[0] == "error"]
            causes = [r for r in errors if not any(s in r[3] for s in SYMPTOM)]
            if stopped_by_signal and stops and not causes:
                # Asked to stop, and ranks did so with a checkpoint: what the launcher's
                # ssh sessions said while the job came down is not the story.
                _, rank, host, text = stops[0]
                return "stopped", f"[{self.where(rank, host)}] {text}"
            if self.signal_deaths:
                rank, node, sig = self.signal_deaths[0]
                if not (stopped_by_signal and sig.startswith(("15 ", "10 "))):
                    return "error", f"rank {rank} on {node} was killed by signal {sig}"
            if self.ssh_failures:
                node = self.ssh_failures[0][0]
                reason = next((r for n, r in self.ssh_failures if n == node and r), "")
                if "keepalive" in reason:
                    return "error", f"lost {node}{self.ranks_on(node)}: {reason}"
                return "error", f"cannot reach {node}{self.ranks_on(node)} over ssh" + \
                    (f": {reason}" if reason else "")
            if self.lost_nodes:
                node = self.lost_nodes[0]
                return "error", f"lost contact with {node}{self.ranks_on(node)}"
            if causes:
                _, rank, host, text = causes[0]
                return "error", f"[{self.where(rank, host)}] {text}"
            if stops and not errors and not self.daemon_failed:
                _, rank, host, text = stops[0]
                return "stopped", f"[{self.where(rank, host)}] {text}"
            gloo_peers = list(self.gloo_peers)
            exits = self._failed_exits()
            peer_hosts = list(self.peer_hosts)
            symptom = errors[0] if errors else None
        # Something stopped answering: find which node does not answer ssh now.
        unreachable = probe() if probe is not None else []
        if unreachable:
            node, reason = unreachable[0]
            return "error", f"lost {node}{self.ranks_on(node)}: it does not answer ssh " \
                            f"now ({reason})"
        if peer_hosts:
            node = peer_hosts[0]
            return "error", f"a rank on {node}{self.ranks_on(node)} disconnected " \
                            f"unexpectedly"
        if exits:
            rank, rc = exits[0]
            host = self.host_of(rank)
            if rc == 255 and self.kind == "horovodrun" and probe is not None and \
                    host not in (None, "localhost", "127.0.0.1"):
                return "error", f"{self.where(rank)} ended abruptly (killed or crashed: its " \
                                f"ssh session exited 255, and {host} still answers ssh)"
            return "error", f"{self.where(rank)} exited with code {rc}{exit_meaning(rc)}"
        if gloo_peers:
            address, what = gloo_peers[0]
            return "error", f"a rank lost its connection to {host_name(address)}: {what}"
        if symptom is not None:
            _, rank, host, text = symptom
            return "error", f"[{self.where(rank, host)}] {text}"
        if self.daemon_failed:
            return "error", "mpirun could not start or lost one of its daemons on the " \
                            "other nodes"
        if code < 0:
            return "error", f"the launcher was killed by signal {-code} ({signal_name(-code)})"
        return "error", f"the launcher exited with code {code}"


def exit_meaning(code: int) -> str:
    if code > 128 and code - 128 < 65:
        return f" (killed by signal {code - 128} ({signal_name(code - 128)}))"
    return {2: " (bad input)", 3: " (non-finite values)",
            4: " (a peer rank was lost or ranks went out of step)"}.get(code, "")


def signal_name(number: int) -> str:
    """As the C library says it: 9 -> 'Killed', 15 -> 'Terminated'."""
    try:
        return signal.strsignal(number) or "unknown"
    except ValueError:
        return "unknown"


def host_name(address: str) -> str:
    try:
        return socket.gethostbyaddr(address)[0]
    except OSError:
        return address


def same_host(a: str, b: str) -> bool:
    return a == b or a.split(".", 1)[0] == b.split(".", 1)[0]


# --- which node does not answer ------------------------------------------------------------

def ssh_command(argv: Sequence[str], kind: str) -> List[str]:
    """The ssh the launcher uses to reach the other nodes."""
    if kind == "mpirun":
        agent = mca(argv, "plm_rsh_agent")
        if agent:
            return shlex.split(agent.split(":", 1)[0])
        return ["ssh"]
    ssh = ["ssh"]
    port = option(argv, ("-p", "--ssh-port"))
    identity = option(argv, ("-i", "--ssh-identity-file"))
    if port:
        ssh += ["-p", port]
    if identity:
        ssh += ["-i", identity]
    return ssh


def probe_hosts(hosts: Sequence[str], ssh: Sequence[str],
                timeout_s: float = 5.0) -> List[Tuple[str, str]]:
    """The hosts (other than this one) that do not answer `ssh HOST true` within
    timeout_s, each with ssh's last line; all probed at once."""
    here = {socket.gethostname(), "localhost", "127.0.0.1"}
    others = [h for h in dict.fromkeys(hosts) if h not in here]
    connect = max(1, int(timeout_s) - 2)
    procs = {h: subprocess.Popen([*ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}",
                                  "-o", "ConnectionAttempts=1", h, "true"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
             for h in others}
    failed = []
    deadline = time.monotonic() + timeout_s
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.communicate()
            failed.append((host, f"no answer within {timeout_s:g}s"))
            continue
        if proc.returncode != 0:
            lines = [x for x in err.strip().splitlines() if x.strip()]
            reason = lines[-1] if lines else f"ssh exited {proc.returncode}"
            failed.append((host, reason.replace(f"ssh: connect to host {host} port ", "port ")))
    return failed


# --- the supervisor -------------------------------------------------------------------------

def _relay(stream, sink, report: JobReport, drop_tracebacks: bool = False) -> None:
    """Copies stream to sink line by line, feeding the report. drop_tracebacks: the
    launcher's own Python tracebacks (horovodrun's, which say nothing its last line and
    the ranks' lines do not) shrink to that last line; the ranks' lines carry a prefix."""
    held: List[bytes] = []

    def write(line: bytes) -> None:
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):
            pass

    for raw in iter(stream.readline, b""):
        report.feed(raw.decode("utf-8", "replace"))
        if drop_tracebacks and (held or raw.startswith(b"Traceback (most recent call last)")):
            held.append(raw)
            if raw[:1].isspace() or len(held) == 1:
                continue
            raw, held = held[-1], []  # the exception's own line
        write(raw)
    for line in held:
        write(line)
    stream.close()


# SIGHUP: the terminal or ssh session that started the job went away; a stop like the
# others.
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def pass_on(pid: int, kind: str, count: int, signum: int) -> None:
    """The count-th stop signal to the launcher (see the module docstring)."""
    try:
        if count == 1 and kind == "mpirun":
            os.kill(pid, signal.SIGUSR1)   # forwarded to every rank at once
        elif count == 1:
            os.kill(pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        elif count == 2 and kind == "mpirun":
            os.kill(pid, signal.SIGTERM)
        else:
            kill_session(pid, wait_s=5)
    except ProcessLookupError:
        pass


def supervise(argv: List[str], grace_s: float = 20.0, probe_timeout_s: float = 5.0) -> int:
    """Runs the launcher argv to its end (see the module docstring); returns its exit
    code (128 + N when signal N ended it; when it had to be killed, the failed rank's,
    else 1)."""
    kind = launcher_kind(argv)
    if kind == "mpirun":
        argv = forward_numerics(argv)
    report = JobReport(kind, rank_hosts(argv))
    signals: List[int] = []
    passed: List[int] = []                      # of signals, those passed on
    started: List[subprocess.Popen] = []

    def pass_signals() -> None:
        while started and len(passed) < len(signals):
            passed.append(signals[len(passed)])
            pass_on(started[0].pid, kind, len(passed), passed[-1])

    def on_signal(signum, frame):
        signals.append(signum)
        pass_signals()

    # Installed before the launcher starts: a signal in between would otherwise end this
    # process and leave the launcher, in its own session, running. Restored only after
    # the final line, which a signal must not cut short either.
    previous = {s: signal.signal(s, on_signal) for s in STOPS}
    try:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:
            print(f"dist-lm: error: cannot start {argv[0]}: {err.strerror}",
                  file=sys.stderr)
            return 127
        started.append(proc)
        pass_signals()  # those that came while it started
        return _watch(proc, argv, kind, report, signals, grace_s, probe_timeout_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _watch(proc: subprocess.Popen, argv: List[str], kind: str, report: JobReport,
           signals: List[int], grace_s: float, probe_timeout_s: float) -> int:
    relays = [threading.Thread(target=_relay, daemon=True,
                               args=(stream, sink, report, kind == "horovodrun"))
              for stream, sink in ((proc.stdout, sys.stdout.buffer),
                                   (proc.stderr, sys.stderr.buffer))]
    for t in relays:
        t.start()
    killed = False
    try:
        while proc.poll() is None:
            since = report.failing_since
            if since is not None and time.monotonic() - since > grace_s:
                print(f"dist-lm: {os.path.basename(argv[0])} did not end within "
                      f"{grace_s:g}s of the failure; ending it", file=sys.stderr, flush=True)
                kill_session(proc.pid)
                killed = True
                break
            time.sleep(0.2)
        code = proc.wait()
        # Whatever the launcher left on this node (its ranks, ssh clients) goes with it;
        # until then they would hold the output pipes open.
        kill_session(proc.pid)
        for t in relays:
            t.join(timeout=10)
    except BaseException:
        kill_session(proc.pid)
        raise
    if killed:
        failed = report.failed_exits()
        code = failed[0][1] if failed else 1
    if code == 0 and not killed:
        return 0
    hosts = report.hosts or []
    ssh = ssh_command(argv, kind)
    verdict, sentence = report.cause(
        code, bool(signals),
        probe=(lambda: probe_hosts(hosts, ssh, probe_timeout_s)) if hosts else None)
    print(f"dist-lm: {verdict}: job {'stopped' if verdict == 'stopped' else 'failed'}: "
          f"{sentence}", file=sys.stderr, flush=True)
    if verdict == "stopped":
        return 143  # what the ranks said; horovodrun reports 1 whatever they did
    return code if code > 0 else 128 - code if code < 0 else 1


USAGE = """usage: dist-lm launch [--grace S] LAUNCHER [ARGS...]
Runs LAUNCHER (mpirun, horovodrun, ...) and makes sure the job ends whole, with one line
that names the lost rank or node (see dist_lm/runtime/launch.py)."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    grace = 20.0
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0)
        if flag == "--":
            break
        if flag == "--grace" and argv:
            try:
                grace = float(argv.pop(0))
            except ValueError:
                grace = -1
            if grace <= 0:
                print("dist-lm: error: --grace must be a positive number of seconds",
                      file=sys.stderr)
                return 2
        elif flag in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            print(f"dist-lm: error: unknown option {flag}", file=sys.stderr)
            return 2
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    return supervise(argv, grace_s=grace)
