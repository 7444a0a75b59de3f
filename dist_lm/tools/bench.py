"""`dist-lm bench`: training throughput of the reference loop and of dist-lm, side by side.

Every variant runs in its own processes (so threads and peak memory are its own), on the
same data, model and global batch, interleaved and repeated:

    reference   the notebook's loop: zoo StandardRNN, imperative, .asscalar() per batch,
                local clip_global_norm (see reference.py); 1 process, stock process set-up
    reference-tuned  the same loop under dist-lm's process set-up (not run by default):
                separates what the loop gains from what the set-up gains
    local       dist-lm's step, 1 process, no Horovod
    hvd1        dist-lm's step, 1 Horovod rank (horovodrun --gloo)
    hvd2-gloo   dist-lm's step, 2 Horovod ranks under horovodrun --gloo, half the columns each
    hvd2-mpi    the same under mpirun
    pair2       two independent 1-rank processes of dist-lm's step, half the columns each,
                started together by mpirun but never communicating (no Horovod): the
                ceiling of any 2-rank set-up on this machine (not run by default)

Every dist-lm variant runs under `launcher_env.configure_process()` (OpenMP threads,
allocator); the reference gets only the thread count, as the notebook would.

It prints tokens/s and samples/s (min/median/max over repeats), the ratios of medians to
the reference and to `local`, achieved GFLOP/s, the median step time, peak RSS per
process, and for multi-rank variants what the gradient allreduce costs, measured two ways:

    allreduce %   1 - t(step without allreduce) / t(step): the same steps timed again with
                  the trainer's allreduce replaced by a no-op, under the same contention
                  (both ranks still computing). It is what a free allreduce would save,
                  overlap and waiting for the slower rank included.
    AR ms         the allreduce alone, back to back on the same gradient buffers with
                  nothing else running: the pure communication time per step.

It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from ..runtime.procs import kill_session

VARIANTS = ("reference", "reference-tuned", "local", "hvd1", "hvd2-gloo", "hvd2-mpi", "pair2")
DEFAULT_VARIANTS = ("reference", "local", "hvd1", "hvd2-gloo", "hvd2-mpi")


def _lstm_layers(embed: int, hidden: int, layers: int, tied: bool) -> List[Tuple[int, int]]:
    """(inputs, units) of each LSTM layer; with tied weights the last one emits `embed`."""
    last = embed if tied else hidden
    return [(embed if k == 0 else hidden, last if k == layers - 1 else hidden)
            for k in range(layers)]


def flops_per_token(embed: int, hidden: int, layers: int, vocab: int, tied: bool) -> float:
    """FLOPs of one token, forward + backward: 2 per multiply-add, backward = 2 x forward
    (input and weight gradients). Per LSTM layer 4 gates of h units over i + h inputs:
    2 * 4h(i + h); the decoder: 2 * d * V (d = its input width). Embedding lookups, the
    softmax and the element-wise gate math are left out (under 1% here)."""
    lstm = sum(8 * h * (i + h) for i, h in _lstm_layers(embed, hidden, layers, tied))
    decoder = 2 * (embed if tied else hidden) * vocab
    return 3.0 * (lstm + decoder)


def param_count(embed: int, hidden: int, layers: int, vocab: int, tied: bool) -> int:
    """Trainable parameters, i.e. gradient elements per step: embedding V x E, per LSTM
    layer 4h(i + h) weights and two 4h biases, the decoder's V biases and, untied, its
    own V x d weight. The embedding gradient is dense (MXNet's default)."""
    lstm = sum(4 * h * (i + h) + 8 * h for i, h in _lstm_layers(embed, hidden, layers, tied))
    decoder = vocab + (0 if tied else hidden * vocab)
    return vocab * embed + lstm + decoder


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-file", required=True, help="text to train on")
    p.add_argument("--model", default="standard_lstm_lm_200")
    p.add_argument("--global-batch-size", type=int, default=20,
                   help="global columns per step (2-rank variants split them)")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--fp16-allreduce", action="store_true",
                   help="Horovod variants: compress gradients to float16 for the allreduce")
    p.add_argument("--cycle-time-ms", type=float,
                   help="Horovod variants: HOROVOD_CYCLE_TIME (default: Horovod's, 1 ms)")
    p.add_argument("--fusion-threshold-mb", type=float,
                   help="Horovod variants: HOROVOD_FUSION_THRESHOLD in MiB")
    p.add_argument("--max-busy", type=float, default=0.1,
                   help="before each run, wait until at most this fraction of the CPU is busy")
    p.add_argument("--max-wait-s", type=float, default=300.0,
                   help="how long to wait for that before measuring anyway (reported)")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="a measurement that takes longer fails the bench")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--sampled-softmax", type=int, metavar="K",
                   help="train with a sampled softmax of K candidates (dist-lm variants "
                   "only; the reference has none)")
    p.add_argument("--exchange", choices=("dense", "rows"), default="dense",
                   help="how the embedding/decoder gradients travel (--exchange of train)")
    p.add_argument("--cache-dir", help="the corpus cache (as --cache-dir of train)")


# --- worker: one measurement in this process (one rank of it) -----------------------------

def worker(args: argparse.Namespace) -> None:
    import mxnet as mx

    from ..data import text as D
    from ..data.cache import CorpusCache, cache_root
    from ..config import Config, ModelConfig
    from ..runtime.dist import make_world
    from ..model import build_model
    from ..presets import PRESETS
    from ..training.stepper import Stepper, seed_everything, to_nd

    reference = args.variant.startswith("reference")
    # pair2: each of the two processes is its own world of one; only the columns split.
    pair = args.variant == "pair2"
    world = make_world("local" if reference or args.variant in ("local", "pair2")
                       else "horovod", args.fusion_threshold_mb, args.cycle_time_ms)
    seed_everything(1)
    ctx = mx.cpu()
    # The corpus cache the driver built: mapped ids, as training reads them.
    cache = CorpusCache(cache_root(args.cache_dir, args.train_file))
    vocab = cache.vocab(args.train_file, 1, None)
    parts, part = (2, int(os.environ["OMPI_COMM_WORLD_RANK"])) if pair else \
        (world.size, world.rank)
    columns = args.global_batch_size // parts
    shard = D.shard_columns(cache.ids(args.train_file, vocab), columns, part, parts,
                            args.bptt)
    batches = [(shard.batch(i % shard.num_batches)) for i in range(args.warmup + args.steps)]
    cfg = Config(model=ModelConfig(model=args.model, **PRESETS[args.model]))
    cfg.dist.fp16_allreduce = args.fp16_allreduce
    cfg.optim.sampled_softmax, cfg.dist.exchange = args.sampled_softmax, args.exchange
    grad_bytes, union_rows = 0, []
    if reference:
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
        itemsize = 2 if args.fp16_allreduce else 4  # what the allreduce moves
        grad_bytes = sum(g.size * itemsize for g in stepper.grads)
        states = model.begin_state(columns, ctx)
        losses = mx.nd.zeros((1,), ctx=ctx)

        def one(i):
            nonlocal states, losses
            loss, *_, states = stepper.step(*batches[i], states, None, i)
            losses += loss  # kept on the device, as the training loop does
            union_rows.append(getattr(stepper.trainer, "union_rows", 0))

    def timed(first: int, count: int) -> float:
        """Seconds for `count` steps, from a barrier to a barrier (the slowest rank)."""
        mx.nd.waitall()
        world.barrier()
        start = time.perf_counter()
        for i in range(first, first + count):
            one(i % len(batches))
        mx.nd.waitall()
        world.barrier()
        return time.perf_counter() - start

    timed(0, args.warmup)
    if args.profile:
        profile(timed, args, world)
    seconds = timed(args.warmup, args.steps)
    allreduce_share, allreduce_alone_s = 0.0, 0.0
    if world.size > 1:
        # The same steps with the allreduce made a no-op (the ranks' parameters drift
        # apart, which does not change the work): what a free allreduce would save.
        real = stepper.trainer._allreduce_grads
        stepper.trainer._allreduce_grads = lambda: None
        without = timed(args.warmup, args.steps)
        stepper.trainer._allreduce_grads = real
        allreduce_share = max(0.0, 1.0 - without / seconds)
        # The allreduce alone, on the same gradient buffers, as often as the timed steps.
        world.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            stepper.trainer.allreduce_grads()
        mx.nd.waitall()
        world.barrier()
        allreduce_alone_s = (time.perf_counter() - start) / args.steps
    exchange_bytes = grad_bytes
    if args.exchange == "rows" and world.size > 1:
        # Row parameters travel as the union's rows: |union| x their row widths.
        width = sum(p.data().size // p.shape[0] for p in stepper.trainer._params
                    if p.name in stepper.trainer._row_names)
        dense_rows = sum(p.data().size for p in stepper.trainer._params
                         if p.name in stepper.trainer._row_names)
        mean_union = sum(union_rows[args.warmup:]) / max(1, len(union_rows) - args.warmup)
        exchange_bytes = grad_bytes - (dense_rows - mean_union * width) * itemsize
    rss = world.allgather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 name="bench.rss")
    reported = columns if pair else args.global_batch_size  # the columns this line speaks for
    if world.is_root:
        print("BENCH " + json.dumps({
            "variant": args.variant, "ranks": parts, "seconds": seconds,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "tokens_per_s": args.steps * reported * args.bptt / seconds,
            "samples_per_s": args.steps * reported / seconds,
            "step_ms": seconds / args.steps * 1e3,
            "allreduce_share": allreduce_share, "allreduce_alone_ms": allreduce_alone_s * 1e3,
            "grad_mb": grad_bytes / 1e6, "exchange_mb": exchange_bytes / 1e6,
            "peak_rss_mb": rss, "vocab": len(vocab)}),
            flush=True)
    world.shutdown()


def profile(timed, args: argparse.Namespace, world) -> None:
    """Prints where a step's time goes: MXNet's per-operator totals over the timed steps
    (ms per step), CPU cores used and minor page faults per step. Run the worker with
    MXNET_EXEC_BULK_EXEC_TRAIN=0, or MXNet reports bulked segments instead of operators."""
    import mxnet as mx

    trace = os.path.join(tempfile.gettempdir(), f"dist-lm-profile-{os.getpid()}.json")
    mx.profiler.set_config(profile_imperative=True, profile_symbolic=True, aggregate_stats=True,
                           filename=trace)  # MXNet writes its trace there at exit
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0, wall0 = time.process_time(), time.perf_counter()
    mx.profiler.set_state("run")
    timed(args.warmup, args.steps)
    mx.profiler.set_state("stop")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    stats = json.loads(mx.profiler.dumps(format="json", reset=True))
    ops = {name: v["Total"] for name, v in stats.get("Time", {}).get("operator", {}).items()}
    if world.is_root:
        print(f"profile: {args.variant}, {os.environ.get('OMP_NUM_THREADS')} threads, "
              f"{args.global_batch_size // world.size} columns: "
              f"step {wall / args.steps * 1e3:.1f} ms, "
              f"{cpu / wall:.2f} cores busy, {faults / args.steps:.0f} minor page faults/step")
        for name, total in sorted(ops.items(), key=lambda kv: -kv[1])[:20]:
            print(f"  {total / args.steps:8.2f} ms/step  {name}")
        print(f"  {sum(ops.values()) / args.steps:8.2f} ms/step  all operators")


# --- driver: launch every variant, interleaved and repeated ------------------------------

def _command(variant: str, args: argparse.Namespace) -> List[str]:
    bin_dir = os.path.dirname(sys.executable)
    inner = [sys.executable, "-m", "dist_lm.tools.bench", "--worker", variant,
             "--train-file", args.train_file, "--model", args.model,
             "--global-batch-size", str(args.global_batch_size), "--bptt", str(args.bptt),
             "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--exchange", args.exchange]
    inner += ["--fp16-allreduce"] if args.fp16_allreduce else []
    for flag, value in (("--cycle-time-ms", args.cycle_time_ms),
                        ("--fusion-threshold-mb", args.fusion_threshold_mb),
                        ("--sampled-softmax", args.sampled_softmax),
                        ("--cache-dir", args.cache_dir)):
        inner += [flag, str(value)] if value is not None else []
    if variant.startswith("reference") or variant == "local":
        return inner
    ranks = 1 if variant == "hvd1" else 2
    if variant in ("hvd2-mpi", "pair2"):
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return [shutil.which("mpirun") or "mpirun", *root, "-np", "2", "-H", "localhost:2",
                "-bind-to", "none", "-x", "OMP_NUM_THREADS", "-x", "PATH", *inner]
    return [os.path.join(bin_dir, "horovodrun"), "-np", str(ranks), "-H",
            f"localhost:{ranks}", "--gloo", *inner]


def _cpu_jiffies():
    """(all, busy) CPU time of the machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return sum(fields), sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy (user, system, steal, ...) over `seconds`."""
    total0, busy0 = _cpu_jiffies()
    time.sleep(seconds)
    total1, busy1 = _cpu_jiffies()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_until_idle(max_busy: float, timeout_s: float) -> float:
    """Waits (up to timeout_s) until the machine is idle before a measurement, so that
    other work does not end up in the figures; returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout_s
    busy = _cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        busy = _cpu_busy(2.0)
    return busy


def _run_one(variant: str, args: argparse.Namespace, cores: int) -> Dict:
    ranks = 2 if variant.startswith("hvd2") or variant == "pair2" else 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // ranks)),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    ours0 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    total0, busy0 = _cpu_jiffies()
    # Its own session, so that a timeout also ends the ranks under mpirun/horovodrun.
    proc = subprocess.Popen(_command(variant, args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        stdout, stderr = proc.communicate()
        _fail(variant, f"no result within --timeout-s {args.timeout_s:g}", stderr)
    total1, busy1 = _cpu_jiffies()
    ours1 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    lines = [line for line in stdout.splitlines() if "BENCH " in line]
    if proc.returncode != 0 or not lines:
        _fail(variant, f"exit code {proc.returncode}", stderr)
    result = json.loads(lines[-1].split("BENCH ", 1)[1])
    if variant == "pair2":
        # Each process reports its own half; together they ran at the sum of the rates.
        both = [json.loads(line.split("BENCH ", 1)[1]) for line in lines]
        if len(both) != 2:
            _fail(variant, f"{len(both)} results instead of 2", stderr)
        for key in ("tokens_per_s", "samples_per_s"):
            result[key] = sum(b[key] for b in both)
        result["step_ms"] = max(b["step_ms"] for b in both)
        result["peak_rss_mb"] = [b["peak_rss_mb"][0] for b in both]
    # CPU the rest of the machine used while this run went on, as a share of all cores.
    hz = os.sysconf("SC_CLK_TCK")
    result["others_busy"] = max(0.0, ((busy1 - busy0) / hz - (ours1 - ours0))
                                / max(1e-9, (total1 - total0) / hz))
    return result


def _fail(variant: str, what: str, stderr: str) -> None:
    """Passes the worker's own output on (its traceback, if any), then stops the bench
    with one line that names the variant and the worker's last word."""
    from ..errors import BenchFailed

    sys.stderr.write(stderr[-4000:])
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    raise BenchFailed(f"bench: {variant} failed ({what})" + (f": {last}" if last else ""))


def run(args: argparse.Namespace) -> int:
    from ..data import text as D
    from ..errors import UsageError
    from ..presets import PRESETS

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UsageError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if args.model not in PRESETS or PRESETS[args.model]["family"] != "standard":
        raise UsageError("bench compares against the zoo StandardRNN: use a standard_lstm_lm_*")
    if args.global_batch_size < 2 or args.global_batch_size % 2:
        raise UsageError("--global-batch-size must be even and positive (2-rank variants "
                         "split it)")
    for flag, value, least in (("--bptt", args.bptt, 1), ("--steps", args.steps, 1),
                               ("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.max_busy <= 1:
        raise UsageError(f"--max-busy is a fraction of the CPU, 0 to 1, got {args.max_busy}")
    if args.timeout_s <= 0 or args.max_wait_s < 0:
        raise UsageError("--timeout-s must be positive and --max-wait-s not negative")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        # Checked now, not after an hour of measuring.
        raise UsageError(f"--json {args.json}: its directory does not exist")
    if args.sampled_softmax is not None:
        if args.sampled_softmax < 1:  # before the corpus cache is built, not after
            raise UsageError(f"--sampled-softmax must be at least 1, got "
                             f"{args.sampled_softmax}")
        if any(v.startswith("reference") for v in variants):
            raise UsageError("--sampled-softmax: the reference variants have no sampled "
                             "softmax; choose dist-lm variants with --variants")
    if args.exchange == "rows" and args.sampled_softmax is None:
        raise UsageError("--exchange rows needs --sampled-softmax")
    # The workers' own checks, made once here so that bad data stops the bench at once;
    # this also builds the corpus cache the workers map.
    from ..data.cache import CorpusCache, cache_root
    from ..training.sampling import check_num_sampled

    cache = CorpusCache(cache_root(args.cache_dir, args.train_file))
    vocab = cache.vocab(args.train_file, 1, None)
    if args.sampled_softmax is not None:
        check_num_sampled(args.sampled_softmax, len(vocab))
    ids = cache.ids(args.train_file, vocab)
    D.shard_columns(ids, args.global_batch_size, 0, 1, args.bptt, what=args.train_file)
    cores = len(os.sched_getaffinity(0))
    load_at_start = os.getloadavg()[0]
    results: Dict[str, List[Dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            busy = wait_until_idle(args.max_busy, args.max_wait_s)
            r = _run_one(variant, args, cores)
            r["busy_before"] = busy
            results[variant].append(r)
            print(f"  repeat {repeat + 1}/{args.repeats} {variant:<15} "
                  f"{r['tokens_per_s']:9.0f} tokens/s", file=sys.stderr, flush=True)
    m = PRESETS[args.model]
    vocab = results[variants[0]][0]["vocab"]
    # A sampled softmax scores 1 + K classes per token instead of V.
    scored = vocab if args.sampled_softmax is None else args.sampled_softmax + 1
    flops = flops_per_token(m["embed_size"], m["hidden_size"], m["num_layers"], scored,
                            m["tie_weights"])
    softmax = "full softmax" if args.sampled_softmax is None else \
        f"sampled softmax K={args.sampled_softmax}, exchange {args.exchange}"
    print(f"dist-lm bench: {args.model}, vocab {vocab}, {softmax}, global batch "
          f"{args.global_batch_size} x bptt {args.bptt}, {args.steps} timed steps after "
          f"{args.warmup}, {args.repeats} repeats, {cores} cores, {flops / 1e6:.1f} "
          f"MFLOP/token, 1-min load at start {load_at_start:.2f}")
    print(f"{'variant':<15} {'ranks':>5} {'thr':>3} {'tokens/s min/med/max':>24} "
          f"{'samples/s':>9} {'x ref':>6} {'x local':>7} {'GFLOP/s':>7} {'step ms':>7} "
          f"{'allreduce':>9} {'AR ms':>6} {'peak MB/proc':>12}")
    med_of = {v: statistics.median(r["tokens_per_s"] for r in results[v]) for v in variants}
    ref_med, local_med = med_of.get("reference"), med_of.get("local")
    summary = {}
    for variant in variants:
        rs = results[variant]
        tps = sorted(r["tokens_per_s"] for r in rs)
        med = med_of[variant]
        sps = statistics.median(r["samples_per_s"] for r in rs)
        step_ms = statistics.median(r["step_ms"] for r in rs)
        share = statistics.median(r["allreduce_share"] for r in rs)
        alone = statistics.median(r["allreduce_alone_ms"] for r in rs)
        mem = max(max(r["peak_rss_mb"]) for r in rs)
        multi = rs[0]["ranks"] > 1 and variant != "pair2"  # pair2 has no allreduce
        x_ref = f"{med / ref_med:6.2f}" if ref_med else f"{'-':>6}"
        x_local = f"{med / local_med:7.2f}" if local_med else f"{'-':>7}"
        share_s = f"{share * 100:8.1f}%" if multi else f"{'-':>9}"
        alone_s = f"{alone:6.1f}" if multi else f"{'-':>6}"
        print(f"{variant:<15} {rs[0]['ranks']:>5} {rs[0]['threads']:>3} "
              f"{tps[0]:7.0f}/{med:7.0f}/{tps[-1]:7.0f} {sps:9.1f} {x_ref} {x_local} "
              f"{med * flops / 1e9:7.1f} {step_ms:7.1f} {share_s} {alone_s} {mem:12.0f}")
        summary[variant] = {"tokens_per_s": tps, "median_tokens_per_s": med,
                            "median_samples_per_s": sps, "median_step_ms": step_ms,
                            "allreduce_share": share, "allreduce_alone_ms": alone,
                            "grad_mb": rs[0]["grad_mb"], "peak_rss_mb": mem,
                            "exchange_mb": statistics.median(r["exchange_mb"] for r in rs),
                            "ranks": rs[0]["ranks"], "threads": rs[0]["threads"]}
    before = max(r["busy_before"] for rs in results.values() for r in rs)
    during = max(r["others_busy"] for rs in results.values() for r in rs)
    print(f"other load: CPU busy before a run at most {before * 100:.0f}%, CPU used by other "
          f"processes during a run at most {during * 100:.0f}% of the cores"
          + ("" if max(before, during) <= args.max_busy else " (figures measured under load)"))
    grad_mb = max(r[0]["grad_mb"] for r in results.values())
    if any(r[0]["ranks"] > 1 for v, r in results.items() if v != "pair2"):
        sent = max(r["exchange_mb"] for v, rs in results.items() for r in rs
                   if rs[0]["ranks"] > 1 and v != "pair2")
        print(f"allreduce: {grad_mb:.1f} MB of gradients per step, {sent:.1f} MB exchanged "
              f"per step; 'allreduce' = 1 - step time with the allreduce made a no-op / "
              f"step time; 'AR ms' = the allreduce alone")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": summary}, fh, indent=2)
    return 0


if __name__ == "__main__":
    from ..runtime.launcher_env import configure_process, configure_threads

    # Before MXNet loads. The reference runs as the notebook would: threads only.
    variant = sys.argv[sys.argv.index("--worker") + 1] if "--worker" in sys.argv else ""
    if variant == "reference":
        configure_threads()
    else:
        configure_process()
    parser = argparse.ArgumentParser(prog="dist_lm.tools.bench")
    parser.add_argument("--worker", choices=VARIANTS, dest="variant", required=True)
    parser.add_argument("--profile", action="store_true",
                        help="print per-operator times of the timed steps first")
    add_args(parser)
    worker(parser.parse_args())
