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
largest process (a rank) by then: on the big corpus with an empty corpus cache (cold)
and with the cache built (warm), and on the small corpus (warm). It is a benchmark, not
a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from .errors import UsageError
from .procs import kill_session, session_members

LINE = 100


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="where the corpora and runs go")
    p.add_argument("--tokens", type=int, default=103_000_000)
    p.add_argument("--small-tokens", type=int, default=2_000_000)
    p.add_argument("--vocab", type=int, default=267_735)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--timeout-s", type=float, default=1800.0)


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


def measure(cmd, timeout: float) -> dict:
    """Runs cmd until its first training step's log line: the seconds from launch to that
    line, and the peak resident memory (VmHWM) of its largest process, a rank; then ends
    the whole job (the rest of a run, such as its validation, is not measured)."""
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
    if first is None:
        raise UsageError(f"bench-scale: no first step from {' '.join(map(str, cmd[:3]))}...: "
                         f"{''.join(seen[-3:]).strip()}")
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
    bin_dir = os.path.dirname(sys.executable)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    print(f"{'corpus':<8} {'cache':<6} {'ranks':>5} {'launch->first step s':>21} "
          f"{'peak RSS MB':>12}", flush=True)
    for n in ranks:
        cache = os.path.join(args.dir, f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        for corpus, state in [(big, "cold"), (big, "warm"), (small, "warm")]:
            run_dir = os.path.join(args.dir, "run")
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = ["mpirun", *root, "-np", n, "-H", f"localhost:{n}", "-bind-to", "none",
                   "-x", "PATH", os.path.join(bin_dir, "dist-lm"), "train",
                   "--train-file", corpus, "--valid-file", heldout, "--test-file", heldout,
                   "--global-batch-size", "20", "--max-steps", "1", "--log-interval", "1",
                   "--context", "cpu", "--cache-dir", cache, "--run-dir", run_dir]
            result = measure(cmd, args.timeout_s)
            print(f"{os.path.basename(corpus).split('.')[0]:<8} {state:<6} {n:>5} "
                  f"{result['first_step_s']:>21.1f} {result['peak_rss_mb']:>12.0f}",
                  flush=True)
    return 0
