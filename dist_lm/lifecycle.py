"""Signals and the watchdog: how a rank learns it must stop.

`StopFlag` turns SIGTERM/SIGINT into a flag that the training loop shares every step,
so that all ranks agree (an allreduce of the flag) to stop together after a checkpoint. A
second signal, or one outside training, ends the process at once.

`Watchdog` ends the process with a one-line message (exit code 4) when the loop makes no
progress for `timeout` seconds: the guard against a peer that died or collectives that
went out of step, which Horovod's Gloo controller would otherwise wait on forever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


class StopFlag:
    def __init__(self) -> None:
        self.signum = 0
        self._armed = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def arm(self, armed: bool = True) -> None:
        """While armed, a first signal only sets the flag (the loop will stop cleanly)."""
        self._armed = armed

    def _handle(self, signum, frame) -> None:
        if self._armed and not self.signum:
            self.signum = signum
            return
        raise SystemExit(128 + signum)


STOP = StopFlag()


class Watchdog:
    def __init__(self, timeout_s: float, what: str = "training"):
        self.timeout = timeout_s
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.timeout > 0:
            self.beat()
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="dist-lm-watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
                where = f"[rank {rank}] " if rank is not None else ""
                print(f"dist-lm: error: {where}no {self.what} progress for {idle:.0f}s "
                      f"(--watchdog-s {self.timeout:g}): a peer rank may have died or "
                      f"stopped answering; exiting", file=sys.stderr, flush=True)
                os._exit(4)


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
        due = due and sent > self.saved_call
        return stop, stop or due or bool(self.every and step % self.every == 0)

    def poll_stop(self) -> None:
        """After an evaluation batch: raises StopAgreed when the ranks agreed to stop."""
        if self._exchange(STOP.signum > 0, False)[0]:
            raise StopAgreed()

    def saved(self) -> None:
        """A checkpoint was just written."""
        self.saved_call, self.saved_at = self.calls, time.time()
