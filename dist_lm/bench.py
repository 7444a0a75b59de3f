"""`dist-lm bench`: training throughput of the reference loop and of dist-lm, side by side.

Every variant runs in its own processes (so threads and peak memory are its own), on the
same data, model and global batch, interleaved and repeated:

    reference   the notebook's loop: zoo StandardRNN, imperative, .asscalar() per batch,
                local clip_global_norm (see reference.py); 1 process
    local       dist-lm's step, 1 process, no Horovod
    hvd1        dist-lm's step, 1 Horovod rank (horovodrun --gloo)
    hvd2-gloo   dist-lm's step, 2 Horovod ranks under horovodrun --gloo, half the columns each
    hvd2-mpi    the same under mpirun

It prints tokens/s and samples/s (min/median/max over repeats), the ratio of medians to
the reference, achieved GFLOP/s, peak RSS per process, and for multi-rank variants the
share of the step spent in the gradient allreduce. It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

VARIANTS = ("reference", "local", "hvd1", "hvd2-gloo", "hvd2-mpi")


def flops_per_token(embed: int, hidden: int, layers: int, vocab: int, tied: bool) -> float:
    """Multiply-adds x 2 of one token, forward + backward (backward ~ 2x forward)."""
    last = embed if tied else hidden
    lstm = sum(8 * h * (i + h) for i, h in
               ((embed if l == 0 else hidden, last if l == layers - 1 else hidden)
                for l in range(layers)))
    decoder = 2 * last * vocab
    return 3.0 * (lstm + decoder)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-file", required=True, help="text to train on")
    p.add_argument("--model", default="standard_lstm_lm_200")
    p.add_argument("--batch-size", type=int, default=20, help="global columns per step")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--json", help="also write the results here")


# --- worker: one measurement in this process (one rank of it) -----------------------------

def worker(args: argparse.Namespace) -> None:
    import resource

    import mxnet as mx

    from . import data as D
    from .config import Config, ModelConfig
    from .dist import make_world
    from .model import PRESETS, build_model
    from .train import Stepper, seed_everything, to_nd

    world = make_world("local" if args.variant in ("reference", "local") else "horovod")
    seed_everything(1)
    ctx = mx.cpu()
    tokens = D.read_tokens(args.train_file)
    vocab = D.build_vocab(tokens)
    columns = args.batch_size // world.size
    shard = D.shard_columns(D.encode(tokens, vocab), columns, world.rank, world.size,
                            args.bptt)
    batches = [(shard.batch(i % shard.num_batches)) for i in range(args.warmup + args.steps)]
    cfg = Config(model=ModelConfig(model=args.model, **PRESETS[args.model]))
    if args.variant == "reference":
        from .reference import ReferenceStepper
        ref = ReferenceStepper(args.model, vocab, cfg.optim.lr, cfg.optim.clip, ctx)
        states = ref.begin_state(columns)

        def one(i):
            nonlocal states
            _, states = ref.step(to_nd(batches[i][0], ctx), to_nd(batches[i][1], ctx), states)
    else:
        model = build_model(cfg.model, len(vocab))
        model.initialize(mx.init.Xavier(), ctx=ctx)
        world.broadcast_params(model.collect_params())
        stepper = Stepper(model, cfg, world, ctx)
        states = model.begin_state(columns, ctx)
        losses = mx.nd.zeros((1,), ctx=ctx)

        def one(i):
            nonlocal states, losses
            loss, _, states = stepper.step(*batches[i], states)
            losses += loss  # kept on the device, as the training loop does
    for i in range(args.warmup):
        one(i)
    mx.nd.waitall()
    world.barrier()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        one(i)
    mx.nd.waitall()
    world.barrier()
    seconds = time.perf_counter() - start
    allreduce_s = 0.0
    if world.size > 1:
        # The allreduce alone, on the same gradient buffers, as often as the timed steps.
        start_ar = time.perf_counter()
        for _ in range(args.steps):
            stepper.trainer.allreduce_grads()
        mx.nd.waitall()
        allreduce_s = time.perf_counter() - start_ar
    rss = world.allgather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 name="bench.rss")
    if world.is_root:
        print("BENCH " + json.dumps({
            "variant": args.variant, "ranks": world.size, "seconds": seconds,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "tokens_per_s": args.steps * args.batch_size * args.bptt / seconds,
            "samples_per_s": args.steps * args.batch_size / seconds,
            "allreduce_share": allreduce_s / seconds, "peak_rss_mb": rss,
            "vocab": len(vocab)}), flush=True)
    world.shutdown()


# --- driver: launch every variant, interleaved and repeated ------------------------------

def _command(variant: str, args: argparse.Namespace) -> List[str]:
    bin_dir = os.path.dirname(sys.executable)
    inner = [sys.executable, "-m", "dist_lm.bench", "--worker", variant,
             "--train-file", args.train_file, "--model", args.model,
             "--batch-size", str(args.batch_size), "--bptt", str(args.bptt),
             "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if variant in ("reference", "local"):
        return inner
    ranks = 1 if variant == "hvd1" else 2
    if variant == "hvd2-mpi":
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [shutil.which("mpirun") or "mpirun", *root, "-np", "2", "-H", "localhost:2",
                "-bind-to", "none", "-x", "OMP_NUM_THREADS", "-x", "PATH", *inner]
    return [os.path.join(bin_dir, "horovodrun"), "-np", str(ranks), "-H",
            f"localhost:{ranks}", "--gloo", *inner]


def _run_one(variant: str, args: argparse.Namespace, cores: int) -> Dict:
    ranks = 2 if variant.startswith("hvd2") else 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // ranks)),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(_command(variant, args), capture_output=True, text=True, env=env,
                          timeout=1800)
    lines = [l for l in proc.stdout.splitlines() if "BENCH " in l]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1].split("BENCH ", 1)[1])


def run(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .model import PRESETS

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UsageError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if args.model not in PRESETS or PRESETS[args.model]["family"] != "standard":
        raise UsageError("bench compares against the zoo StandardRNN: use a standard_lstm_lm_*")
    if args.batch_size % 2:
        raise UsageError("--batch-size must be even (2-rank variants split it)")
    if not os.path.isfile(args.train_file):
        raise UsageError(f"--train-file {args.train_file}: no such file")
    cores = len(os.sched_getaffinity(0))
    results: Dict[str, List[Dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            r = _run_one(variant, args, cores)
            results[variant].append(r)
            print(f"  repeat {repeat + 1}/{args.repeats} {variant:<10} "
                  f"{r['tokens_per_s']:9.0f} tokens/s", file=sys.stderr, flush=True)
    m = PRESETS[args.model]
    vocab = results[variants[0]][0]["vocab"]
    flops = flops_per_token(m["embed_size"], m["hidden_size"], m["num_layers"], vocab,
                            m["tie_weights"])
    print(f"dist-lm bench: {args.model}, vocab {vocab}, global batch {args.batch_size} x bptt "
          f"{args.bptt}, {args.steps} timed steps after {args.warmup}, {args.repeats} "
          f"repeats, {cores} cores, {flops / 1e6:.1f} MFLOP/token")
    header = (f"{'variant':<10} {'ranks':>5} {'thr':>4} {'tokens/s min/med/max':>26} "
              f"{'samples/s med':>14} {'x ref':>6} {'GFLOP/s':>8} {'allreduce':>9} "
              f"{'peak MB/proc':>13}")
    print(header)
    ref = results.get("reference")
    ref_med = statistics.median(r["tokens_per_s"] for r in ref) if ref else None
    summary = {}
    for variant in variants:
        rs = results[variant]
        tps = sorted(r["tokens_per_s"] for r in rs)
        med = statistics.median(tps)
        sps = statistics.median(r["samples_per_s"] for r in rs)
        share = statistics.median(r["allreduce_share"] for r in rs)
        mem = max(max(r["peak_rss_mb"]) for r in rs)
        ratio = f"{med / ref_med:6.2f}" if ref_med else "     -"
        print(f"{variant:<10} {rs[0]['ranks']:>5} {rs[0]['threads']:>4} "
              f"{tps[0]:8.0f}/{med:8.0f}/{tps[-1]:8.0f} {sps:14.1f} {ratio} "
              f"{med * flops / 1e9:8.2f} {share * 100 if rs[0]['ranks'] > 1 else 0:8.1f}% "
              f"{mem:13.0f}")
        summary[variant] = {"tokens_per_s": tps, "median_tokens_per_s": med,
                            "median_samples_per_s": sps, "allreduce_share": share,
                            "peak_rss_mb": mem, "ranks": rs[0]["ranks"],
                            "threads": rs[0]["threads"]}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": summary}, fh, indent=2)
    return 0


if __name__ == "__main__":
    from .launcher_env import configure_threads

    configure_threads()
    parser = argparse.ArgumentParser(prog="dist_lm.bench")
    parser.add_argument("--worker", choices=VARIANTS, dest="variant", required=True)
    add_args(parser)
    worker(parser.parse_args())
