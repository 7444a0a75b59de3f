"""`dist-lm report RUN_DIR...`: curves of one or more runs as a PNG, and a text summary.

Reads each run's `metrics.jsonl` (the record rank 0 writes); no TensorBoard needed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List

from ..errors import UsageError


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir}: no metrics.jsonl (is it a dist-lm run directory?)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise UsageError(f"{path}:{number}: not a JSON line") from None
    return rows


def summarize(run_dir: str, rows: List[Dict]) -> Dict[str, float]:
    val = [r["val/ppl"] for r in rows if "val/ppl" in r]
    test = [r["test/ppl"] for r in rows if "test/ppl" in r]
    tps = [r["throughput/tokens_per_s"] for r in rows if r["kind"] == "train"]
    done = [r for r in rows if r["kind"] == "done"]
    return {"run": run_dir, "steps": max((r["step"] for r in rows), default=0),
            "best_val_ppl": min(val) if val else math.nan,
            "test_ppl": test[-1] if test else math.nan,
            "tokens_per_s": statistics.median(tps) if tps else math.nan,
            "wall_time_s": done[-1]["time/total_s"] if done else math.nan}


def plot(runs: Dict[str, List[Dict]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rows in runs.items():
        label = os.path.basename(os.path.normpath(name))
        train = [r for r in rows if r["kind"] == "train"]
        val = [r for r in rows if "val/ppl" in r]
        # A sampled-softmax run logs its own objective (train/sampled_loss), not
        # comparable with the full cross-entropy: labelled apart.
        key = "train/loss" if any("train/loss" in r for r in train) else "train/sampled_loss"
        axes[0].plot([r["tokens"] for r in train], [r.get(key, math.nan) for r in train],
                     label=label if key == "train/loss" else label + " (sampled)")
        axes[1].plot([r["tokens"] for r in val], [r["val/ppl"] for r in val], "o-",
                     label=label)
        axes[2].plot([r["step"] for r in train],
                     [r["throughput/tokens_per_s"] for r in train], label=label)
    for ax, title, xlabel in [(axes[0], "train loss", "tokens seen"),
                              (axes[1], "validation perplexity", "tokens seen"),
                              (axes[2], "throughput (tokens/s, all ranks)", "step")]:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
