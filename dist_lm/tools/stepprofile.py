"""`dist-lm bench-profile`: where a training step's time goes, by operator class.

It builds the job's step as training does (`Stepper`: one hybridized graph, the dropout
masks of the rank's global columns drawn on the host, `World.gradient_step`), runs
--warmup steps, then --steps steps under MXNet's profiler, and reads the profiler's
trace: every operator the engine ran, with its start and end on the host's clock
(MXNet stamps events with the system clock in microseconds, as `time.time()`). The
host's part of the dropout (`Stepper.mask_inputs`: the draw and the copy to the device)
is timed on the same clock. Run under mpirun/horovodrun, every rank profiles its own
steps and rank 0 prints every rank's shares.

Each operator falls in one class (`classify`): by its name, except for the element-wise
operators that several parts of the step use, which go by where they run in the step.
Everything that runs after the global norm's `sqrt` and before the next step's
`Embedding` is the gradient step (the clip's scaling, the finiteness checks), apart from
the optimizer's and Horovod's own operators; before it, `broadcast_mul` is a dropout
mask's multiply, `add_n` the tied embedding/decoder weight's gradient sum (the last one
before `sqrt`, which sums the per-array squares, is the norm's). The engine's
dependencies fix that order: the clip reads the norm, the next step's forward reads
the parameters the update writes.

The shares add up to the step's wall time (`attribute`): at each instant the time goes
to what runs then, operators first; Horovod's allreduce (its own thread) only when no
other operator runs; the host's mask draw only when no operator runs at all; time when
several operators of one kind run at once is split between them. What is left, no
operator and no draw, is "Python and synchronisation": the host building the next step
while the engine waits for it.

MXNet would merge operators into segments (the graph's bulk execution, and the
engine's "ImperativeBulk" runs of imperative operators when the profiler does not
aggregate), so `run` turns bulking off before the graph is built and the profiler
aggregates. Bulking off cost about 1% of a step when it was measured
(docs/performance.md); the profiler's own cost is not measured: compare the step time
with `dist-lm bench`'s `local`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

CLASSES = (
    ("lstm", "LSTM layers (RNN fwd + bwd, weight packing)"),
    ("decoder", "decoder GEMMs (FullyConnected fwd + bwd)"),
    ("softmax", "softmax / cross-entropy"),
    ("embedding", "embedding lookup + gradient (tied sum)"),
    ("masks", "dropout masks (host draw + multiply)"),
    ("allreduce", "allreduce (Horovod)"),
    ("clip", "clipping / global norm"),
    ("optimizer", "optimizer update"),
    ("other", "other operators"),
    ("python", "Python and synchronisation"),
)
LABELS = dict(CLASSES)

# Operators whose class their name tells (MXNet 1.9.1's names).
BY_NAME = {
    **dict.fromkeys(("RNN", "_backward_RNN", "Concat", "_backward_Concat", "slice_axis",
                     "_backward_slice_axis"), "lstm"),
    **dict.fromkeys(("FullyConnected", "_backward_FullyConnected"), "decoder"),
    **dict.fromkeys(("log_softmax", "_backward_log_softmax", "pick", "_backward_pick",
                     "mean", "_backward_mean", "_backward_mul_scalar"), "softmax"),
    **dict.fromkeys(("Embedding", "_backward_Embedding"), "embedding"),
    **dict.fromkeys(("Dropout", "_backward_Dropout", "_backward_broadcast_mul"), "masks"),
    # The global norm (a BLAS dot per array, dist.global_norm) and the finiteness checks
    # of the norm and the loss (contrib.isfinite).
    **dict.fromkeys(("dot", "sqrt", "abs", "_not_equal_scalar", "broadcast_equal",
                     "broadcast_logical_and"), "clip"),
}
OPTIMIZER_WORDS = ("sgd", "adam", "_update")
# Not operators: the host waiting for a result (its time is the host's, and the engine
# runs other operators meanwhile).
NOT_OPERATORS = ("WaitForVar",)
# The engine's and the graph's housekeeping, wherever it runs: "other operators".
HOUSEKEEPING = ("DeleteVariable", "Reshape", "_backward_reshape", "SetValueOp",
                "_zeros_without_dtype")


def classify(names: Sequence[str]) -> List[str]:
    """The class of each operator of a trace, `names` in the order the engine started
    them (see the module docstring for the element-wise operators)."""
    classes, update = [], False
    last_add_n: Optional[int] = None
    for i, name in enumerate(names):
        if name == "sqrt":  # the global norm: the gradient step's element-wise part starts
            update = True
            if last_add_n is not None:
                classes[last_add_n] = "clip"  # the norm's sum of the squares
                last_add_n = None
        elif name == "Embedding":  # the next step's forward starts
            update = False
        if name.lower().startswith("horovod"):  # horovod_allreduce, ..._allgather
            kind = "allreduce"
        elif any(word in name for word in OPTIMIZER_WORDS):
            kind = "optimizer"
        elif name in BY_NAME:
            kind = BY_NAME[name]
        elif name in HOUSEKEEPING:
            kind = "other"
        elif update:
            kind = "clip"
        elif name == "broadcast_mul":
            kind = "masks"
        elif name == "add_n":
            kind, last_add_n = "embedding", i
        elif name in ("_mul_scalar", "negative"):
            kind = "softmax"  # the cross-entropy's negation
        else:
            kind = "other"
        classes.append(kind)
    return classes


@dataclass
class Span:
    """One interval of the step's timeline, in microseconds of the host's clock."""

    name: str
    kind: str
    start: float
    end: float


def level(span: Span) -> int:
    """Which of several spans running at once the time goes to: the lowest level."""
    if span.kind == "host mask draw":
        return 2
    return 1 if span.kind == "allreduce" else 0


def attribute(spans: Sequence[Span], start: float, end: float) -> Dict[str, float]:
    """Microseconds of [start, end) per class (every class of CLASSES, "python" the time
    no span covers): sums to end - start exactly. At each instant the time goes to the
    running spans of the lowest level (`level`), split evenly between them."""
    out = dict.fromkeys(LABELS, 0.0)
    out.update((s.kind, 0.0) for s in spans)  # and any kind of span a caller adds
    edges = []
    for i, s in enumerate(spans):
        a, b = max(s.start, start), min(s.end, end)
        if b > a:
            edges += [(a, 1, i), (b, 0, i)]  # at one instant, ends before starts
    edges.sort()
    active, at = set(), start
    for t, opens, i in edges:
        if t > at:
            _share(out, [spans[j] for j in active], t - at)
            at = t
        (active.add if opens else active.discard)(i)
    _share(out, [], end - at)
    return out


def _share(out: Dict[str, float], running: List[Span], length: float) -> None:
    if length <= 0:
        return
    if not running:
        out["python"] += length
        return
    lowest = min(level(s) for s in running)
    first = [s for s in running if level(s) == lowest]
    for s in first:
        out[s.kind] += length / len(first)


def read_trace(path: str) -> List[Tuple[str, float, float]]:
    """(name, start, end) of every operator in a trace MXNet's profiler dumped (Chrome's
    trace format: begin/end pairs per thread), ordered by start."""
    with open(path, encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    open_by_thread: Dict[tuple, List[dict]] = {}
    out = []
    for e in events:
        if e.get("cat") != "operator" or e.get("name") in NOT_OPERATORS:
            continue
        key = (e.get("pid"), e.get("tid"))
        if e.get("ph") == "X":
            out.append((e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"])))
        elif e.get("ph") == "B":
            open_by_thread.setdefault(key, []).append(e)
        elif e.get("ph") == "E" and open_by_thread.get(key):
            begin = open_by_thread[key].pop()
            out.append((begin["name"], float(begin["ts"]), float(e["ts"])))
    return sorted(out, key=lambda x: x[1])


# --- the command ---------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-file", required=True, help="text to train on")
    p.add_argument("--model", default="standard_lstm_lm_200",
                   help="a model preset, or 'custom' (with the size options)")
    p.add_argument("--embed-size", type=int, help="overrides the preset's")
    p.add_argument("--hidden-size", type=int, help="overrides the preset's")
    p.add_argument("--num-layers", type=int, help="overrides the preset's")
    p.add_argument("--global-batch-size", type=int, default=20,
                   help="global columns per step (split over the ranks under a launcher)")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=5,
                   help="unprofiled steps first (the first builds the graph)")
    p.add_argument("--operators", action="store_true",
                   help="also print every operator: its class, calls and ms per step")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cache-dir", help="the corpus cache (as --cache-dir of train)")


def check(args: argparse.Namespace) -> None:
    """The command line's own errors, before MXNet loads or the corpus is read."""
    from ..errors import UsageError
    from ..presets import PRESETS

    if args.model != "custom" and args.model not in PRESETS:
        raise UsageError(f"--model {args.model}: choose 'custom' or one of "
                         f"{', '.join(sorted(PRESETS))}")
    for flag, value, least in (("--global-batch-size", args.global_batch_size, 1),
                               ("--bptt", args.bptt, 1), ("--steps", args.steps, 1),
                               ("--warmup", args.warmup, 1),
                               ("--embed-size", args.embed_size, 1),
                               ("--hidden-size", args.hidden_size, 1),
                               ("--num-layers", args.num_layers, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if not os.path.isfile(args.train_file):
        raise UsageError(f"--train-file {args.train_file}: no such file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise UsageError(f"--json {args.json}: its directory does not exist")


def model_config(args: argparse.Namespace):
    from ..config import ModelConfig
    from ..presets import PRESETS

    fields = dict(PRESETS.get(args.model, {}))
    for name in ("embed_size", "hidden_size", "num_layers"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return ModelConfig(model=args.model, **fields)


def run(args: argparse.Namespace) -> int:
    check(args)
    # Before the graph is built (CachedOp reads it then): without bulking the profiler
    # sees every operator, not segments of merged ones.
    os.environ["MXNET_EXEC_BULK_EXEC_TRAIN"] = "0"
    from ..runtime.dist import make_world, run_everywhere

    world = make_world("auto")
    try:
        # The data's checks agree over the ranks (one line on every rank); the model's
        # broadcast, a collective, comes after.
        batches, vocab, columns = run_everywhere(world, lambda: load(args, world),
                                                 "bench-profile")
        setup = build(args, world, batches, vocab, columns)
        result = profile(setup, args, world)
        results = world.allgather_object(result, name="bench-profile.results")
        if world.is_root:
            print_report(results, setup, args)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as fh:
                    json.dump({"args": vars(args), "ranks": results}, fh, indent=2)
    finally:
        world.shutdown()
    return 0


@dataclass
class Setup:
    stepper: object
    batches: list
    states: list
    vocab: int
    columns: int


def load(args: argparse.Namespace, world):
    """This rank's columns of the global batch, as training lays them out: the batches
    (inputs, targets) of the warm-up and profiled steps, the vocabulary's size and the
    rank's column count. No collective: `run_everywhere` agrees on its errors."""
    from ..data import text as D
    from ..data.cache import CorpusCache, cache_root
    from ..errors import UsageError

    g = args.global_batch_size
    if g < world.size:
        raise UsageError(f"--global-batch-size {g} is smaller than the {world.size} ranks")
    cache = CorpusCache(cache_root(args.cache_dir, args.train_file))
    vocab = cache.vocab(args.train_file, 1, None)
    mine = D.column_range(g, world.rank, world.size)
    shard = D.layout_columns(cache.ids(args.train_file, vocab), g, mine, args.bptt,
                             args.train_file)
    batches = [shard.batch(i % shard.num_batches) for i in range(args.warmup + args.steps)]
    return batches, len(vocab), len(mine)


def build(args: argparse.Namespace, world, batches: list, vocab: int, columns: int) -> Setup:
    """This rank's step, as training builds it: the model (rank 0's parameters on every
    rank) and the stepper, with its trainer and mask generator."""
    import mxnet as mx

    from ..config import Config
    from ..model import build_model
    from ..training.stepper import Stepper, seed_everything

    cfg = Config(model=model_config(args))
    cfg.run.global_batch_size, cfg.run.bptt = args.global_batch_size, args.bptt
    seed_everything(cfg.run.seed)
    ctx = mx.cpu()
    model = build_model(cfg.model, vocab)
    model.initialize(mx.init.Xavier(), ctx=ctx)
    world.broadcast_params(model.collect_params())
    weight = columns * world.size / args.global_batch_size  # w_r = b_r N / G (dist.py)
    stepper = Stepper(model, cfg, world, ctx, weight)
    return Setup(stepper, batches, model.begin_state(columns, ctx), vocab, columns)


def profile(setup: Setup, args: argparse.Namespace, world) -> dict:
    """Runs the warm-up steps, then the profiled ones; returns this rank's figures."""
    import mxnet as mx

    stepper, draws = setup.stepper, []
    real_masks = stepper.mask_inputs

    def timed_masks(*a):  # the host's part of the dropout, on the profiler's clock
        t0 = time.time()
        out = real_masks(*a)
        draws.append((t0 * 1e6, time.time() * 1e6))
        return out

    stepper.mask_inputs = timed_masks
    states = setup.states

    def steps(first: int, count: int) -> None:
        nonlocal states
        for i in range(first, first + count):
            _, _, _, states = stepper.step(*setup.batches[i], states, None, i)

    steps(0, args.warmup)
    mx.nd.waitall()
    world.barrier()
    draws.clear()  # the profiled steps' draws only
    trace = os.path.join(tempfile.gettempdir(), f"dist-lm-step-profile-{os.getpid()}.json")
    # aggregate_stats: with it off, MXNet's engine merges runs of imperative operators
    # into "ImperativeBulk" events (the graph's own segments are off, see `run`).
    mx.profiler.set_config(profile_symbolic=True, profile_imperative=True,
                           profile_memory=False, profile_api=False, aggregate_stats=True,
                           filename=trace)
    mx.profiler.set_state("run")
    cpu0, start = time.process_time(), time.time()
    steps(args.warmup, args.steps)
    mx.nd.waitall()
    end, cpu = time.time(), time.process_time() - cpu0
    mx.profiler.set_state("stop")
    mx.profiler.dump(finished=True)
    mx.profiler.dumps(reset=True)  # the aggregate is not used: the trace has it all
    try:
        ops = read_trace(trace)
    finally:
        os.unlink(trace)
    world.barrier()
    # Microseconds from the first profiled step's start: epoch microseconds (~1.8e15)
    # keep only a quarter of a microsecond in a float.
    base = start * 1e6
    start_us, end_us = 0.0, end * 1e6 - base
    ops = [(name, a - base, b - base) for name, a, b in ops]
    ops = [op for op in ops if op[2] > start_us and op[1] < end_us]
    kinds = classify([name for name, _, _ in ops])
    spans = [Span(name, kind, a, b) for (name, a, b), kind in zip(ops, kinds)]
    host = [Span("host mask draw", "host mask draw", a - base, b - base) for a, b in draws]
    per_step = 1e3 * args.steps  # microseconds over all steps -> ms per step
    classes = {k: v / per_step for k, v in attribute(spans + host, start_us, end_us).items()}
    # Each operator's own time (overlaps counted in full), by name and class: an
    # element-wise operator can be in two classes (see `classify`).
    operators: Dict[Tuple[str, str], dict] = {}
    for s in spans:
        row = operators.setdefault((s.name, s.kind), {"name": s.name, "class": s.kind,
                                                      "calls": 0.0, "ms": 0.0})
        row["calls"] += 1
        row["ms"] += (min(s.end, end_us) - max(s.start, start_us)) / per_step
    for row in operators.values():
        row["calls"] /= args.steps
    # The host's draw is credited only while no operator ran: the rest of it was hidden.
    drawn = sum(b - a for a, b in draws) / per_step
    exposed = classes.pop("host mask draw", 0.0)
    classes["masks"] += exposed
    wall = end_us / per_step
    return {"rank": world.rank, "ranks": world.size, "columns": setup.columns,
            "step_ms": wall, "classes": classes,
            "operators": sorted(operators.values(), key=lambda row: -row["ms"]),
            "cores_busy": cpu / max(end - start, 1e-9),
            "host_mask_draw_ms": drawn, "host_mask_draw_exposed_ms": exposed,
            # Horovod's operators of a step run at once: the time any of them ran.
            "allreduce_busy_ms": attribute([s for s in spans if s.kind == "allreduce"],
                                           start_us, end_us)["allreduce"] / per_step}


def print_report(results: List[dict], setup: Setup, args: argparse.Namespace) -> None:
    first = results[0]
    ranks = len(results)
    where = "1 process" if ranks == 1 else f"{ranks} ranks"
    print(f"dist-lm bench-profile: {args.model}, vocab {setup.vocab}, {where}, "
          f"{first['columns']} columns per rank (global {args.global_batch_size}) x bptt "
          f"{args.bptt}, {args.steps} profiled steps after {args.warmup}, "
          f"{os.environ.get('OMP_NUM_THREADS', '?')} OpenMP threads")
    print(f"step {first['step_ms']:.1f} ms (wall, rank 0), {first['cores_busy']:.2f} cores "
          f"busy; shares of the step:")
    head = f"{'class':<46} {'ms/step':>8} {'share':>7}"
    head += "".join(f" {'rank ' + str(r['rank']):>7}" for r in results[1:])
    print(head)
    for key, label in CLASSES:
        ms = first["classes"][key]
        line = f"{label:<46} {ms:8.2f} {100 * ms / first['step_ms']:6.1f}%"
        line += "".join(f" {100 * r['classes'][key] / r['step_ms']:6.1f}%" for r in results[1:])
        print(line)
    total = sum(first["classes"].values())
    print(f"{'total':<46} {total:8.2f} {100 * total / first['step_ms']:6.1f}%"
          + "".join(f" {100 * sum(r['classes'].values()) / r['step_ms']:6.1f}%"
                    for r in results[1:]))
    print(f"host mask draw: {first['host_mask_draw_ms']:.2f} ms/step, "
          f"{first['host_mask_draw_exposed_ms']:.2f} of it while no operator ran (in the "
          f"table); allreduce running: {first['allreduce_busy_ms']:.2f} ms/step (in the "
          f"table: only while no other operator ran)")
    unclassified = sorted(row["name"] for row in first["operators"] if row["class"] == "other")
    if unclassified:
        print(f"other operators: {', '.join(unclassified)}")
    if args.operators:
        print(f"{'operator (rank 0)':<36} {'class':<10} {'calls/step':>10} {'ms/step':>8}")
        for row in first["operators"]:
            print(f"{row['name']:<36} {row['class']:<10} {row['calls']:10.1f} "
                  f"{row['ms']:8.3f}")
