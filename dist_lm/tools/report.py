"""`dist-lm report RUN_DIR...`: curves of one or more runs as a PNG, and a text summary.

Reads each run's `metrics.jsonl` (the record rank 0 writes), `config.json` and
`run.json`; no TensorBoard needed. The image states each run's model, recipe, ranks,
tokens and perplexities beside its curves, so it can be read on its own.

Which validations count: the best validation perplexity is the best of the epoch-end
validations (the ones that decide the learning rate and best.params); a validation where
--max-steps paused an epoch is information only, shown as the "paused" perplexity. A run
with no epoch end yet has no best and no test perplexity: shown as "-", not NaN.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional

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


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _epoch_end_steps(rows: List[Dict]) -> set:
    """Steps of the epoch-end validations: an `epoch` or a `test` record has the same
    step; a paused one is marked (`paused`, observe.Reporter.paused)."""
    marked = {r["step"] for r in rows if r["kind"] in ("epoch", "test")}
    return {r["step"] for r in rows if r["kind"] == "valid" and r["step"] in marked
            and not r.get("paused")}


def _paused(rows: List[Dict]) -> List[Dict]:
    """The validations where --max-steps paused an epoch (not --eval-first's baseline,
    which has no epoch)."""
    ends = _epoch_end_steps(rows)
    return [r for r in rows if r["kind"] == "valid" and "val/ppl" in r
            and (r.get("paused") or ("epoch" in r and r["step"] not in ends))]


def summarize(run_dir: str, rows: List[Dict]) -> Dict[str, object]:
    ends = _epoch_end_steps(rows)
    val = [r for r in rows if r["kind"] == "valid" and "val/ppl" in r]
    best = [r["val/ppl"] for r in val if r["step"] in ends]
    test = [r["test/ppl"] for r in rows if "test/ppl" in r]
    tps = [r["throughput/tokens_per_s"] for r in rows if r["kind"] == "train"]
    done = [r for r in rows if r["kind"] == "done"]
    worlds = [r for r in rows if r["kind"] == "world"]
    cfg = _read_json(os.path.join(run_dir, "config.json"))
    model = cfg.get("model", {})
    paused = val[-1]["val/ppl"] if val and val[-1] in _paused(rows) else None
    return {"run": run_dir, "steps": max((r["step"] for r in rows), default=0),
            "tokens": max((r["tokens"] for r in rows), default=0),
            "best_val_ppl": min(best) if best else None,
            "last_val_ppl": val[-1]["val/ppl"] if val else None,
            "paused_val_ppl": paused,
            "test_ppl": test[-1] if test else None,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "loop_s": done[-1]["time/total_s"] if done else None,
            "finished": bool(done),
            "ranks": worlds[-1]["world/ranks"] if worlds else
            _read_json(os.path.join(run_dir, "run.json")).get("ranks"),
            "model": model.get("model", "?"), "family": model.get("family", "?"),
            "sizes": "x".join(str(model.get(k, "?")) for k in
                              ("embed_size", "hidden_size", "num_layers")),
            "recipe": cfg.get("run", {}).get("recipe", "?"),
            "epochs": cfg.get("run", {}).get("epochs")}


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def describe(s: Dict[str, object]) -> str:
    """One run in two lines, for the image."""
    state = ("paused by --max-steps" if s["paused_val_ppl"] is not None else
             "finished" if s["finished"] else "stopped before its end")
    line = (f"{s['model']} ({s['family']}, emb x hid x layers {s['sizes']}), recipe "
            f"{s['recipe']}{' (' + s['family'] + ')' if s['recipe'] == 'auto' else ''}, "
            f"{s['ranks']} rank(s); {s['steps']} steps, "
            f"{s['tokens']:,} tokens, {state}\n    perplexity: best validation "
            f"{fmt(s['best_val_ppl'])}, test {fmt(s['test_ppl'])}, last validation "
            f"{fmt(s['last_val_ppl'])}")
    if s["paused_val_ppl"] is not None:
        line += " (where it paused: information only)"
    return line


def plot(runs: Dict[str, List[Dict]], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter, NullFormatter

    summaries = {name: summarize(name, rows) for name, rows in runs.items()}
    height = 4.4 + 0.4 * len(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, height))
    val_ppls: List[float] = []
    for name, rows in runs.items():
        label = os.path.basename(os.path.normpath(name))
        train = [r for r in rows if r["kind"] == "train"]
        val = [r for r in rows if "val/ppl" in r]
        val_ppls += [r["val/ppl"] for r in val]
        # A sampled-softmax run logs its own objective (train/sampled_loss), not
        # comparable with the full cross-entropy: labelled apart.
        key = "train/loss" if any("train/loss" in r for r in train) else "train/sampled_loss"
        axes[0].plot([r["tokens"] for r in train], [r.get(key, math.nan) for r in train],
                     ".-", label=label if key == "train/loss" else label + " (sampled)")
        paused = _paused(rows)
        curve = [r for r in val if r not in paused]  # the epoch ends (and --eval-first)
        color = axes[0].get_lines()[-1].get_color()
        if curve:
            axes[1].plot([r["tokens"] for r in curve], [r["val/ppl"] for r in curve], "o-",
                         color=color, label=label)
        if paused:  # information only: not part of the epoch-end curve
            axes[1].plot([r["tokens"] for r in paused], [r["val/ppl"] for r in paused], "x",
                         color=color, markersize=9, label=label + " (paused)")
        axes[2].plot([r["step"] for r in train],
                     [r["throughput/tokens_per_s"] for r in train], ".-", label=label)
    for ax, title, xlabel, ylabel in [
            (axes[0], "training loss", "training tokens seen", "mean token loss (nats)"),
            (axes[1], "validation perplexity", "training tokens seen", "perplexity"),
            (axes[2], "throughput, all ranks", "optimizer step", "tokens/s")]:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # A log scale only where perplexities span a decade or more: over a narrow range its
    # ticks would be unlabelled or crowded in scientific notation.
    if val_ppls and min(val_ppls) > 0 and max(val_ppls) / min(val_ppls) >= 10:
        axes[1].set_yscale("log")
        axes[1].yaxis.set_major_formatter(ScalarFormatter())
        axes[1].yaxis.set_minor_formatter(NullFormatter())
    lines = [f"{os.path.basename(os.path.normpath(n))}: {describe(s)}"
             for n, s in summaries.items()]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=9, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, (0.4 * len(runs) + 0.15) / height, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
