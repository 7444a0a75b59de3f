"""What each rank tells the launcher supervisor (`dist-lm launch`) about itself: a start
record (its rank, host and pid) as soon as it starts, and an exit record (its exit code
and the one-line reason) when it ends in a way Python sees.

A record is one line on stderr in the project's own format, so that the supervisor never
has to read another program's words to learn where a rank ran or why it ended:

    dist-lm-record: {"event": "start", "rank": 2, "size": 3, "host": "node3", "pid": 4242}
    dist-lm-record: {"event": "exit", "rank": 2, "size": 3, "host": "node3", "pid": 4242,
                     "signalled": false, "step": 130, "checkpoint": 100,
                     "code": 4, "kind": "error", "reason": "no training progress ..."}

(one line each; `kind` is "ok", "error" or "stopped"). Parts of the process add their
fields to the exit record through `describe`: a rank that installed the stop flag says
whether it received a stop signal itself (`signalled`) or stopped only because the other
ranks agreed to (lifecycle.py); a training rank says where it got to, its optimizer steps
done (`step`) and the step of the newest checkpoint it wrote or resumed from
(`checkpoint`, null when none; training/train.py). mpirun and horovodrun relay the
ranks' stderr to the supervisor (horovodrun puts `[R]<stderr>:` in front), which finds
records anywhere in a line, and neither passes them on to the user. Each record is one
`os.write`, so that mpirun cannot splice another rank's output into it (see
lifecycle.say).

Ranks write records only when the supervisor asks for them, by setting REQUEST in the
launcher's environment (and naming it with `-x` to mpirun): a user running mpirun
without the supervisor sees only the usual lines.

The supervisor tells the ranks the world they form in WORLD, a JSON object (`world`):

    DIST_LM_WORLD='{"restart": 2, "reason": "node4 lost", "hosts": "node1:1,node2:1"}'

(`restart` 0 for the first world), which training writes into the run's history
(training/observe.py). Imports nothing of dist_lm.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

PREFIX = "dist-lm-record: "
REQUEST = "DIST_LM_SELF_REPORT"
WORLD = "DIST_LM_WORLD"
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK")
SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE")


# --- a rank's side -------------------------------------------------------------------------

def _first(names) -> Optional[int]:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


_asked: List[bool] = []   # whether this process was asked, read once


def _requested() -> bool:
    """Whether the supervisor asked this process for records. The request is taken out
    of the environment: processes this one starts are not ranks of the job."""
    if not _asked:
        _asked.append(bool(os.environ.pop(REQUEST, "")))
    return _asked[0]


def _write(event: str, fields: dict) -> None:
    rank = _first(RANK_VARS)
    if not _requested() or rank is None:
        return
    record = {"event": event, "rank": rank, "size": _first(SIZE_VARS),
              "host": socket.gethostname(), "pid": os.getpid(), **fields}
    line = PREFIX + json.dumps(record, separators=(", ", ": "), default=str) + "\n"
    try:
        sys.stderr.flush()  # after this rank's own lines, never in the middle of one
    except (OSError, ValueError):
        pass
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass


_described: Dict[str, Callable[[], dict]] = {}   # part -> its exit record fields


def describe(part: str, fields: Callable[[], dict]) -> None:
    """fields() gives the exit record fields of `part` of the process, beside the record's
    own (a later call for the same part replaces it). It is called when the record is
    written, from whichever thread ends the process (the watchdog's too), so it only
    reads what is there; an error in it leaves its fields out, never the record."""
    _described[part] = fields


def _described_fields() -> dict:
    merged = {}
    for fields in list(_described.values()):
        try:
            merged.update(fields())
        except Exception:  # the record goes out without them
            pass
    return merged


def world() -> dict:
    """The world the supervisor started this rank in (WORLD), {} when none or unreadable."""
    try:
        value = json.loads(os.environ.get(WORLD, ""))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def progress(**fields) -> None:
    """A progress record (rank 0's: the step reached, the newest checkpoint's step), which
    tells the supervisor how far the job got however its ranks end: a launcher that kills
    them leaves no exit records."""
    _write("progress", fields)


def started() -> None:
    """The start record: this rank's rank, host and pid."""
    _write("start", {})


def ended(code: int, reason: str, kind: Optional[str] = None) -> None:
    """The exit record: the code this process is about to exit with, and why (one line).
    kind: "stopped" for a stop with a checkpoint; by default "ok" for 0, else "error"."""
    kind = kind or ("ok" if code == 0 else "error")
    reason = next((x.strip() for x in str(reason).splitlines() if x.strip()), "")
    _write("exit", {**_described_fields(), "code": int(code), "kind": kind,
                    "reason": reason[:500]})


class Outcome:
    """How a command ended, as it says itself: its exit code, why (by default
    "finished" for 0) and the kind of end (see `ended`)."""

    def __init__(self) -> None:
        self.code, self.reason, self.kind = 0, "finished", None

    def set(self, code: int, reason: Optional[str] = None, kind: Optional[str] = None) -> None:
        self.code, self.kind = int(code), kind
        self.reason = reason or ("finished" if code == 0 else f"exited with code {code}")


@contextlib.contextmanager
def exit_record() -> Iterator[Outcome]:
    """Writes the exit record of the block: the Outcome the block set, or what the
    exception that leaves it means (SystemExit(128 + N) from a signal handler, or an
    uncaught error, which Python reports with exit code 1)."""
    outcome = Outcome()
    try:
        yield outcome
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        # A stop signal's exit (lifecycle marks it `stop`) is a stop, not an error: one
        # outside training, or a second one while the agreed stop winds down.
        kind = "stopped" if getattr(err, "stop", False) else None
        ended(code, _signal_reason(code) if code > 128 else f"exited with code {code}", kind)
        raise
    except BaseException as err:
        ended(1, f"{type(err).__name__}: {err}")
        raise
    else:
        ended(outcome.code, outcome.reason, outcome.kind)


def _signal_reason(code: int) -> str:
    try:
        name = signal.strsignal(code - 128) or "unknown"
    except ValueError:
        name = "unknown"
    return f"ended by signal {code - 128} ({name})"


# --- the supervisor's side -----------------------------------------------------------------

def parse(line: str) -> Tuple[List[dict], str]:
    """The records in a line as the supervisor reads it, and the text around them (the
    launcher's tag in front, `[1]<stderr>:`, or a fragment of another line)."""
    records, rest, at = [], [], 0
    decoder = json.JSONDecoder()
    while True:
        start = line.find(PREFIX, at)
        if start < 0:
            rest.append(line[at:])
            break
        rest.append(line[at:start])
        try:
            record, end = decoder.raw_decode(line, start + len(PREFIX))
        except ValueError:  # not one of ours after all: keep the text
            rest.append(PREFIX)
            at = start + len(PREFIX)
            continue
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            records.append(record)
        at = end
    return records, "".join(rest)
