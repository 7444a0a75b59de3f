"""What a chaos campaign (`dist-lm chaos`, tools/chaos.py) found: the job's timeline read
from its logs and metrics.jsonl, each fault's cost, the checks, and the table.

Pure functions over what the campaign recorded, so that they are tested without a
cluster:

- the log lines, each stamped with the wall time it arrived (`Line`): rank 0's training
  lines (`[Epoch E Batch B/NB] ...`, the step they reached) and the supervisor's restart
  lines (`dist-lm: elastic: restart K: ...; ... (L step(s) lost)`, what it says it lost);
- metrics.jsonl's `world` rows: when each world started and the checkpoint step it
  resumed from (the rows after a resumed checkpoint are dropped, the world rows at it
  are kept);
- the faults, each with the wall time it was injected.

A fault's window runs from its injection to the next one's. The worlds that started in
it are its restarts; its steps lost are, for each of them, the highest step rank 0
logged before that world started less the step it resumed from (at the log interval's
granularity, as the supervisor counts); its time to training again runs from the
injection to rank 0's first training line after the last of those worlds started.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TRAIN_LINE = re.compile(r"^(?:\[\d+\]<stdout>:)?\[Epoch (\d+) Batch (\d+)/(\d+)\]")
RESTART_LINE = re.compile(r"dist-lm: elastic: restart (\d+): (.*)")
LOST = re.compile(r"\((\d+) step\(s\) lost\)")


@dataclass
class Line:
    """One line of the supervisor's output (its stdout holds rank 0's), as it arrived."""

    time: float
    stream: str   # "out" or "err"
    text: str


@dataclass
class Fault:
    """One injected fault: what, where, when (wall seconds), and what was seen doing it."""

    kind: str
    node: Optional[str]
    time: float
    note: str = ""
    # Filled in by attribute():
    restarts: int = 0
    steps_lost: Optional[int] = None
    said_lost: Optional[int] = None      # what the supervisor's restart lines said
    resumed_s: Optional[float] = None    # None: no world started in its window
    survived: bool = True


def train_steps(lines: Sequence[Line], step_of: Dict[Tuple[int, int], int]) -> \
        List[Tuple[float, int]]:
    """(time, step) of rank 0's training lines. step_of maps (epoch, batch) to the
    global step (from an uninterrupted run's metrics.jsonl); epoch x NB + batch else."""
    out = []
    for line in lines:
        m = TRAIN_LINE.match(line.text) if line.stream == "out" else None
        if m:
            e, b, nb = (int(g) for g in m.groups())
            out.append((line.time, step_of.get((e, b), e * nb + b)))
    return out


def read_metrics(path: str) -> List[dict]:
    """metrics.jsonl's rows; a line that is not JSON (cut by a full disk) is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for text in fh:
                try:
                    rows.append(json.loads(text))
                except ValueError:
                    continue
    except OSError:
        pass
    return rows


def attribute(faults: List[Fault], lines: Sequence[Line], worlds: Sequence[dict],
              step_of: Dict[Tuple[int, int], int], end: float) -> None:
    """Fills in each fault's restarts, steps lost, time to training again (see the module
    docstring). worlds: metrics.jsonl's world rows; end: when the campaign stopped."""
    trained = train_steps(lines, step_of)
    starts = sorted((w["time"], int(w["step"])) for w in worlds)
    said = [(x.time, int(m.group(1)))
            for x in lines if x.stream == "err" and RESTART_LINE.search(x.text)
            for m in [LOST.search(x.text)] if m]
    for i, fault in enumerate(faults):
        until = faults[i + 1].time if i + 1 < len(faults) else end
        mine = [(t, s) for t, s in starts if fault.time <= t < until]
        fault.restarts = len(mine)
        claims = [n for t, n in said if fault.time <= t < until]
        fault.said_lost = sum(claims) if claims else None
        if not mine:
            fault.steps_lost = 0
            continue
        lost = 0
        for t, resumed in mine:
            before = [s for ts, s in trained if ts < t]
            lost += max(0, (max(before) if before else 0) - resumed)
        fault.steps_lost = lost
        after = [ts for ts, _ in trained if ts > mine[-1][0]]
        fault.resumed_s = after[0] - fault.time if after else None


def metrics_gaps(rows: Sequence[dict], expected: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(steps logged twice, steps missing) of the train rows against the train steps of
    an uninterrupted run. Lost steps are trained again and logged again, so a whole run
    has neither."""
    steps = [int(r["step"]) for r in rows if r.get("kind") == "train"]
    seen, twice = set(), []
    for s in steps:
        if s in seen:
            twice.append(s)
        seen.add(s)
    return sorted(set(twice)), sorted(set(expected) - seen)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Summary:
    faults: List[Fault]
    checks: List[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _stat(values: List[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{format(statistics.median(values), fmt)} / {format(max(values), fmt)}"


def table(summary: Summary, started: float) -> str:
    """The per-fault lines, the table by kind and the checks, as printed."""
    out = [f"{'#':>3} {'t s':>7} {'fault':<22} {'node':<6} {'restarts':>8} "
           f"{'steps lost':>10} {'(said)':>6} {'s to training':>13}  note"]
    for i, f in enumerate(summary.faults, 1):
        resumed = f"{f.resumed_s:.1f}" if f.resumed_s is not None else "-"
        said = "-" if f.said_lost is None else str(f.said_lost)
        lost = "-" if f.steps_lost is None else str(f.steps_lost)
        out.append(f"{i:>3} {f.time - started:7.1f} {f.kind:<22} {f.node or '-':<6} "
                   f"{f.restarts:>8} {lost:>10} {said:>6} {resumed:>13}  "
                   f"{'' if f.survived else 'JOB ENDED; '}{f.note}")
    out += ["", f"{'fault':<22} {'injected':>8} {'survived':>8} {'restarts':>8} "
                f"{'steps lost med / worst':>22} {'s to training med / worst':>25}"]
    kinds = sorted({f.kind for f in summary.faults})
    for kind in kinds + ["all"]:
        fs = [f for f in summary.faults if kind in ("all", f.kind)]
        lost = [float(f.steps_lost) for f in fs if f.steps_lost is not None]
        again = [f.resumed_s for f in fs if f.resumed_s is not None]
        out.append(f"{kind:<22} {len(fs):>8} {sum(f.survived for f in fs):>8} "
                   f"{sum(f.restarts for f in fs):>8} {_stat(lost, '.0f'):>22} "
                   f"{_stat(again, '.1f'):>25}")
    out.append("")
    for c in summary.checks:
        out.append(f"check {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return "\n".join(out)
