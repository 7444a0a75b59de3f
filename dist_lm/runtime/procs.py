"""Ending a launched job whole: a launcher (mpirun, horovodrun) and every rank under it.

Started with start_new_session=True, a launcher's session holds the launcher and all the
processes it starts, ranks included, unless one of them makes a session of its own.
`kill_session` ends them all; `launch.py` (`dist-lm launch`) supervises a launcher with it.
"""

from __future__ import annotations

import os
import signal
import time
from typing import List, Optional


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
