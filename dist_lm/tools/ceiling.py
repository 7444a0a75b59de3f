"""`dist-lm bench-ceiling`: the machine's GEMM rate on the decoder's shapes, and the job's
FLOP rate as a share of it.

Most of a step's FLOPs are the decoder's three matrix products (bench.flops_per_token):
with M = bptt x columns tokens, H the decoder's input width and V the vocabulary,

    forward          logits = X W^T       (M x H)(H x V)
    weight gradient  dW = dY^T X          (V x M)(M x H)
    input gradient   dX = dY W            (M x V)(V x H)

2 M H V FLOPs each. They are timed here, in this process (its threads set up as every
dist-lm process's, launcher_env.configure_process: as the `local` variant's), through
MXNet's `dot` (MXNet's BLAS), MXNet's `FullyConnected` (the operator the decoder runs:
oneDNN on CPU, its backward computes both gradients in one call) and numpy (numpy's
BLAS). The ceiling is the best of the three rates over all three products: what a step
would reach if all of its FLOPs ran as fast as the decoder's products can here.

The job's rate is tokens/s x FLOPs per token, from short training runs of bench's
`local` (dist-lm's step, 1 process) and `reference` (the notebook's loop) variants in
their own processes, or from the figures of a `dist-lm bench --json` file.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

PRODUCTS = ("forward", "weight gradient", "input gradient")
PATHS = ("MXNet dot", "MXNet FullyConnected", "numpy")
ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
               "OPENBLAS_L2_SIZE", "MKL_NUM_THREADS")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-file", required=True, help="text to train on (its vocabulary "
                   "is V)")
    p.add_argument("--model", default="standard_lstm_lm_200",
                   help="a standard_lstm_lm_* preset (bench's variants run it)")
    p.add_argument("--global-batch-size", type=int, default=20, help="columns per step")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--calls", type=int, default=10, help="GEMM calls per timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="timings of each product, and runs of each training variant "
                   "(medians)")
    p.add_argument("--variants", default="local,reference",
                   help="training variants whose rate is compared (bench's names; empty: "
                   "none)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per training run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--bench-json", metavar="FILE",
                   help="take the variants' tokens/s from this `dist-lm bench --json` file "
                   "instead of running them")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="a training run that takes longer fails the command")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cache-dir", help="the corpus cache (as --cache-dir of train)")


def check(args: argparse.Namespace) -> List[str]:
    """The command line's own errors, before anything is measured; returns the variants."""
    from ..errors import UsageError
    from ..presets import PRESETS
    from .bench import VARIANTS

    if args.model not in PRESETS or PRESETS[args.model]["family"] != "standard":
        raise UsageError(f"--model {args.model}: use a standard_lstm_lm_* preset (bench's "
                         f"variants run them)")
    for flag, value in (("--global-batch-size", args.global_batch_size),
                        ("--bptt", args.bptt), ("--calls", args.calls),
                        ("--repeats", args.repeats), ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be at least 0, got {args.warmup}")
    if args.timeout_s <= 0:
        raise UsageError("--timeout-s must be positive")
    variants = [v for v in args.variants.split(",") if v]
    wrong = [v for v in variants if v not in ("local", "reference", "reference-tuned", "hvd1")]
    if wrong:
        raise UsageError(f"--variants: {', '.join(wrong)} cannot be compared here; choose "
                         f"from local, reference, reference-tuned, hvd1 (of {', '.join(VARIANTS)})")
    if not os.path.isfile(args.train_file):
        raise UsageError(f"--train-file {args.train_file}: no such file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json}: its directory does not exist")
    return variants


# --- the libraries ----------------------------------------------------------------------

def openblas_builds() -> Dict[str, dict]:
    """Every OpenBLAS loaded in this process, by path: its build string, the kernels it
    chose for this processor (core) and its thread count, as the library reports them."""
    found = {}
    with open("/proc/self/maps", encoding="utf-8") as fh:
        paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower()
                        and "/" in line})
    for path in paths:
        lib = ctypes.CDLL(path)
        for suffix in ("", "64_"):  # numpy's wheels carry the 64-bit-integer build
            try:
                config = getattr(lib, f"openblas_get_config{suffix}")
                core = getattr(lib, f"openblas_get_corename{suffix}")
                threads = getattr(lib, f"openblas_get_num_threads{suffix}")
            except AttributeError:
                continue
            config.restype = core.restype = ctypes.c_char_p
            found[path] = {"build": config().decode().strip(), "core": core().decode(),
                           "threads": threads()}
            break
    return found


def libraries() -> dict:
    """Which BLAS each library uses here: MXNet's build features and numpy's build
    information, with the loaded OpenBLAS builds matched to them by path."""
    import mxnet as mx
    import numpy as np

    features = [f.name for f in mx.runtime.Features().values() if f.enabled]
    builds = openblas_builds()
    mx_dir = os.path.dirname(os.path.abspath(mx.__file__))
    np_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))

    def under(directory: str, prefix: str) -> Optional[dict]:
        return next((dict(b, path=p) for p, b in builds.items()
                     if os.path.abspath(p).startswith(os.path.join(directory, prefix))), None)

    np_blas: List[str] = []
    try:  # numpy < 1.25's build information (later versions: show_config(mode="dicts"))
        from numpy import __config__ as np_config
        for name in dir(np_config):
            if name.endswith("_info") and "blas" in name and "lapack" not in name:
                for lib in np_config.get_info(name[:-5]).get("libraries", []):
                    np_blas += [] if lib in np_blas else [lib]
    except (ImportError, AttributeError):
        pass
    return {
        "mxnet": {"version": mx.__version__,
                  "blas": [f for f in features if f.startswith("BLAS_")],
                  "onednn": "MKLDNN" in features,
                  "openblas": under(mx_dir, "")},
        "numpy": {"version": np.__version__, "blas": np_blas,
                  "openblas": under(np_dir, "numpy")},
        "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
    }


# --- the products ------------------------------------------------------------------------

def median_rate(fn: Callable[[], None], flops: float, calls: int, repeats: int) -> float:
    """GFLOP/s of `calls` calls of fn (which finishes its work before it returns), the
    median of `repeats` timings after one untimed call."""
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(flops * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def gemm_rates(m: int, h: int, v: int, calls: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """GFLOP/s of the decoder's products per path (PATHS): 'forward', 'weight gradient',
    'input gradient', 'backward' (both gradients) and 'all' (the three). FullyConnected's
    backward is one call (its two products, and the bias gradient's sum of M x V), so it
    has no row of its own per gradient."""
    import mxnet as mx
    import numpy as np
    from mxnet import autograd

    rs = np.random.RandomState(0)
    x = rs.standard_normal((m, h)).astype(np.float32)           # (M, H) the LSTM's output
    w = (rs.standard_normal((v, h)) * 0.1).astype(np.float32)   # (V, H) the decoder weight
    dy = rs.standard_normal((m, v)).astype(np.float32)          # (M, V) the logits' gradient
    one = 2.0 * m * h * v  # FLOPs of one product
    out: Dict[str, Dict[str, float]] = {}

    def combine(rates: Dict[str, float], backward: Optional[float] = None) -> Dict[str, float]:
        """Adds 'backward' and 'all': total FLOPs over total time."""
        if backward is None:
            backward = 2 / (1 / rates["weight gradient"] + 1 / rates["input gradient"])
        rates["backward"] = backward
        rates["all"] = 3 / (1 / rates["forward"] + 2 / backward)
        return rates

    X, W, dY = mx.nd.array(x), mx.nd.array(w), mx.nd.array(dy)

    def on_mxnet(make: Callable[[], mx.nd.NDArray]) -> Callable[[], None]:
        return lambda: make().wait_to_read()

    out["MXNet dot"] = combine({
        "forward": median_rate(on_mxnet(lambda: mx.nd.dot(X, W, transpose_b=True)), one,
                               calls, repeats),
        "weight gradient": median_rate(on_mxnet(lambda: mx.nd.dot(dY, X, transpose_a=True)),
                                       one, calls, repeats),
        "input gradient": median_rate(on_mxnet(lambda: mx.nd.dot(dY, W)), one, calls,
                                      repeats)})

    B = mx.nd.zeros((v,))
    for a in (X, W, B):
        a.attach_grad()
    with autograd.record():
        Y = mx.nd.FullyConnected(X, W, B, num_hidden=v)          # (M, V)

    def fc_backward() -> None:
        Y.backward(dY, retain_graph=True)
        mx.nd.waitall()

    forward = median_rate(
        on_mxnet(lambda: mx.nd.FullyConnected(X, W, B, num_hidden=v)), one, calls, repeats)
    out["MXNet FullyConnected"] = combine(
        {"forward": forward}, median_rate(fc_backward, 2 * one, calls, repeats))

    wt = np.ascontiguousarray(w)
    out["numpy"] = combine({
        "forward": median_rate(lambda: x @ wt.T, one, calls, repeats),
        "weight gradient": median_rate(lambda: dy.T @ x, one, calls, repeats),
        "input gradient": median_rate(lambda: dy @ wt, one, calls, repeats)})
    return out


# --- the job -------------------------------------------------------------------------------

def read_bench_json(args: argparse.Namespace, variants: List[str]) -> Dict[str, float]:
    """The variants' median tokens/s from a `dist-lm bench --json` file (bench.run's
    layout), refused unless bench measured this model, layout, text and full softmax."""
    from ..errors import UsageError

    where = f"--bench-json {args.bench_json}"
    try:
        with open(args.bench_json, encoding="utf-8") as fh:
            bench = json.load(fh)
        measured, results = bench["args"], bench["results"]
        for key in ("model", "global_batch_size", "bptt"):
            if measured.get(key) != getattr(args, key):
                raise UsageError(f"{where}: measured with --{key.replace('_', '-')} "
                                 f"{measured.get(key)}, not {getattr(args, key)}")
        if measured.get("sampled_softmax") is not None:
            raise UsageError(f"{where}: measured with a sampled softmax; the ceiling is the "
                             f"full softmax's")
        if os.path.abspath(str(measured.get("train_file"))) != \
                os.path.abspath(args.train_file):
            raise UsageError(f"{where}: measured on {measured.get('train_file')}, not "
                             f"{args.train_file}")
        missing = [v for v in variants if v not in results]
        if missing:
            raise UsageError(f"{where}: has no {', '.join(missing)} (give --variants)")
        return {v: float(results[v]["median_tokens_per_s"]) for v in variants}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{where}: not a `dist-lm bench --json` file ({err})") from None


def job_rates(args: argparse.Namespace, variants: List[str]) -> Dict[str, float]:
    """Median tokens/s of each variant over --repeats runs, interleaved, each in its own
    processes as `dist-lm bench` runs them."""
    from .bench import _run_one

    run_args = argparse.Namespace(
        **vars(args), exchange="dense", fp16_allreduce=False, cycle_time_ms=None,
        fusion_threshold_mb=None, sampled_softmax=None)
    cores = len(os.sched_getaffinity(0))
    seen: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            seen[variant].append(_run_one(variant, run_args, cores)["tokens_per_s"])
    return {v: statistics.median(r) for v, r in seen.items()}


def run(args: argparse.Namespace) -> int:
    from ..data import text as D
    from ..data.cache import CorpusCache, cache_root
    from ..presets import PRESETS
    from .bench import flops_per_token

    variants = check(args)
    given = read_bench_json(args, variants) if args.bench_json else None
    m = PRESETS[args.model]
    cache = CorpusCache(cache_root(args.cache_dir, args.train_file))
    words = cache.vocab(args.train_file, 1, None)
    vocab = len(words)
    if variants and not args.bench_json:  # the training runs need one batch: said now
        D.shard_columns(cache.ids(args.train_file, words), args.global_batch_size, 0, 1,
                        args.bptt, what=args.train_file)
    width = m["embed_size"] if m["tie_weights"] else m["hidden_size"]
    tokens = args.global_batch_size * args.bptt
    flops = flops_per_token(m["embed_size"], m["hidden_size"], m["num_layers"], vocab,
                            m["tie_weights"])
    libs = libraries()
    rates = gemm_rates(tokens, width, vocab, args.calls, args.repeats)
    jobs = given if given is not None else job_rates(args, variants)
    ceiling_path = max(PATHS, key=lambda p: rates[p]["all"])
    ceiling = rates[ceiling_path]["all"]
    mxnet_best = max(("MXNet dot", "MXNet FullyConnected"), key=lambda p: rates[p]["all"])
    report(args, vocab, tokens, width, flops, libs, rates, jobs, ceiling_path, mxnet_best)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "vocab": vocab, "flops_per_token": flops,
                       "libraries": libs, "gflops": rates, "ceiling_gflops": ceiling,
                       "ceiling_path": ceiling_path, "tokens_per_s": jobs,
                       "share_of_ceiling": {v: t * flops / 1e9 / ceiling
                                            for v, t in jobs.items()}}, fh, indent=2)
    return 0


def _openblas_line(info: Optional[dict]) -> str:
    if not info:
        return "no OpenBLAS of its own loaded"
    return f"{info['build']} (kernels: {info['core']}, threads: {info['threads']})"


def report(args, vocab, tokens, width, flops, libs, rates, jobs, ceiling_path,
           mxnet_best) -> None:
    env = ", ".join(f"{k}={v}" if v is not None else f"{k} unset"
                    for k, v in libs["environment"].items())
    mxl, npl = libs["mxnet"], libs["numpy"]
    print(f"dist-lm bench-ceiling: {args.model}, vocab {vocab}, decoder ({tokens} x {width}) x "
          f"({width} x {vocab}), {len(os.sched_getaffinity(0))} cores, median of "
          f"{args.repeats} timings of {args.calls} calls")
    print(f"environment: {env}")
    print(f"MXNet {mxl['version']}: dot on {'/'.join(mxl['blas']) or 'no BLAS'}, "
          f"{_openblas_line(mxl['openblas'])}; FullyConnected on "
          f"{'oneDNN' if mxl['onednn'] else 'the same BLAS'}")
    print(f"numpy {npl['version']}: built with {', '.join(npl['blas']) or 'an unnamed BLAS'}, "
          f"{_openblas_line(npl['openblas'])}")
    shapes = {"forward": f"({tokens}x{width})({width}x{vocab})",
              "weight gradient": f"({vocab}x{tokens})({tokens}x{width})",
              "input gradient": f"({tokens}x{vocab})({vocab}x{width})",
              "backward": "both gradients", "all": "forward + backward"}
    print(f"{'GFLOP/s':<16} {'shape':<26} " + " ".join(f"{p:>20}" for p in PATHS))
    for row, shape in shapes.items():
        cells = [f"{rates[p][row]:20.1f}" if row in rates[p] else f"{'(in backward)':>20}"
                 for p in PATHS]
        print(f"{row:<16} {shape:<26} " + " ".join(cells))
    ceiling = rates[ceiling_path]["all"]
    mx_all, np_all = rates[mxnet_best]["all"], rates["numpy"]["all"]
    print(f"ceiling: {ceiling:.1f} GFLOP/s ({ceiling_path}, forward + backward); higher: "
          f"{'numpy' if np_all > mx_all else 'MXNet'} (numpy {np_all:.1f}, MXNet's best "
          f"{mx_all:.1f} through {mxnet_best.split()[1]}, ratio {np_all / mx_all:.2f})")
    if not jobs:
        return
    source = f"from {args.bench_json}" if args.bench_json else \
        f"median of {args.repeats} runs of {args.steps} steps"
    parts = [f"{v} {t:,.0f} tokens/s = {t * flops / 1e9:.1f} GFLOP/s = "
             f"{100 * t * flops / 1e9 / ceiling:.1f}% of the ceiling" for v, t in jobs.items()]
    print(f"job ({flops / 1e6:.1f} MFLOP/token, {source}): " + "; ".join(parts))
    if "local" in jobs and "reference" in jobs:
        print(f"local / reference: {jobs['local'] / jobs['reference']:.2f} (bench's 'x ref')")
