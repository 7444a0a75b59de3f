"""`dist-lm launch LAUNCHER ARGS...`: a launcher (mpirun, horovodrun) supervised so that
the job ends whole.

`supervise` runs a launcher the way the project's launch paths do (the MPIJob's
launcher, launch/train-workstation.sh):

- it asks the ranks to report themselves (selfreport: a start record with each rank's
  host and pid, an exit record with its code and reason; under mpirun `-x` passes the
  request on), passes every other line through, and ends with one line that says what
  ended the job and names the lost rank and node, decided from those records and a probe
  of the silent ranks' hosts (jobreport): `dist-lm: error: job failed: rank 2 on node3
  was killed by signal 9 (Killed; no exit record)`; never a launcher's traceback or help
  text as the last word;
- once the job is seen failing (a rank's exit record with an error, or the launcher's
  words for it) it has `grace_s` seconds to end; mpirun waits for a daemon on a
  partitioned node for many minutes, so after that its session is killed (every process
  it started on this node; a rank elsewhere stops when its daemon or ssh session is
  gone, and ends 30 s later if it could not, lifecycle.Watchdog);
- a first SIGTERM/SIGINT/SIGHUP asks the ranks to stop with a checkpoint. Under mpirun it
  becomes SIGUSR1, which mpirun forwards to every rank at once (dist-lm treats it as
  SIGTERM), whereas its own SIGTERM handling sends the ranks SIGCONT, waits
  odls_base_sigkill_timeout, and only then SIGTERM; a second signal is mpirun's SIGTERM
  and a third kills its session. horovodrun gets the first as SIGTERM (SIGINT as
  SIGINT) and gives its workers 5 s before it kills them; a second kills its session.

What changes numerics is not this module's concern: every rank takes rank 0's values
itself (launcher_env.adopt_root_numerics), with or without this supervisor.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import selfreport
from .jobreport import JobReport, probe_hosts
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


# --- how the launcher reaches the other nodes ----------------------------------------------

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


# --- the supervisor -------------------------------------------------------------------------

def ask_for_records(argv: List[str], kind: str) -> Tuple[List[str], Dict[str, str]]:
    """The launcher's argv and environment that make the ranks report themselves: the
    request in the environment (horovodrun passes all of it on), and under mpirun `-x`
    for it (a rank started over ssh sees only what -x names)."""
    env = dict(os.environ, **{selfreport.REQUEST: "1"})
    if kind == "mpirun":
        argv = [argv[0], "-x", selfreport.REQUEST, *argv[1:]]
    return argv, env


def _relay(stream, sink, report: JobReport, drop_tracebacks: bool = False) -> None:
    """Copies stream to sink line by line, feeding the report, which keeps the ranks'
    records for itself. drop_tracebacks: the launcher's own Python tracebacks
    (horovodrun's, which say nothing its last line and the ranks' lines do not) shrink
    to that last line; the ranks' lines carry a prefix."""
    held: List[bytes] = []

    def write(line: bytes) -> None:
        try:
            sink.write(line)
            sink.flush()
        except (OSError, ValueError):
            pass

    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        kept = report.feed(line)
        if kept is None:
            continue
        if kept != line:
            raw = kept.encode("utf-8")
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


def pass_on(pid: int, kind: str, count: int, signum: int) -> int:
    """The count-th stop signal to the launcher (see the module docstring); returns the
    signal sent (SIGKILL: its session killed)."""
    if count == 1 and kind == "mpirun":
        sent = signal.SIGUSR1   # forwarded to every rank at once
    elif count == 1:
        sent = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
    elif count == 2 and kind == "mpirun":
        sent = signal.SIGTERM
    else:
        kill_session(pid, wait_s=5)
        return signal.SIGKILL
    try:
        os.kill(pid, sent)
    except ProcessLookupError:
        pass
    return sent


class Signals:
    """The stop signals this supervisor received, passed on to the launcher that runs
    now (`attach`), and the supervisor's own request for a stop with a checkpoint
    (`ask_stop`, elastic.py's, when the job is to grow), which counts as the first one.

    Installed before a launcher starts (a signal in between would otherwise end this
    process and leave the launcher, in its own session, running) and restored only after
    the final line, which a signal must not cut short either."""

    def __init__(self) -> None:
        self.received: List[int] = []
        self.asked = False
        self.sent: List[int] = []   # the signals passed on to the launcher that runs now
        self._passed = 0
        self._proc: Optional[subprocess.Popen] = None
        self._kind = "other"
        self._previous: Dict[int, object] = {}
        # Reentrant: a second signal can arrive while the handler of the first runs.
        self._lock = threading.RLock()

    def __enter__(self) -> "Signals":
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOPS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        self._pass()

    def attach(self, proc: Optional[subprocess.Popen], kind: str = "other") -> None:
        """The launcher that signals go to from now on (None: none runs); a new launcher
        gets the signals that came while it started."""
        with self._lock:
            self._proc, self._kind, self._passed = proc, kind, 0
            self.asked, self.sent = False, []
        self._pass()

    def ask_stop(self) -> None:
        """A stop with a checkpoint that the supervisor itself asks for."""
        with self._lock:
            self.asked = True
        self._pass()

    def _pass(self) -> None:
        with self._lock:
            proc = self._proc
            # The user's first signal while the supervisor's own stop is under way is that
            # same stop (the ranks are writing its checkpoint); a second one escalates.
            wanted = max(len(self.received), 1 if self.asked else 0)
            while proc is not None and self._passed < wanted:
                self._passed += 1
                signum = self.received[self._passed - 1] \
                    if self._passed <= len(self.received) else signal.SIGTERM
                self.sent.append(pass_on(proc.pid, self._kind, self._passed, signum))


class Ending:
    """How one launch of the job ended: the launcher's exit code (as supervise returns
    it), the verdict ('ok', 'error' or 'stopped') and its sentence, and the report the
    verdict was read from."""

    def __init__(self, code: int, verdict: str, sentence: str, report: JobReport):
        self.code, self.verdict, self.sentence, self.report = code, verdict, sentence, report

    def line(self) -> str:
        """The supervisor's last line for this ending."""
        what = "stopped" if self.verdict == "stopped" else "failed"
        return f"dist-lm: {self.verdict}: job {what}: {self.sentence}"


def supervise(argv: List[str], grace_s: float = 20.0, probe_timeout_s: float = 5.0) -> int:
    """Runs the launcher argv to its end (see the module docstring); returns its exit
    code (128 + N when signal N ended it; when it had to be killed, the failed rank's,
    else 1)."""
    with Signals() as signals:
        ending = run_launcher(argv, signals, grace_s, probe_timeout_s)
        if ending.verdict != "ok":
            last_word(ending.line())
        return ending.code


def run_launcher(argv: List[str], signals: Signals, grace_s: float = 20.0,
                 probe_timeout_s: float = 5.0, env: Optional[Dict[str, str]] = None) -> Ending:
    """One launch of the job, to its end: what ended it (the caller prints the line).
    env: variables for the ranks besides this process's (under mpirun the caller names
    them with -x)."""
    kind = launcher_kind(argv)
    report = JobReport(rank_hosts(argv))
    ssh = ssh_command(argv, kind)
    argv, run_env = ask_for_records(argv, kind)
    run_env.update(env or {})
    if signals.received:  # a stop before the launcher started (an elastic job between
        # worlds): it is not started, rather than killed by a stop it cannot take yet
        return Ending(143, "stopped", f"stopped before {os.path.basename(argv[0])} started",
                      report)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=run_env)
    except OSError as err:
        return Ending(127, "error", f"cannot start {argv[0]}: {err.strerror}", report)
    signals.attach(proc, kind)
    try:
        probe = (lambda targets: probe_hosts(targets, ssh, probe_timeout_s))
        return _watch(proc, argv, kind, report, signals, grace_s, probe)
    finally:
        signals.attach(None)


def _watch(proc: subprocess.Popen, argv: List[str], kind: str, report: JobReport,
           signals: Signals, grace_s: float, probe) -> Ending:
    relays = [threading.Thread(target=_relay, daemon=True,
                               args=(stream, sink, report, kind == "horovodrun"))
              for stream, sink in ((proc.stdout, sys.stdout.buffer),
                                   (proc.stderr, sys.stderr.buffer))]
    for t in relays:
        t.start()
    # The silent ranks' hosts are probed as soon as the job is seen failing, while the
    # launcher still ends the other ranks (not when a stop was asked for).
    prober = threading.Thread(target=report.probe, args=(probe,), daemon=True)
    killed = False
    try:
        while proc.poll() is None:
            since = report.failing_since
            stopping = signals.received or signals.asked
            if since is not None and not stopping and prober.ident is None:
                prober.start()
            if since is not None and time.monotonic() - since > grace_s:
                last_word(f"dist-lm: {os.path.basename(argv[0])} did not end within "
                          f"{grace_s:g}s of the failure; ending it")
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
        if prober.ident is not None:
            prober.join()
    except BaseException:
        kill_session(proc.pid)
        raise
    if killed:
        code = report.failed_code()
    if code == 0 and not killed:
        return Ending(0, "ok", "finished", report)
    if code < 0 and -code in signals.sent and not report.started():
        # The stop came as the launcher started, before it could take a stop signal
        # (mpirun's SIGUSR1 handler, horovodrun's SIGTERM one) and before any rank ran:
        # a stop, not a launcher killed by a signal.
        return Ending(143, "stopped", f"stopped as {os.path.basename(argv[0])} started, "
                                      f"before any rank did", report)
    verdict, sentence = report.cause(code, bool(signals.received or signals.asked), probe)
    if verdict == "stopped":
        code = 143  # what the ranks said; horovodrun reports 1 whatever they did
    else:
        code = code if code > 0 else 128 - code if code < 0 else 1
    return Ending(code, verdict, sentence, report)


def last_word(line: str) -> None:
    """A line of the supervisor's own on stderr, which may be gone (`... 2>&1 | tee log`
    and Ctrl-C ends tee too): the exit code still says how the job ended."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
