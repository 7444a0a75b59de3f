"""`dist-lm bench-profile` (where a step's time goes) and `dist-lm bench-ceiling` (the
decoder's GEMM rate here): their bookkeeping and their plumbing, on tiny shapes.

No timings are asserted: speed is measured by the commands, never by a unit test.
"""

import json
import os
import random
import re

import pytest

from conftest import dist_lm
from dist_lm.presets import PRESETS
from dist_lm.tools.bench import flops_per_token
from dist_lm.tools.stepprofile import CLASSES, Span, attribute, classify, read_trace

TINY_MODEL = ["--model", "custom", "--embed-size", "16", "--hidden-size", "16"]
SMALL = ["--global-batch-size", "4", "--bptt", "5"]


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """A text of 300 made-up words, 4,000 tokens: a vocabulary of a few hundred."""
    rs = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    path = tmp_path_factory.mktemp("words") / "train.txt"
    path.write_text("".join(" ".join(rs.choice(vocab) for _ in range(20)) + "\n"
                            for _ in range(200)))
    return path


def test_classify_splits_the_elementwise_operators_by_where_they_run():
    """broadcast_mul, add_n and _mul_scalar belong to the dropout, the tied weight's
    gradient or the loss before the global norm's sqrt, and to the clip after it, until
    the next step's Embedding; operators with their own names keep their class anywhere."""
    step = [
        ("Embedding", "embedding"), ("broadcast_mul", "masks"), ("RNN", "lstm"),
        ("FullyConnected", "decoder"), ("log_softmax", "softmax"), ("_mul_scalar", "softmax"),
        ("_backward_FullyConnected", "decoder"), ("_backward_broadcast_mul", "masks"),
        ("add_n", "embedding"), ("_backward_Embedding", "embedding"), ("dot", "clip"),
        ("add_n", "clip"), ("sqrt", "clip"), ("_mul_scalar", "clip"),
        ("broadcast_mul", "clip"), ("broadcast_mul", "clip"), ("horovod_allreduce", "allreduce"),
        ("sgd_update", "optimizer"), ("slice_axis", "lstm"), ("DeleteVariable", "other"),
        ("Embedding", "embedding"), ("broadcast_mul", "masks"), ("mystery_op", "other"),
    ]
    assert classify([name for name, _ in step]) == [kind for _, kind in step]


def test_attribute_sums_to_the_window_operators_first():
    """Operators take the time they run; the allreduce only when no other operator runs;
    the host's mask draw only when nothing runs; the rest is Python and synchronisation.
    Operators running at once share their time."""
    spans = [Span("RNN", "lstm", 0, 10), Span("host mask draw", "host mask draw", 5, 15),
             Span("horovod_allreduce", "allreduce", 8, 20),
             Span("FullyConnected", "decoder", 12, 14), Span("sgd_update", "optimizer", 12, 14),
             Span("host mask draw", "host mask draw", 22, 23),
             Span("outside", "other", 30, 40)]
    got = attribute(spans, 0, 25)
    assert got["lstm"] == 10 and got["decoder"] == 1 and got["optimizer"] == 1
    assert got["allreduce"] == 2 + 6       # [10, 12) and [14, 20)
    assert got["host mask draw"] == 1      # [22, 23): the rest of the draws was covered
    assert got["python"] == 4              # [20, 22) and [23, 25)
    assert got["other"] == 0 and sum(got.values()) == 25
    assert set(got) == {key for key, _ in CLASSES} | {"host mask draw"}


def test_read_trace_pairs_each_threads_begins_and_ends(tmp_path):
    events = [{"ph": "M", "name": "process_name", "pid": 0},
              {"name": "RNN", "cat": "operator", "ph": "B", "ts": 10, "pid": 0, "tid": 1},
              {"name": "WaitForVar", "cat": "operator", "ph": "B", "ts": 11, "pid": 0, "tid": 2},
              {"name": "Concat", "cat": "operator", "ph": "B", "ts": 12, "pid": 0, "tid": 1},
              {"name": "Concat", "cat": "operator", "ph": "E", "ts": 14, "pid": 0, "tid": 1},
              {"name": "WaitForVar", "cat": "operator", "ph": "E", "ts": 30, "pid": 0, "tid": 2},
              {"name": "RNN", "cat": "operator", "ph": "E", "ts": 20, "pid": 0, "tid": 1},
              {"name": "dot", "cat": "operator", "ph": "X", "ts": 5, "dur": 2, "pid": 0,
               "tid": 3},
              {"name": "MXNDArrayDetach", "cat": "MXNET_C_API", "ph": "b", "ts": 1}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert read_trace(str(path)) == [("dot", 5.0, 7.0), ("RNN", 10.0, 20.0),
                                     ("Concat", 12.0, 14.0)]


def shares(stdout):
    """The class table's rows: label -> (ms per step, share in %)."""
    rows = {}
    for key, label in CLASSES:
        row = re.search(rf"^{re.escape(label)} +([0-9.]+) +([0-9.]+)%", stdout, re.M)
        assert row, f"no row for {label}:\n{stdout}"
        rows[label] = float(row[1]), float(row[2])
    return rows


def test_bench_profile_accounts_for_the_whole_step(words, tmp_path):
    out = tmp_path / "profile.json"
    proc = dist_lm("bench-profile", "--train-file", words, *TINY_MODEL, *SMALL, "--steps", "3",
                   "--warmup", "1", "--operators", "--json", out, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = shares(proc.stdout)
    assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.5)
    result, = json.loads(out.read_text())["ranks"]
    assert sum(result["classes"].values()) == pytest.approx(result["step_ms"], rel=1e-9)
    assert rows[dict(CLASSES)["allreduce"]] == (0.0, 0.0)  # one process: nothing to reduce
    # The raw table: every operator once per (name, class); a mask's multiply (3 sites:
    # embedding, between the layers, output) is told from the clip's (10 gradient arrays,
    # and the finiteness product) by where it runs.
    calls = {(row["name"], row["class"]): row["calls"] for row in result["operators"]}
    assert calls[("broadcast_mul", "masks")] == 3
    assert calls[("broadcast_mul", "clip")] == 11
    assert calls[("RNN", "lstm")] == 2 and calls[("sgd_update", "optimizer")] == 10
    assert calls[("add_n", "embedding")] == calls[("add_n", "clip")] == 1
    assert re.search(r"^broadcast_mul +masks +3\.0 ", proc.stdout, re.M), proc.stdout
    assert result["host_mask_draw_ms"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "dist-lm: error: --steps must be at least 1, got 0"),
    (["--warmup", "0"], "dist-lm: error: --warmup must be at least 1, got 0"),
    (["--hidden-size", "0"], "dist-lm: error: --hidden-size must be at least 1, got 0"),
    (["--model", "lstm9"], "dist-lm: error: --model lstm9: choose 'custom' or one of "
     + ", ".join(sorted(PRESETS))),
    (["--json", "/nonexistent-dir/p.json"],
     "dist-lm: error: --json /nonexistent-dir/p.json: its directory does not exist"),
    (["--stepz", "3"], "dist-lm bench-profile: error: unrecognized arguments: --stepz 3 "
     "(did you mean --steps?)"),
])
def test_bench_profile_rejects_bad_flags_in_one_line(words, flags, message):
    proc = dist_lm("bench-profile", "--train-file", words, *TINY_MODEL, *flags, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]


def test_bench_profile_rejects_a_text_too_short_in_one_line(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a few words only\n")
    proc = dist_lm("bench-profile", "--train-file", path, *TINY_MODEL, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "too few for one batch of 20 columns" in lines[0], lines


# --- bench-ceiling ------------------------------------------------------------------------

CEILING = ["--calls", "2", "--repeats", "1", *SMALL]


def rates(stdout):
    """GFLOP/s per row of the products table: row -> [MXNet dot, MXNet FC, numpy], None
    where FullyConnected's backward has no row of its own."""
    table = {}
    for row in ("forward", "weight gradient", "input gradient", "backward", "all"):
        line = re.search(rf"^{row} +(\(\d+x\d+\)\(\d+x\d+\)|both gradients|"
                         rf"forward \+ backward) +(.*)$", stdout, re.M)
        assert line, f"no row {row}:\n{stdout}"
        table[row] = [None if cell == "(in backward)" else float(cell)
                      for cell in re.findall(r"\(in backward\)|[0-9]+\.[0-9]", line[2])]
    return table


def test_bench_ceiling_rates_both_libraries_and_says_which_is_higher(words, tmp_path):
    out = tmp_path / "ceiling.json"
    proc = dist_lm("bench-ceiling", "--train-file", words, *CEILING, "--variants", "",
                   "--json", out, timeout=180)
    assert proc.returncode == 0, proc.stderr
    table = rates(proc.stdout)
    for row, cells in table.items():
        assert len(cells) == 3, (row, cells)
    assert table["weight gradient"][1] is None and table["input gradient"][1] is None
    assert all(c > 0 for row in table.values() for c in row if c is not None)
    result = json.loads(out.read_text())
    best = max(r["all"] for r in result["gflops"].values())
    assert result["ceiling_gflops"] == best
    higher = "numpy" if result["gflops"]["numpy"]["all"] > max(
        result["gflops"]["MXNet dot"]["all"], result["gflops"]["MXNet FullyConnected"]["all"]) \
        else "MXNet"
    assert f"higher: {higher} " in proc.stdout
    # The variables that change OpenBLAS's kernels are reported as they are, never set.
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        value = os.environ.get(name)
        assert (f"{name}={value}" if value is not None else f"{name} unset") in proc.stdout
    assert re.search(r"^numpy [0-9.]+: built with \S", proc.stdout, re.M), proc.stdout
    assert "job" not in proc.stdout  # no variants, no job line


def bench_json(path, train_file, **changes):
    """A `dist-lm bench --json` file (its layout: bench.run) with made-up figures."""
    args = {"train_file": str(train_file), "model": "standard_lstm_lm_200",
            "global_batch_size": 4, "bptt": 5, "sampled_softmax": None}
    args.update(changes)
    path.write_text(json.dumps({"args": args, "results": {
        "reference": {"median_tokens_per_s": 500.0}, "local": {"median_tokens_per_s": 1000.0}}}))
    return path


def test_bench_ceiling_takes_the_jobs_rate_from_a_bench_json(words, tmp_path):
    out = tmp_path / "ceiling.json"
    proc = dist_lm("bench-ceiling", "--train-file", words, *CEILING, "--bench-json",
                   bench_json(tmp_path / "bench.json", words), "--json", out, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    m = PRESETS["standard_lstm_lm_200"]
    flops = flops_per_token(m["embed_size"], m["hidden_size"], m["num_layers"],
                            result["vocab"], True)
    assert result["flops_per_token"] == flops
    for variant, tokens in (("local", 1000.0), ("reference", 500.0)):
        assert result["share_of_ceiling"][variant] == pytest.approx(
            tokens * flops / 1e9 / result["ceiling_gflops"])
        share = 100 * tokens * flops / 1e9 / result["ceiling_gflops"]
        assert f"{variant} {tokens:,.0f} tokens/s = {tokens * flops / 1e9:.1f} GFLOP/s = " \
               f"{share:.1f}% of the ceiling" in proc.stdout
    assert "local / reference: 2.00" in proc.stdout


@pytest.mark.medium
def test_bench_ceiling_times_the_local_variant_itself(words):
    proc = dist_lm("bench-ceiling", "--train-file", words, *CEILING, "--variants", "local",
                   "--steps", "2", "--warmup", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^job \(.*median of 1 runs of 2 steps\): local [0-9,]+ tokens/s = "
                     r"[0-9.]+ GFLOP/s = [0-9.]+% of the ceiling$", proc.stdout, re.M), \
        proc.stdout


@pytest.mark.parametrize("flags,message", [
    (["--model", "awd_lstm_lm_600"], "dist-lm: error: --model awd_lstm_lm_600: use a "
     "standard_lstm_lm_* preset (bench's variants run them)"),
    (["--calls", "0"], "dist-lm: error: --calls must be at least 1, got 0"),
    (["--variants", "hvd2-mpi"], "dist-lm: error: --variants: hvd2-mpi cannot be compared "
     "here; choose from local, reference, reference-tuned, hvd1 (of reference, "
     "reference-tuned, local, hvd1, hvd2-gloo, hvd2-mpi, pair2)"),
    (["--train-file", "/nonexistent.txt"],
     "dist-lm: error: --train-file /nonexistent.txt: no such file"),
])
def test_bench_ceiling_rejects_bad_flags_in_one_line(words, flags, message):
    proc = dist_lm("bench-ceiling", "--train-file", words, *flags, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]


def test_bench_ceiling_refuses_a_bench_json_of_another_layout(words, tmp_path):
    proc = dist_lm("bench-ceiling", "--train-file", words, *CEILING, "--bench-json",
                   bench_json(tmp_path / "bench.json", words, bptt=35), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dist-lm: error: --bench-json {tmp_path / 'bench.json'}: measured with --bptt 35, "
        f"not 5"]
