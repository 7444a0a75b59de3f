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
