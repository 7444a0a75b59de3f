"""Ending a launched job whole: a launcher (mpirun, horovodrun) and every rank under it.

Started with start_new_session=True, a launcher's session holds the launcher and all the
processes it starts, ranks included, unless one of them makes a session of its own.
`kill_session` ends them all; `launch.py` (`dist-lm launch`) supervises a launcher with it.
`run_bounded` runs a short helper (the discovery script, an ssh probe) to its end within
a time limit, whatever the processes it leaves behind do with its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import List, NamedTuple, Optional, Sequence


def kill_session(sid: int, wait_s: float = 30.0) -> None:
    """SIGKILLs every process of session sid and returns once none is alive.

    The session, not the process group: Open MPI puts each rank in a process group of its
    own (so killpg on mpirun's group leaves the ranks running), but not in a session of
    its own. A killed rank also takes a while to die (it unmaps a few hundred MB), and
    returning before that would let the caller, or the next measurement, see it running.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        members = session_members(sid)
        if members is None:  # no /proc: the launcher's group is the best there is
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def session_members(sid: int) -> Optional[List[int]]:
    """Live processes of session sid, from /proc (None without /proc). Zombies count as
    gone: they hold no memory or CPU, and one re-parented to an init that never reaps
    would never go."""
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    members = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # pid (comm) state ppid pgrp session ...; comm may hold spaces and ')'.
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            members.append(pid)
    return members


class Bounded(NamedTuple):
    """How run_bounded's command ended: its exit code (None: it was still running at the
    limit), what it printed, and whether the limit was reached."""
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool


def run_bounded(argv: Sequence[str], timeout_s: float) -> Bounded:
    """Runs argv in a session of its own (text output) and returns within about
    timeout_s + 2 s (see `finish`). Raises OSError when argv cannot be started."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    return finish(proc, timeout_s)


def finish(proc: subprocess.Popen, timeout_s: float) -> Bounded:
    """Reads proc (started with start_new_session and piped stdout and stderr) to its end
    within timeout_s, and at most about 2 s more.

    Reading its output to the end is not enough: a process it started in the background
    holds the pipes open after it exits, and one that made a session of its own
    (setsid) outlives kill_session. At the limit its session (its process group and
    every group made in it) is killed, what was printed is read for at most a second
    more, and then the pipes are closed whoever still holds them."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return Bounded(proc.returncode, out, err, False)
    except subprocess.TimeoutExpired:
        exited = proc.poll()
    kill_session(proc.pid, wait_s=1)
    try:
        out, err = proc.communicate(timeout=1)
    except subprocess.TimeoutExpired:  # held open outside the session
        out, err = None, None
        for pipe in (proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    return Bounded(exited, out or "", err or "", True)
