"""Signals and the watchdog: how a rank learns it must stop.

`StopFlag` turns SIGTERM/SIGINT (and SIGUSR1, which is how the project's launcher
wrapper asks the ranks under mpirun to stop: mpirun forwards it at once, see
dist_lm/runtime/launch.py) into a flag that the training loop shares every step, so that all ranks
agree (an allreduce of the flag) to stop together after a checkpoint. A second SIGTERM or
SIGINT, or a signal outside training, ends the process at once; SIGUSR1 again is the same
request (a worker pod's preStop hook and mpirun both send one when a drained node held the
worker and the launcher, k8s/base/mpijob.yaml). The rank's exit record says whether this
process received a stop signal itself (`signalled`, selfreport): a preStop hook signals
only the ranks of the pod that is going away, the others stop because they agreed to.
SIGTERM or SIGINT after the agreement is the job ending (mpirun and horovodrun end the
other ranks with SIGTERM once one has exited), not this rank's own; SIGUSR1 at any time
is (a second pod's preStop hook, evicted just after the first: its pod is going away too,
and the elastic supervisor must set it aside).

`Watchdog` ends the process with a one-line message (exit code 4) when the loop makes no
progress for `timeout` seconds: the guard against a peer that died or collectives that
went out of step, which Horovod's Gloo controller would otherwise wait on forever. It
also ends a rank that a stop signal cannot reach: Python runs a signal handler only
when the main thread returns from C, and a rank blocked in a collective with a vanished
peer never does. The watchdog thread learns of the signal from the wakeup pipe that
Python's C-level handler writes to, and exits the process `stop_grace_s` later if the
handler still has not run. A wait that is known to be long, a checkpoint write (rank 0
writes and hashes while the other ranks wait in a collective), is declared with
`Watchdog.waiting`: it has its own limit, and a stop signal meanwhile is left for the
loop to act on once the wait is over. Last, a rank whose launcher is gone (`orphaned`,
launcher_env.launcher_gone) is asked to stop as by SIGTERM, within a second, and ended
`stop_grace_s` later if it has not: no signal reaches such a rank (horovodrun kills the
ssh client of a rank on another node, whose sshd session then ends and leaves the rank
running), and under Gloo a peer can stay blocked in a collective long after the job
ended. The grace keeps the stop checkpoint: horovodrun kills the ssh clients the moment it
signals rank 0, and the remote ranks must still agree to the stop and wait for its write.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Callable, List

from . import selfreport

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def rank_and_host() -> str:
    """`[rank R on HOST] ` under a launcher, else ''."""
    rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
    return f"[rank {rank} on {socket.gethostname()}] " if rank is not None else ""


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0
        self.signalled = False  # a stop signal reached this process before `agreed`
        self.agreed = False     # the ranks agreed to stop (Agreement)
        self._armed = False
        self.wakeup = None  # read end of the pipe Python's C-level handler writes to

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        selfreport.describe("stop", lambda: {"signalled": self.signalled})
        if self.wakeup is None:
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            try:
                signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            except ValueError:  # not the main thread: no wakeup pipe, no stop grace
                os.close(read)
                os.close(write)
                return
            self.wakeup = read

    def arm(self, armed: bool = True) -> None:
        """While armed, a first signal only sets the flag (the loop will stop cleanly)."""
        self._armed = armed

    def request(self) -> None:
        """A stop this process asks for itself (its launcher is gone): the loop stops at the
        agreed step as for SIGTERM; not a signal (`signalled` stays as it was)."""
        if self._armed and not self.signum:
            self.signum = signal.SIGTERM

    def received(self, signum: int) -> None:
        """A stop signal reached this process (its handler, or the watchdog, saw it)."""
        if not self.agreed or signum == signal.SIGUSR1:
            self.signalled = True

    def _handle(self, signum, frame) -> None:
        self.received(signum)
        if signum == signal.SIGUSR1:  # a stop request, as SIGTERM (exit code 143)
            if self._armed and self.signum:
                return  # asked again: the same request
            signum = signal.SIGTERM
        if self._armed and not self.signum:
            self.signum = signum
            return
        # Outside training, or again while the stop winds down: end now, as a stop (the
        # rank's exit record says so; selfreport reads `stop`), not as a failure.
        end = SystemExit(128 + signum)
        end.stop = True
        raise end


STOP = StopFlag()


class Watchdog:
    def __init__(self, timeout_s: float, what: str = "training", stop_grace_s: float = 30.0,
                 orphaned: Callable[[], bool] = lambda: False):
        self.timeout = timeout_s
        self.what = what
        self.stop_grace = stop_grace_s
        self.orphaned = orphaned
        self._last = time.monotonic()
        self._waiting = None  # (what, limit_s, flag) inside `waiting`
        self._stop = threading.Event()
        self._thread = None

    def beat(self) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def waiting(self, what: str, limit_s: float, flag: str):
        """A long wait that is progress: inside it the limit is limit_s (flag names it;
        0: none) instead of the watchdog's, and a stop signal gets no grace (the rank's
        Python handler runs when the wait is over and the loop stops at the agreed step)."""
        self.beat()  # beat, then declare (and the reverse at the end): see _watch
        self._waiting = (what, limit_s, flag)
        try:
            yield
        finally:
            self.beat()
            self._waiting = None

    def __enter__(self) -> "Watchdog":
        if self.timeout > 0:
            self.beat()
            while STOP.wakeup is not None:  # signals before this watch are not its own
                try:
                    if not os.read(STOP.wakeup, 512):
                        break
                except OSError:  # empty (non-blocking)
                    break
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="dist-lm-watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _signalled(self, wait_s: float) -> List[int]:
        """Waits up to wait_s; the stop signals that arrived meanwhile."""
        if STOP.wakeup is None:
            self._stop.wait(wait_s)
            return []
        try:
            if not select.select([STOP.wakeup], [], [], wait_s)[0]:
                return []
            return [b for b in os.read(STOP.wakeup, 512) if b in STOP_SIGNALS]
        except OSError:
            return []

    def _watch(self) -> None:
        signalled = orphaned = None
        while not self._stop.is_set():
            for signum in self._signalled(min(1.0, self.timeout / 4)):
                STOP.received(signum)  # its handler may never run (blocked in C)
                signalled = signalled or time.monotonic()
            if self._stop.is_set():
                return
            if orphaned is None and self.orphaned():
                orphaned = time.monotonic()
                STOP.request()
            if orphaned is not None and time.monotonic() - orphaned > self.stop_grace:
                exit_now(f"the launcher that started this rank is gone (its parent process "
                         f"ended {time.monotonic() - orphaned:.0f}s ago) and the rank has not "
                         f"stopped; exiting")
            # A wait read as over is always seen with the beat that ended it.
            now, waiting = time.monotonic(), self._waiting
            idle = now - self._last
            if waiting is not None:
                what, limit, flag = waiting
                if limit and idle > limit:
                    exit_now(f"{what} has not finished after {idle:.0f}s ({flag} "
                             f"{limit:g}): its storage may be stalled, or a peer rank died "
                             f"or stopped answering; exiting")
                continue
            if idle > self.timeout:
                exit_now(f"no {self.what} progress for {idle:.0f}s "
                         f"(--watchdog-s {self.timeout:g}): a peer rank may have died or "
                         f"stopped answering; exiting")
            if signalled is not None and not STOP.signum and \
                    now - max(signalled, self._last) > self.stop_grace:
                exit_now(f"a stop signal came {now - signalled:.0f}s ago and this rank is "
                         f"still blocked (in a collective whose peer rank may be gone); "
                         f"exiting without a checkpoint")


def say(line: str) -> None:
    """One line on stderr in one write: print() writes the text and the newline apart
    (unbuffered, as PYTHONUNBUFFERED makes it), and mpirun then splices the lines of
    ranks that end at the same moment into one."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def exit_now(message: str, code: int = 4) -> None:
    """One line on stderr (and the exit record, selfreport) and the process ends at once
    (from any thread, whatever the main thread is blocked in; no atexit handlers, which
    would block or raise too)."""
    say(f"dist-lm: error: {rank_and_host()}{message}")
    selfreport.ended(code, message)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


class StopAgreed(Exception):
    """Every rank saw the agreed stop at the same point (raised where the loop unwinds)."""


class Agreement:
    """What all ranks decide together, step by step: stop (a signal on any rank) and
    checkpoint now (--checkpoint-minutes elapsed on any rank, or every
    --checkpoint-steps steps).

    The flags of each call are summed over the ranks and read at the next call, when their
    allreduce has long finished: no stall, and every rank decides alike at the same call.
    A time-based request sent before a checkpoint was written is dropped, so one request
    gives one checkpoint. Evaluation batches call `poll_stop` with the same lag, so a stop
    is agreed within two batches there too.
    """

    def __init__(self, world, checkpoint_minutes: float, checkpoint_steps: int):
        self.world = world
        self.period_s = 60 * checkpoint_minutes
        self.every = checkpoint_steps
        self.pending = None            # the allreduce in flight, (2,)
        self.pending_call = 0          # the call that sent it
        self.calls = 0
        self.saved_call = 0            # the call at which the last checkpoint was written
        self.saved_at = time.time()

    def _exchange(self, stop: bool, due: bool):
        self.calls += 1
        if self.world.size == 1:  # nothing to agree on: decide at once
            return stop, due, self.calls
        import mxnet as mx

        previous, sent = (0, 0), 0
        if self.pending is not None:
            previous, sent = self.pending.asnumpy(), self.pending_call
        self.pending = self.world.allreduce_sum(mx.nd.array([stop, due]), name="control")
        self.pending_call = self.calls
        return bool(previous[0]), bool(previous[1]), sent

    def poll(self, step: int):
        """After training step `step`: (stop, checkpoint), the same on every rank."""
        due = bool(self.period_s) and time.time() - self.saved_at > self.period_s
        stop, due, sent = self._exchange(STOP.signum > 0, due)
        STOP.agreed = STOP.agreed or stop
        due = due and sent > self.saved_call
        return stop, stop or due or bool(self.every and step % self.every == 0)

    def poll_stop(self) -> None:
        """After an evaluation batch: raises StopAgreed when the ranks agreed to stop."""
        if self._exchange(STOP.signum > 0, False)[0]:
            STOP.agreed = True
            raise StopAgreed()

    def saved(self) -> None:
        """A checkpoint was just written."""
        self.saved_call, self.saved_at = self.calls, time.time()
