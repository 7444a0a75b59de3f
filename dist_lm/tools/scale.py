"""`dist-lm bench-scale`: start-up and memory at WikiText-103 size, on synthetic corpora.

It writes, once and deterministically (seed 1), into DIR:

    big.tokens     --tokens tokens (103M by default, <eos> included) over a --vocab word
                   vocabulary (267,735 by default): every word once, 100 to a line, then
                   lines of 100 words drawn from a Zipf distribution (p(k) ~ 1/k)
    small.tokens   the first --small-tokens of it (2M) plus every word once more: the
                   same vocabulary at a fiftieth of the size
    heldout.tokens every word once and 50,000 tokens, for validation and test

and runs `dist-lm train` (standard_lstm_lm_200, full softmax, global batch 20 x 35) under
mpirun at each rank count until its first training step, printing for each run the wall
time from launch to that step's log line and the peak resident memory (VmHWM) of the
largest process (a rank) by then: on each corpus with an empty corpus cache (cold) and
with the cache built (warm); each run's output goes to DIR/startup-*.log. A cold start
builds the cache in worker processes (one per
core) that are not ranks; their peak is not in the figure.

Then, at the corpus's vocabulary (267,735 by default), on the small corpus:

- where one rank's memory goes (`--columns` columns, default 10, i.e. 2 ranks sharing
  the global batch of 20): resident memory after each stage of one process (model
  parameters and gradients, the first and second training step, the first evaluation
  batch), with the full softmax and with `--sampled-softmax K`, next to the sizes the
  shapes imply;
- training throughput, full against sampled softmax, as `dist-lm bench` measures it (1
  process and 2 ranks under mpirun), and the sampled softmax with the touched-rows
  gradient exchange (`--exchange rows`); with the gradient bytes each step exchanges.

It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from ..errors import UsageError
from ..runtime.procs import kill_session, session_members

LINE = 100


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="where the corpora and runs go")
    p.add_argument("--tokens", type=int, default=103_000_000)
    p.add_argument("--small-tokens", type=int, default=2_000_000)
    p.add_argument("--vocab", type=int, default=267_735)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--sampled-softmax", type=int, default=4096, metavar="K",
                   help="candidates of the sampled-softmax runs")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per throughput measurement (the full softmax: a "
                   "quarter of them)")
    p.add_argument("--columns", type=int, default=10,
                   help="columns of one rank in the memory breakdown")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: "
                   "startup, memory, throughput")


def word(i: int) -> str:
    return f"w{i}"


def synthesize(path: str, tokens: int, vocab: int, seed: int = 1) -> None:
    """Writes the corpus to path atomically: every word once, then Zipf lines."""
    rng = np.random.default_rng(seed)
    words = np.array([word(i) for i in range(vocab)], dtype=object)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    tmp = path + ".tmp"
    written = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, vocab, LINE):
            out.write(" ".join(words[start:start + LINE]) + "\n")
            written += min(LINE, vocab - start) + 1
        lines_left = max(0, tokens - written) // (LINE + 1)
        while lines_left:
            n = min(lines_left, 10_000)
            for row in rng.choice(vocab, size=(n, LINE), p=p):
                out.write(" ".join(words[row]) + "\n")
            lines_left -= n
    os.replace(tmp, path)


def prefix_with_every_word(src: str, dst: str, tokens: int, vocab: int) -> None:
    """The first `tokens` tokens of src (whole lines), then every word once more."""
    with open(src, encoding="utf-8") as fh, open(dst + ".tmp", "w", encoding="utf-8") as out:
        count = 0
        for line in fh:
            if count >= tokens:
                break
            out.write(line)
            count += len(line.split()) + 1
        for start in range(0, vocab, LINE):
            out.write(" ".join(word(i) for i in range(start, min(vocab, start + LINE))) + "\n")
    os.replace(dst + ".tmp", dst)


def measure(cmd, timeout: float, log: str) -> dict:
    """Runs cmd until its first training step's log line: the seconds from launch to that
    line, and the peak resident memory (VmHWM) of its largest process, a rank; then ends
    the whole job (the rest of a run, such as its validation, is not measured). The job's
    output until then is written to the file log."""
    start = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first, seen = None, []
    try:
        deadline = start + timeout
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\[Epoch 0 Batch 1/", line):
                first = time.time() - start
                break
            if time.time() > deadline:
                break
        peak = max((_peak_rss_mb(pid) for pid in session_members(proc.pid) or []),
                   default=0.0)
    finally:
        kill_session(proc.pid)
        proc.wait()
        with open(log, "w", encoding="utf-8") as fh:
            fh.writelines(seen)
    if first is None:
        raise UsageError(f"bench-scale: no first step from {' '.join(map(str, cmd[:3]))}... "
                         f"(its output: {log})")
    return {"first_step_s": first, "peak_rss_mb": peak}


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(args: argparse.Namespace) -> int:
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if not ranks or min(ranks) < 1 or args.tokens < 2 * args.vocab or args.vocab < 2:
        raise UsageError("bench-scale: --ranks must be positive and --tokens at least "
                         "twice --vocab")
    if not 0 < args.sampled_softmax <= args.vocab // 2 or args.steps < 1 or \
            args.columns < 1:
        raise UsageError("bench-scale: --sampled-softmax must be between 1 and half of "
                         "--vocab, --steps and --columns positive")
    os.makedirs(args.dir, exist_ok=True)
    big, small = os.path.join(args.dir, "big.tokens"), os.path.join(args.dir, "small.tokens")
    heldout = os.path.join(args.dir, "heldout.tokens")
    t = time.time()
    if not os.path.exists(big):
        synthesize(big, args.tokens, args.vocab)
        prefix_with_every_word(big, small, args.small_tokens, args.vocab)
        synthesize(heldout, 50_000, args.vocab, seed=2)
        print(f"bench-scale: wrote the corpora in {time.time() - t:.0f}s "
              f"({os.path.getsize(big) / 2 ** 20:.0f} MB)", flush=True)
    skip = set(args.skip.split(","))
    if "startup" not in skip:
        startup(args, ranks, big, small, heldout)
    if "memory" not in skip:
        memory(args, small)
    if "throughput" not in skip:
        throughput(args, small)
    return 0


def startup(args, ranks, big, small, heldout) -> None:
    bin_dir = os.path.dirname(sys.executable)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    print(f"{'corpus':<8} {'cache':<6} {'ranks':>5} {'launch->first step s':>21} "
          f"{'peak RSS MB':>12}", flush=True)
    for n in ranks:
        cache = os.path.join(args.dir, f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        for corpus, state in [(big, "cold"), (big, "warm"), (small, "cold"),
                              (small, "warm")]:
            run_dir = os.path.join(args.dir, "run")
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = ["mpirun", *root, "-np", n, "-H", f"localhost:{n}", "-bind-to", "none",
                   "-x", "PATH", os.path.join(bin_dir, "dist-lm"), "train",
                   "--train-file", corpus, "--valid-file", heldout, "--test-file", heldout,
                   "--global-batch-size", "20", "--max-steps", "1", "--log-interval", "1",
                   "--context", "cpu", "--cache-dir", cache, "--run-dir", run_dir]
            name = os.path.basename(corpus).split('.')[0]
            result = measure(cmd, args.timeout_s,
                             os.path.join(args.dir, f"startup-{name}-{state}-{n}.log"))
            print(f"{name:<8} {state:<6} {n:>5} "
                  f"{result['first_step_s']:>21.1f} {result['peak_rss_mb']:>12.0f}",
                  flush=True)


# --- where a rank's memory goes ----------------------------------------------------------

STAGES = ("start", "model", "step 1", "step 2", "eval batch")


def memory(args, corpus: str) -> None:
    """Runs the memory worker once per softmax and prints its stages side by side."""
    runs = {}
    for k in (None, args.sampled_softmax):
        cmd = [sys.executable, "-m", "dist_lm.tools.scale", "--memory-worker", "--vocab",
               str(args.vocab), "--columns", str(args.columns)]
        cmd += ["--sampled-softmax", str(k)] if k else []
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
        lines = [x for x in done.stdout.splitlines() if x.startswith("MEMORY ")]
        if done.returncode != 0 or not lines:
            raise UsageError(f"bench-scale: the memory worker failed: "
                             f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        runs["full" if k is None else f"sampled {k}"] = json.loads(lines[-1][7:])
    full = runs["full"]
    print(f"\nmemory of one rank, vocab {args.vocab}, {args.columns} columns x bptt 35 "
          f"(standard_lstm_lm_200): resident MB after each stage (increase)", flush=True)
    print(f"{'stage':<12}" + "".join(f"{name:>22}" for name in runs))
    for stage in STAGES:
        cells = []
        for r in runs.values():
            i = STAGES.index(stage)
            delta = r["rss"][i] - (r["rss"][i - 1] if i else 0)
            cells.append(f"{r['rss'][i]:>12.0f} ({delta:+7.0f})")
        print(f"{stage:<12}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'peak':<12}" + "".join(f"{r['peak']:>22.0f}" for r in runs.values()))
    for name, mb in full["sizes"].items():
        print(f"  {name}: {mb:.0f} MB")
    for name, r in runs.items():
        if name != "full":
            for what, mb in r["sizes"].items():
                if what.startswith("logits"):
                    print(f"  {what} ({name}): {mb:.1f} MB")


def memory_worker(vocab: int, columns: int, k: Optional[int]) -> None:
    """One process, no data: random ids at the given vocabulary. Prints MEMORY {json}."""
    import mxnet as mx

    from ..config import Config, ModelConfig
    from ..runtime.dist import LocalWorld
    from ..model import build_model
    from ..presets import PRESETS
    from ..training.stepper import Stepper, hybrid_loss, seed_everything, to_nd

    bptt, rss = 35, [_rss_mb()]
    seed_everything(1)
    cfg = Config(model=ModelConfig(model="standard_lstm_lm_200",
                                   **PRESETS["standard_lstm_lm_200"]))
    cfg.optim.sampled_softmax = k
    ctx = mx.cpu()
    model = build_model(cfg.model, vocab)
    model.initialize(mx.init.Xavier(), ctx=ctx)
    stepper = Stepper(model, cfg, LocalWorld(), ctx)
    mx.nd.waitall()
    rss.append(_rss_mb())
    rng = np.random.default_rng(0)
    states = model.begin_state(columns, ctx)
    for step in range(2):
        inputs, targets = (rng.integers(0, vocab, size=(bptt, columns)) for _ in range(2))
        loss, _, _, states = stepper.step(inputs, targets, states, None, step)
        loss.wait_to_read()
        rss.append(_rss_mb())
    block = hybrid_loss(model)
    states = model.begin_state(columns, ctx)
    block(to_nd(inputs, ctx), to_nd(targets, ctx), states)[0].wait_to_read()
    rss.append(_rss_mb())
    params = sum(p.data().size for p in model.collect_params().values()) * 4 / 2 ** 20
    scored = vocab if k is None else k + 1
    sizes = {"parameters": params, "gradients": params,
             f"logits (T x b x {scored}) and their gradient":
                 2 * bptt * columns * scored * 4 / 2 ** 20}
    print("MEMORY " + json.dumps({"rss": rss, "peak": _peak_rss_mb(os.getpid()),
                                  "sizes": sizes}), flush=True)


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# --- throughput, full against sampled softmax --------------------------------------------

def throughput(args, corpus: str) -> None:
    """`dist-lm bench` (1 process and 2 ranks under mpirun) with each softmax."""
    from . import bench

    parser = argparse.ArgumentParser()
    bench.add_args(parser)
    cache = os.path.join(args.dir, "cache-1")
    summary = {}
    for name, extra, variants, steps in [
            ("full", [], "local,hvd2-mpi", max(2, args.steps // 4)),
            ("sampled", ["--sampled-softmax", str(args.sampled_softmax)], "local,hvd2-mpi",
             args.steps),
            ("sampled+rows", ["--sampled-softmax", str(args.sampled_softmax), "--exchange",
                              "rows"], "hvd2-mpi", args.steps)]:
        out = os.path.join(args.dir, f"bench-{name}.json")
        print(f"\nthroughput, {name}:", flush=True)
        bench.run(parser.parse_args([
            "--train-file", corpus, "--cache-dir", cache, "--variants", variants,
            "--steps", str(steps), "--warmup", "2", "--repeats", "1", "--max-busy", "1",
            "--json", out, *extra]))
        with open(out, encoding="utf-8") as fh:
            summary[name] = json.load(fh)["results"]
    print("\nsampled against full softmax (same model, global batch 20 x 35):")
    for variant in ("local", "hvd2-mpi"):
        full, sampled = summary["full"][variant], summary["sampled"][variant]
        print(f"  {variant:<9} tokens/s {full['median_tokens_per_s']:7.0f} -> "
              f"{sampled['median_tokens_per_s']:7.0f} "
              f"({sampled['median_tokens_per_s'] / full['median_tokens_per_s']:.1f}x); "
              f"peak MB per process {full['peak_rss_mb']:.0f} -> {sampled['peak_rss_mb']:.0f}")
    rows = summary["sampled+rows"]["hvd2-mpi"]
    dense = summary["sampled"]["hvd2-mpi"]
    print(f"  exchange  dense {dense['exchange_mb']:.1f} MB/step (allreduce alone "
          f"{dense['allreduce_alone_ms']:.1f} ms), rows {rows['exchange_mb']:.1f} MB/step "
          f"({rows['allreduce_alone_ms']:.1f} ms); tokens/s "
          f"{dense['median_tokens_per_s']:.0f} -> {rows['median_tokens_per_s']:.0f}")


if __name__ == "__main__":
    from ..runtime.launcher_env import configure_process

    configure_process()
    parser = argparse.ArgumentParser(prog="dist_lm.tools.scale")
    parser.add_argument("--memory-worker", action="store_true", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--columns", type=int, required=True)
    parser.add_argument("--sampled-softmax", type=int)
    worker_args = parser.parse_args()
    memory_worker(worker_args.vocab, worker_args.columns, worker_args.sampled_softmax)
