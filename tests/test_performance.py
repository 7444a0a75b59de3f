"""What the performance work must not change, and the arithmetic behind docs/performance.md.

No timings: speed is measured by `dist-lm bench`, never asserted by a unit test.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import gluonnlp as nlp
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from conftest import BIN, REPO, dist_lm
from dist_lm.tools.bench import flops_per_token, param_count
from dist_lm.config import ModelConfig
from dist_lm.model import TokenLoss, build_model
from dist_lm.presets import PRESETS
from dist_lm.runtime.procs import kill_session

V = 300
DROPOUT_OFF = dict(dropout=0.0, weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)


def batches(n=5, t=7, b=4, seed=0):
    """n steps over one fixed batch, so that SGD visibly lowers the loss."""
    rs = np.random.RandomState(seed)
    inputs, targets = rs.randint(0, V, (t, b)), rs.randint(0, V, (t, b))
    return [(mx.nd.array(inputs), mx.nd.array(targets))] * n


def sgd_curve(params, loss_fn, begin_state, data, lr=5.0):
    """Losses of len(data) plain SGD steps, hidden state carried (detached) as in training."""
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": lr})
    states, losses = begin_state(), []
    for inputs, targets in data:
        states = [s.detach() for s in states]
        with autograd.record():
            loss, states = loss_fn(inputs, targets, states)
        loss.backward()
        trainer.step(1)
        losses.append(float(loss.asscalar()))
    return np.array(losses)


def ours(name, seed=1):
    mx.random.seed(seed)
    model = build_model(ModelConfig(model=name, **dict(PRESETS[name], **DROPOUT_OFF)), V)
    model.initialize(mx.init.Xavier())
    return model


@pytest.mark.parametrize("name", ["standard_lstm_lm_200", "awd_lstm_lm_600"])
def test_hybridized_training_follows_the_imperative_loss_curve(name):
    fast, slow = ours(name), ours(name)
    hybrid = TokenLoss(fast)
    hybrid.hybridize(static_alloc=True, static_shape=True)
    data = batches()
    got = sgd_curve(fast.collect_params(), hybrid, lambda: fast.begin_state(4, mx.cpu()), data)
    want = sgd_curve(slow.collect_params(), TokenLoss(slow),
                     lambda: slow.begin_state(4, mx.cpu()), data)
    assert want[0] - want[-1] > 0.05  # the steps really move the parameters
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(fast.collect_params().values(), slow.collect_params().values()):
        np.testing.assert_allclose(a.data().asnumpy(), b.data().asnumpy(), rtol=1e-4,
                                   atol=1e-6)


def test_training_follows_the_zoo_standard_rnn(tmp_path):
    """Our hybridized block against GluonNLP's imperative StandardRNN, from the same
    parameters: same losses over 5 SGD steps (forward and gradients of every weight)."""
    model = ours("standard_lstm_lm_200")
    model.save_parameters(str(tmp_path / "p.params"))
    vocab = nlp.Vocab(nlp.data.Counter([str(i) for i in range(V - 4)]))
    zoo, _ = nlp.model.get_model("standard_lstm_lm_200", vocab=vocab, dataset_name=None,
                                 dropout=0.0)
    zoo.load_parameters(str(tmp_path / "p.params"))
    ce = gluon.loss.SoftmaxCrossEntropyLoss()

    def zoo_loss(inputs, targets, states):
        logits, states = zoo(inputs, states)
        return ce(logits.reshape((-3, -1)), targets.reshape((-1,))).mean(), states

    hybrid = TokenLoss(model)
    hybrid.hybridize(static_alloc=True, static_shape=True)
    data = batches()
    got = sgd_curve(model.collect_params(), hybrid, lambda: model.begin_state(4, mx.cpu()),
                    data)
    want = sgd_curve(zoo.collect_params(), zoo_loss,
                     lambda: zoo.begin_state(batch_size=4, func=mx.nd.zeros), data)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_lstm_weight_packing_is_bit_identical_to_gluon():
    """The 2-D concat that packs the fused LSTM's weights gives exactly Gluon's vector:
    same outputs, states and gradients, bit for bit."""
    from dist_lm.model import _LSTM

    runs = []
    for cls in (_LSTM, gluon.rnn.LSTM):
        mx.random.seed(4)
        lstm = cls(24, 2, input_size=16)
        lstm.initialize(mx.init.Xavier())
        lstm.hybridize(static_alloc=True, static_shape=True)
        x = mx.nd.array(np.random.RandomState(0).randn(5, 3, 16))
        states = lstm.begin_state(3, func=mx.nd.zeros)
        with autograd.record():
            out, new_states = lstm(x, states)
            total = out.sum() + sum(s.sum() for s in new_states)
        total.backward()
        runs.append([out.asnumpy()] + [s.asnumpy() for s in new_states]
                    + [p.grad().asnumpy() for p in lstm.collect_params().values()])
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def relative_names(name, **overrides):
    model = build_model(ModelConfig(model=name, **dict(PRESETS[name], **overrides)), V)
    return [key[len(model.prefix):] for key in model.collect_params().keys()]


def test_parameter_names_are_those_of_gluons_lstm():
    """Trainer and Horovod order parameters by full name (optimizer-state indices in
    checkpoints, allreduce tensor names): the LSTM subclass keeps rnn.LSTM's names."""
    lstm = [f"l{layer}_{gate}_{kind}" for layer in range(2) for kind in ("weight", "bias")
            for gate in ("i2h", "h2h")]
    assert relative_names("standard_lstm_lm_200") == (
        ["hybridsequential0_embedding0_weight"] + [f"lstm0_{n}" for n in lstm]
        + ["hybridsequential0_embedding0_bias"])
    for overrides, layer in [({}, "_weightdroplstm"), ({"weight_drop": 0.0}, "lstm")]:
        names = relative_names("awd_lstm_lm_600", **overrides)
        assert [n for n in names if "_l0_" in n] == [
            f"hybridsequential1_{layer}{k}_l0_{gate}_{kind}" for k in range(3)
            for kind in ("weight", "bias") for gate in ("i2h", "h2h")]


def test_flops_per_token_counted_by_hand():
    """E = 3, H = 5, 2 layers, V = 7. A layer of h units over i inputs does 4h(i + h)
    multiply-adds per token, the decoder d x V; 2 FLOPs each, x3 for forward + backward.
    Tied:   layer 0 4*5*(3+5) = 160, layer 1 emits E: 4*3*(5+3) = 96, decoder 3*7 = 21;
            277 multiply-adds = 554 FLOPs forward, 1662 in all.
    Untied: 160, layer 1 4*5*(5+5) = 200, decoder 5*7 = 35;
            395 multiply-adds = 790 FLOPs forward, 2370 in all."""
    assert flops_per_token(3, 5, 2, 7, tied=True) == 1662
    assert flops_per_token(3, 5, 2, 7, tied=False) == 2370


def built(name, tied):
    """A preset's model with tied or untied weights (standard, untied: E = H), not
    initialized: every parameter's shape is fixed at construction."""
    m = dict(PRESETS[name], tie_weights=tied)
    if not tied and m["family"] == "standard":
        m["hidden_size"] = m["embed_size"]
    return m, build_model(ModelConfig(model=name, **m), V)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_the_built_model(name, tied):
    m, model = built(name, tied)
    params = model.collect_params().values()  # a tied matrix is one parameter
    assert param_count(m["embed_size"], m["hidden_size"], m["num_layers"], V, tied) == \
        sum(int(np.prod(p.shape)) for p in params)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_flops_are_six_per_weight_of_the_built_models_matrix_products(name, tied):
    """Each token multiplies through every LSTM weight matrix and the decoder's once
    (the embedding is a lookup): a multiply-add forward and two backward (input and
    weight gradients), 6 FLOPs per weight."""
    m, model = built(name, tied)
    lstm = [p for key, p in model.collect_params().items()
            if key.endswith(("i2h_weight", "h2h_weight"))]
    assert len(lstm) == 2 * m["num_layers"]
    weights = sum(int(np.prod(p.shape)) for p in lstm) + \
        int(np.prod(model.decoder[0].weight.shape))
    assert flops_per_token(m["embed_size"], m["hidden_size"], m["num_layers"], V, tied) == \
        6 * weights


def test_the_performance_docs_gpu_table_is_what_the_formulas_give():
    """docs/performance.md's MFLOP/token and parameter columns (tied weights, the
    WikiText-2 training vocabulary) and its range of FLOPs per gradient element."""
    text = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    ratios = []
    for name, m in PRESETS.items():
        row = re.search(rf"^\| {name} \| ([0-9.]+) \| ([0-9.]+) M \|", text, re.M)
        assert row, f"no row for {name}"
        args = (m["embed_size"], m["hidden_size"], m["num_layers"], 33278, True)
        assert float(row[1]) == round(flops_per_token(*args) / 1e6, 1), name
        assert float(row[2]) == round(param_count(*args) / 1e6, 2), name
        ratios.append(flops_per_token(*args) / param_count(*args))
    stated = re.search(r"per gradient element per token\s+\((\d\.\d\d)-(\d\.\d\d):", text)
    assert stated, "the range of FLOPs per gradient element is not where it was"
    assert (float(stated[1]), float(stated[2])) == (round(min(ratios), 2), round(max(ratios), 2))


ALLOC_PROBE = textwrap.dedent("""
    import resource, sys
    from dist_lm.runtime.launcher_env import configure_process
    configure_process()
    import mxnet as mx
    shape = (700, 13777)  # bptt 35 x 20 columns x the WikiText-2 valid vocabulary, 38.6 MB

    def step():
        buffer = mx.nd.ones(shape)  # allocated and every page written
        buffer.wait_to_read()
        del buffer
        mx.nd.waitall()             # freed

    for _ in range(10):             # the heap settles
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def page_faults_per_buffer(malloc: str) -> float:
    proc = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True,
                          env={"DIST_LM_MALLOC": malloc, "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


def test_allocator_setting_reuses_large_buffers():
    """A 38.6 MB buffer freed and allocated again: with glibc's defaults every page is
    mapped afresh (~9,400 faults); with configure_process() the memory is reused."""
    assert page_faults_per_buffer("system") > 9000
    assert page_faults_per_buffer("tuned") < 100


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_per_array_sgd_takes_gluons_sgd_steps(momentum):
    """dist.make_optimizer's CPU SGD (one sgd_update per array) against Gluon's stock SGD
    (aggregated multi_sgd_update): same weights and momentum after steps with weight decay,
    rescaling, a learning-rate change and a checkpoint-style state read."""
    from dist_lm.runtime.dist import make_optimizer

    rs = np.random.RandomState(3)
    shapes = [(30, 8), (8,), (5, 5, 4), (1,)]
    grads = [[rs.randn(*s).astype("float32") for s in shapes] for _ in range(4)]
    opts = dict(learning_rate=0.5, wd=1e-3, momentum=momentum, rescale_grad=0.5)

    def train(optimizer):
        params = gluon.ParameterDict()
        for i, s in enumerate(shapes):
            params.get(f"p{i}", shape=s, init=mx.init.Constant(0.1 * (i + 1)))
        params.initialize(ctx=mx.cpu())
        trainer = gluon.Trainer(params, optimizer, None if not isinstance(optimizer, str)
                                else opts, kvstore=None)
        for step, g in enumerate(grads):
            if step == 2:
                trainer.set_learning_rate(0.125)
            with autograd.record():  # d/dp sum(p * a) = a: the gradient is g
                total = mx.nd.add_n(*[(p.data() * mx.nd.array(a)).sum()
                                      for p, a in zip(params.values(), g)])
            total.backward()
            trainer.step(2)
        states = trainer._updaters[0].states
        return ([p.data().asnumpy() for p in params.values()],
                [states[i].asnumpy() for i in sorted(states) if states[i] is not None],
                trainer._optimizer.num_update)

    ours_w, ours_s, ours_n = train(make_optimizer("sgd", opts))
    stock_w, stock_s, stock_n = train("sgd")
    assert ours_n == stock_n == 4
    assert len(ours_s) == len(stock_s) == (len(shapes) if momentum else 0)
    for got, want in zip(ours_w + ours_s, stock_w + stock_s):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours_w[0], 0.1)  # the steps moved the weights


def test_global_norm_on_cpu_is_the_norm_of_all_elements():
    from dist_lm.runtime.dist import global_norm

    rs = np.random.RandomState(5)
    arrays = [rs.randn(*s).astype("float32") for s in [(40, 7), (7,), (3, 3, 3)]]
    want = np.sqrt(sum(float((a.astype("float64") ** 2).sum()) for a in arrays))
    got = global_norm([mx.nd.array(a) for a in arrays])
    assert got.shape == (1,)
    assert got.asscalar() == pytest.approx(want, rel=1e-6)


@pytest.mark.dist
def test_bench_measures_every_variant_in_one_invocation(heldout, tmp_path):
    """The benchmark's plumbing, not its figures: every variant runs, in its own processes,
    and lands in the table and the JSON with its rank count and allreduce columns."""
    variants = ["reference", "local", "hvd1", "hvd2-gloo", "hvd2-mpi", "pair2"]
    out = tmp_path / "bench.json"
    proc = dist_lm("bench", "--train-file", heldout, "--variants", ",".join(variants),
                   "--steps", "2", "--warmup", "1", "--repeats", "1", "--max-busy", "1",
                   "--json", out, timeout=420)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in variants}
    assert sorted(rows) == sorted(variants), proc.stdout
    results = json.loads(out.read_text())["results"]
    for variant in variants:
        assert results[variant]["median_tokens_per_s"] > 0
        assert results[variant]["ranks"] == (2 if variant in ("hvd2-gloo", "hvd2-mpi",
                                                              "pair2") else 1)
    assert len(results["pair2"]["tokens_per_s"]) == 1
    for variant in ("hvd2-gloo", "hvd2-mpi"):  # allreduce share and time, as measured
        assert rows[variant][-3].endswith("%") and float(rows[variant][-2]) > 0
    assert rows["pair2"][-3] == "-" and rows["local"][-3] == "-"  # nothing to all-reduce


def test_bench_rejects_an_unknown_variant(heldout):
    proc = dist_lm("bench", "--train-file", heldout, "--variants", "local,hvd3", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-lm: error: unknown variant(s) ['hvd3']; choose from "
        "reference, reference-tuned, local, hvd1, hvd2-gloo, hvd2-mpi, pair2"]


@pytest.mark.parametrize("clip_mode,nonfinite", [("global", "stop"), ("local", "stop")])
def test_a_training_step_never_waits_for_its_own_work(monkeypatch, clip_mode, nonfinite):
    """Stepper.step (forward, backward, norm, clip, update) only queues work: every way
    of reading a value back to the host fails here, except waiting for the previous
    step's loss (the bound that keeps the host within two steps of the device), and the
    step still runs."""
    from dist_lm.config import Config
    from dist_lm.runtime.dist import LocalWorld
    from dist_lm.training.stepper import Stepper

    cfg = Config(model=ModelConfig(model="standard_lstm_lm_200",
                                   **dict(PRESETS["standard_lstm_lm_200"], **DROPOUT_OFF)))
    cfg.optim.clip_mode, cfg.reliability.nonfinite = clip_mode, nonfinite
    model = build_model(cfg.model, V)
    model.initialize(mx.init.Xavier())
    stepper = Stepper(model, cfg, LocalWorld(), mx.cpu())
    states = model.begin_state(4, mx.cpu())
    (inputs, targets), = batches(n=1)
    inputs, targets = inputs.asnumpy(), targets.asnumpy()
    results = [stepper.step(inputs, targets, states)]  # the first call builds the graph

    def sync(*_args, **_kwargs):
        raise AssertionError("host sync in the training step")

    waited = []
    for name in ("asnumpy", "asscalar"):
        monkeypatch.setattr(mx.nd.NDArray, name, sync)
    monkeypatch.setattr(mx.nd.NDArray, "wait_to_read", lambda self: waited.append(self))
    monkeypatch.setattr(mx.nd, "waitall", sync)
    for _ in range(3):
        results.append(stepper.step(inputs, targets, states))
    monkeypatch.undo()
    # Each step waited once, for the loss the step before it returned.
    assert [id(a) for a in waited] == [id(r[0]) for r in results[:-1]]
    loss, norm, finite, _ = results[-1]
    assert np.isfinite(loss.asscalar()) and norm.asscalar() > 0 and finite.asscalar() == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "dist-lm: error: --steps must be at least 1, got 0"),
    (["--repeats", "0"], "dist-lm: error: --repeats must be at least 1, got 0"),
    (["--global-batch-size", "7"],
     "dist-lm: error: --global-batch-size must be even and positive (2-rank variants split it)"),
    (["--max-busy", "5"], "dist-lm: error: --max-busy is a fraction of the CPU, 0 to 1, got 5.0"),
    (["--timeout-s", "0"],
     "dist-lm: error: --timeout-s must be positive and --max-wait-s not negative"),
    (["--json", "/nonexistent-dir/bench.json"],
     "dist-lm: error: --json /nonexistent-dir/bench.json: its directory does not exist"),
])
def test_bench_rejects_bad_flags_before_measuring(heldout, flags, message):
    proc = dist_lm("bench", "--train-file", heldout, *flags, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]


def test_bench_refuses_a_sampled_softmax_below_1_before_building_the_cache(heldout, tmp_path):
    cache = tmp_path / "cache"
    proc = dist_lm("bench", "--train-file", heldout, "--sampled-softmax", "0",
                   "--variants", "local", "--cache-dir", cache, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == \
        ["dist-lm: error: --sampled-softmax must be at least 1, got 0"]
    assert not cache.exists()


@pytest.mark.parametrize("text,message", [
    ("", "is empty (no words)"),
    ("a few words only\n", "too few for one batch of 20 columns x 36 tokens"),
])
def test_bench_rejects_unusable_data_before_measuring(tmp_path, text, message):
    path = tmp_path / "train.tokens"
    path.write_text(text)
    proc = dist_lm("bench", "--train-file", path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-lm: error: ") and message in lines[0]


def _ranks_of(variant):
    """Pids of the bench's worker ranks for variant that are running now."""
    rank = f"^[^ ]*python[0-9.]* -m dist_lm.tools.bench --worker {variant}"  # not mpirun's line
    found = subprocess.run(["pgrep", "-f", rank], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.dist
def test_a_bench_measurement_that_overruns_fails_and_leaves_no_rank_behind(heldout):
    # Open MPI gives each rank a process group of its own: killing mpirun's group alone
    # would leave both ranks running. The ranks must be up before the deadline for the
    # test to mean anything, so the run is watched until they are.
    proc = subprocess.Popen(
        [str(BIN / "dist-lm"), "bench", "--train-file", str(heldout), "--variants", "hvd2-mpi",
         "--repeats", "1", "--max-busy", "1", "--steps", "5000", "--timeout-s", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"))
    try:
        deadline = time.monotonic() + 25
        while len(_ranks_of("hvd2-mpi")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        seen = _ranks_of("hvd2-mpi")
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert len(seen) == 2, "the two ranks never started"
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith(
        "dist-lm: error: bench: hvd2-mpi failed (no result within --timeout-s 25)")
    assert _ranks_of("hvd2-mpi") == [], "ranks left running"


def test_the_lstm_refuses_layouts_its_weight_packing_does_not_cover():
    from dist_lm.model import _LSTM

    with pytest.raises(ValueError, match="one-direction TNC LSTM"):
        _LSTM(8, 1, layout="NTC", input_size=4)
    with pytest.raises(ValueError, match="one-direction TNC LSTM"):
        _LSTM(8, 1, bidirectional=True, input_size=4)
