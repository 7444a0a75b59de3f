"""The AWD-LSTM recipe (docs/awd.md): AR/TAR against GluonNLP's blocks and AWDRNN, the
variable-length BPTT draw and its lr scaling, windows by token position, the interval lr
schedule, NT-ASGD's average, the recipe presets and bad values; then resume after SIGTERM
mid variable-length epoch and after the NT-ASGD switch (bit for bit), and 2 ranks against
one process under Gloo and MPI."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import gluonnlp as nlp
import mxnet as mx
import numpy as np
import pytest

from conftest import (BIN, data_args, dist_lm, launcher, max_param_diff, parse_config,
                      records, run, start, wait_for)
from dist_lm.data.bptt import FixedWindows, VariableWindows, draw_seq_len
from dist_lm.training.checkpoint import BASE_FORMAT, FORMAT_VERSION, Progress, format_of
from dist_lm.config import ModelConfig
from dist_lm.data.text import ColumnShard
from dist_lm.errors import UsageError
from dist_lm.model import build_model
from dist_lm.training.ntasgd import Averager
from dist_lm.presets import PRESETS
from dist_lm.training.regularize import (RegularizedTokenLoss, activation_reg,
                                         temporal_activation_reg)
from dist_lm.training.schedule import LRSchedule

V = 60
ZERO = dict(dropout=0.0, weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)
# A tiny AWD model (3 LSTM layers) for the training runs.
TINY_AWD = ["--model", "custom", "--family", "awd", "--embed-size", "16", "--hidden-size",
            "24", "--num-layers", "3", "--context", "cpu"]


# --- AR / TAR against GluonNLP -------------------------------------------------------------

def test_ar_and_tar_equal_gluonnlps_loss_blocks_on_the_same_tensors():
    rs = np.random.RandomState(0)
    raw = mx.nd.array(rs.randn(9, 4, 7))
    dropped = mx.nd.array(rs.randn(9, 4, 7) * 2)
    for alpha, beta in [(2.0, 1.0), (0.5, 3.0)]:
        ours = activation_reg(mx.nd, dropped, alpha).asscalar(), \
            temporal_activation_reg(mx.nd, raw, beta).asscalar()
        theirs = nlp.loss.ActivationRegularizationLoss(alpha)(dropped).asscalar(), \
            nlp.loss.TemporalActivationRegularizationLoss(beta)(raw).asscalar()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
        assert ours[0] > 1 and ours[1] > 1  # not vacuous


def awd(name=None, vocab=V, **overrides):
    fields = dict(PRESETS[name]) if name else dict(
        family="awd", embed_size=8, hidden_size=12, num_layers=3, tie_weights=True)
    model = build_model(ModelConfig(model=name or "custom", **dict(fields, **overrides)),
                        vocab)
    model.initialize(mx.init.Xavier())
    return model


def batch(t=7, b=3, seed=0):
    rs = np.random.RandomState(seed)
    return mx.nd.array(rs.randint(0, V, (t, b))), mx.nd.array(rs.randint(0, V, (t, b)))


def test_the_objective_equals_gluonnlps_script_on_awdrnns_encoder_outputs(tmp_path):
    """GluonNLP's training AWDRNN (dropouts off) on the same parameters: its output and
    encoder outputs, through the script's joint loss (CE + AR of the last dropped output +
    TAR of the last raw one), against our hybridized block's CE, terms and objective."""
    model = awd(**ZERO)
    rs = np.random.RandomState(1)
    for param in model.collect_params().values():  # activations large enough for AR/TAR
        param.set_data(mx.nd.array(rs.uniform(-1, 1, param.shape)))
    model.save_parameters(str(tmp_path / "p.params"))
    theirs = nlp.model.train.AWDRNN("lstm", V, 8, 12, 3, True, 0, 0, 0, 0, 0)
    theirs.initialize()
    theirs.load_parameters(str(tmp_path / "p.params"))
    inputs, targets = batch()
    out, _, raw, dropped = theirs(inputs, theirs.begin_state(batch_size=3, func=mx.nd.zeros))
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()(out.reshape(-3, -1), targets.reshape(-1))
    want = [ce.mean().asscalar(), nlp.loss.ActivationRegularizationLoss(2.0)(*dropped)
            .asscalar(), nlp.loss.TemporalActivationRegularizationLoss(1.0)(*raw).asscalar()]
    block = RegularizedTokenLoss(model, 2.0, 1.0)
    block.hybridize(static_alloc=True, static_shape=True)
    with mx.autograd.record():
        objective, got_ce, terms, _ = block(inputs, targets, model.begin_state(3, mx.cpu()))
    got = [got_ce.asscalar(), *terms.asnumpy()]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert min(want[1:]) > 1e-3, want  # the terms are not vacuous
    assert objective.asscalar() == pytest.approx(sum(want), rel=1e-5)


@pytest.mark.parametrize("name", ["awd_lstm_lm_600",
                                  pytest.param("awd_lstm_lm_1150", marks=pytest.mark.medium)])
def test_the_hybridized_awd_model_with_dropouts_off_equals_gluonnlps_awdrnn(name, tmp_path):
    model = awd(name, **ZERO)
    model.hybridize(static_alloc=True, static_shape=True)
    model.save_parameters(str(tmp_path / "p.params"))
    m = PRESETS[name]
    theirs = nlp.model.AWDRNN("lstm", V, m["embed_size"], m["hidden_size"], m["num_layers"],
                              m["tie_weights"], 0, 0, 0, 0, 0)
    theirs.initialize()
    theirs.load_parameters(str(tmp_path / "p.params"))
    inputs, _ = batch()
    with mx.autograd.record():  # training mode: dropouts (all 0) would be active
        mine, _ = model(inputs, model.begin_state(3, mx.cpu()))
        want, _ = theirs(inputs, theirs.begin_state(batch_size=3, func=mx.nd.zeros))
    np.testing.assert_allclose(mine.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-6)


# --- variable-length BPTT --------------------------------------------------------------------

def test_seq_len_draws_depend_only_on_seed_and_step():
    assert [draw_seq_len(3, s, 70) for s in range(50)] == \
        [draw_seq_len(3, s, 70) for s in range(50)]
    assert [draw_seq_len(3, s, 70) for s in range(50)] != \
        [draw_seq_len(4, s, 70) for s in range(50)]
    assert len({draw_seq_len(3, s, 70) for s in range(50)}) > 10


def test_seq_len_draws_follow_the_scripts_distribution():
    """bptt w.p. 0.95 else bptt/2, then max(5, int(N(that, 5))): compared with the script's
    own formula drawn from another generator, 20,000 steps each."""
    n, bptt = 20000, 70
    ours = np.array([draw_seq_len(1, s, bptt) for s in range(n)])
    rs = np.random.RandomState(0)
    base = np.where(rs.uniform(size=n) < 0.95, bptt, bptt / 2)
    script = np.maximum(5, rs.normal(base, 5).astype(int))
    for sample in (ours, script):
        half = sample < 0.75 * bptt
        assert 0.04 < half.mean() < 0.06
        assert sample[~half].mean() == pytest.approx(69.5, abs=0.15)  # int() truncates
        assert sample[~half].std() == pytest.approx(5.0, abs=0.15)
        assert sample[half].mean() == pytest.approx(34.5, abs=0.5)
    assert ours.mean() == pytest.approx(script.mean(), abs=0.25)
    small = np.array([draw_seq_len(1, s, 6) for s in range(2000)])
    assert small.min() == 5 and (small == 5).mean() > 0.4  # at least 5 tokens


def shard(rows=200, cols=3):
    ids = np.arange(rows * cols, dtype=np.int32)
    return ColumnShard(ids.reshape(cols, rows), bptt=10)


def test_variable_windows_walk_the_columns_by_token_as_the_script_does():
    """Positions advance by each window's length; the epoch ends where the script's
    `while i < len(train_data) - 1 - 1` does, the last window cut at the data's end."""
    data = shard()
    windows, p = VariableWindows(data, bptt=10, seed=5), Progress(position=0, rows=0)
    seen, expected_pos = [], 0
    while not windows.done(p):
        w = windows.next(p)
        n = draw_seq_len(5, p.step, 10)
        assert w.lr_scale == n / 10
        assert w.rows == min(n, data.length - 1 - p.position)
        np.testing.assert_array_equal(w.inputs, data.cols[:, p.position:p.position + w.rows].T)
        np.testing.assert_array_equal(w.targets,
                                      data.cols[:, p.position + 1:p.position + w.rows + 1].T)
        seen.append(w.rows)
        windows.advance(p, w)
        p.step += 1
        expected_pos += w.rows
        assert p.position == expected_pos == p.rows
    assert p.position >= data.length - 2 and p.position - seen[-1] < data.length - 2
    assert p.batch == len(seen) and min(seen[:-1]) >= 5 and seen[-1] >= 2
    # Fixed windows are the layout's batches, lr as scheduled.
    fixed = FixedWindows(data)
    w = fixed.next(Progress(batch=3))
    assert w.lr_scale == 1.0
    np.testing.assert_array_equal(w.inputs, data.batch(3)[0])


def train_here(*argv):
    from dist_lm.runtime.dist import LocalWorld
    from dist_lm.training.train import train

    return train(parse_config(*argv), LocalWorld())


def test_every_step_trains_the_drawn_length_at_the_scaled_lr(heldout, tmp_path, monkeypatch):
    from dist_lm.training.stepper import Stepper

    calls = []
    real = Stepper.step

    def spy(self, inputs, targets, states, lr=None, step=0):
        calls.append((step, inputs.shape, lr))
        return real(self, inputs, targets, states, lr, step)

    monkeypatch.setattr(Stepper, "step", spy)
    train_here(*data_args(heldout, heldout, heldout), *TINY_AWD, "--variable-bptt",
               "--batch-size", "20", "--bptt", "20", "--lr", "4", "--warmup-steps", "3",
               "--max-steps", "12", "--log-interval", "6", "--seed", "9", "--run-dir", tmp_path)
    assert [c[0] for c in calls] == list(range(12))
    for step, shape, lr in calls:
        n = draw_seq_len(9, step, 20)
        assert shape == (n, 20)
        scheduled = 4.0 * min(step + 1, 3) / 3  # the warm-up, then 4
        assert lr == pytest.approx(scheduled * n / 20, rel=1e-12)
    # Tokens logged: the rows actually trained, over the 20 columns.
    assert records(tmp_path, "train")[-1]["tokens"] == \
        20 * sum(draw_seq_len(9, s, 20) for s in range(12))


# --- the interval schedule ------------------------------------------------------------------

def test_the_interval_schedule_decays_after_that_many_stale_validations():
    s = LRSchedule(base=30.0, interval=3, factor=0.1)
    lrs = []
    for val in [5.0, 4.0, 4.1, 4.2, 4.3, 4.4, 3.9, 4.0, 4.0]:
        s.observe(val)
        lrs.append(s.lr(100))
    assert lrs == pytest.approx([30, 30, 30, 30, 3, 3, 3, 3, 3])
    again = LRSchedule(base=1.0)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again == s
    s.observe(4.5)  # the third stale one in a row since the best at 3.9
    assert s.lr(100) == pytest.approx(0.3)
    # The plateau schedule saves exactly what it always saved.
    assert set(LRSchedule(base=1.0).state_dict()) == {"base", "warmup_steps", "decay",
                                                      "current", "best_val"}


# --- NT-ASGD ---------------------------------------------------------------------------------

def dense():
    net = mx.gluon.nn.Dense(2, in_units=3)
    net.initialize(mx.init.Xavier())
    return net


def test_ntasgd_switches_on_the_non_monotone_condition():
    avg = Averager(dense(), nonmono=2)
    # Checks 0..2 never switch (t > n needs t >= 3); then v > min(all but the last 2).
    assert [avg.observe(v, step) for step, v in enumerate([5.0, 4.0, 6.0, 4.5])] == \
        [False, False, False, False]  # 4.5 is below min(5.0)
    assert avg.observe(3.0, 10) is False  # below min(5.0, 4.0)
    assert avg.observe(4.2, 11) is True   # 4.2 > min(5.0, 4.0, 6.0) = 4.0
    assert avg.trigger_step == 11 and avg.history == [5.0, 4.0, 6.0, 4.5, 3.0, 4.2]
    assert avg.observe(9.0, 12) is False and len(avg.history) == 6  # recorded until then


def test_the_average_is_the_mean_of_the_iterates_and_is_applied_then_put_back():
    net = dense()
    avg = Averager(net, nonmono=1)
    weight = net.weight.data()
    iterates = [weight.asnumpy().copy()]
    avg.history = [1.0, 1.0]
    assert avg.observe(2.0, step=4)  # switch after step 4: the average is theta_4
    for step in range(5, 9):
        weight[:] = weight + 0.5 * step
        iterates.append(weight.asnumpy().copy())
        avg.update(step)
    np.testing.assert_allclose(avg.average["weight"].asnumpy(), np.mean(iterates, axis=0),
                               rtol=1e-6)
    trained = weight.asnumpy().copy()
    with pytest.raises(RuntimeError):
        with avg.applied():
            np.testing.assert_array_equal(net.weight.data().asnumpy(),
                                          avg.average["weight"].asnumpy())
            raise RuntimeError("a stop during evaluation")
    np.testing.assert_array_equal(net.weight.data().asnumpy(), trained)
    # Checkpoint round trip: meta state and "average/<name>" arrays.
    again = Averager(net, nonmono=1)
    again.load_state_dict(json.loads(json.dumps(avg.state_dict())),
                          {k: v.asnumpy() for k, v in avg.arrays().items()}, mx.cpu())
    assert again.trigger_step == 4 and sorted(avg.arrays()) == ["average/bias",
                                                                "average/weight"]
    np.testing.assert_array_equal(again.average["weight"].asnumpy(),
                                  avg.average["weight"].asnumpy())


def test_a_tied_decoder_is_averaged_once_under_its_embedding_name():
    avg = Averager(awd(), nonmono=1)
    assert "embedding.0.weight" in avg.params and "decoder.0.weight" not in avg.params
    assert "decoder.0.bias" in avg.params


# --- checkpoints of the standard recipe are as before ----------------------------------------

def test_fixed_bptt_checkpoints_keep_format_2_and_their_keys():
    p = Progress(epoch=1, batch=3, step=40)
    assert set(p.state_dict()) == {"epoch", "batch", "step", "best_step", "test_loss"}
    meta = {"progress": p.state_dict(), "schedule": LRSchedule(base=1.0).state_dict()}
    assert format_of(meta) == BASE_FORMAT == 2
    meta["progress"] = Progress(position=0, rows=0).state_dict()
    assert format_of(meta) == FORMAT_VERSION == 3


# --- the recipe and its flags ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["awd_lstm_lm_600", "awd_lstm_lm_1150"])
def test_an_awd_model_brings_the_awd_recipe(name):
    cfg = parse_config("--model", name)
    o, r = cfg.optim, cfg.run
    assert (o.lr, o.wd, o.alpha, o.beta, o.clip) == (30.0, 1.2e-6, 2.0, 1.0, 0.25)
    assert (o.lr_update_interval, o.lr_update_factor) == (30, 0.1)
    assert (o.adam_beta1, o.adam_epsilon, o.optimizer) == (0.0, 1e-9, "sgd")
    assert (r.global_batch_size, r.bptt, r.variable_bptt) == (80, 70, True)
    assert (r.eval_batch_size, r.test_batch_size) == (10, 1)
    for key, value in PRESETS[name].items():  # the zoo's dropouts
        assert getattr(cfg.model, key) == value
    assert cfg.for_world(2).run.batch_size == 40 and cfg.for_world(4).run.batch_size == 20


def test_the_standard_recipe_is_unchanged_and_can_be_chosen_for_an_awd_model():
    for cfg in (parse_config(), parse_config("--model", "awd_lstm_lm_600", "--recipe", "standard")):
        assert (cfg.optim.lr, cfg.optim.wd, cfg.optim.alpha, cfg.optim.beta) == \
            (20.0, 0.0, 0.0, 0.0)
        assert (cfg.run.batch_size, cfg.run.global_batch_size, cfg.run.bptt,
                cfg.run.variable_bptt, cfg.run.eval_batch_size) == (20, None, 35, False, 20)
        assert cfg.optim.lr_update_interval is None and not cfg.optim.ntasgd
    # The AWD recipe on any model, flags over it, and a --batch-size of the user's.
    cfg = parse_config("--recipe", "awd", "--bptt", "50", "--ntasgd")
    assert (cfg.optim.lr, cfg.run.bptt, cfg.optim.ntasgd) == (30.0, 50, True)
    cfg = parse_config("--model", "awd_lstm_lm_600", "--batch-size", "16")
    assert (cfg.run.batch_size, cfg.run.global_batch_size) == (16, None)


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "-1"], "--alpha must be a non-negative number"),
    (["--beta", "nan"], "--beta must be a non-negative number"),
    (["--lr-update-interval", "0"], "--lr-update-interval must be a positive integer"),
    (["--lr-update-factor", "0"], "--lr-update-factor must be a positive number"),
    (["--adam-beta1", "1"], r"--adam-beta1 must be in \[0, 1\)"),
    (["--adam-epsilon", "0"], "--adam-epsilon must be a positive number"),
    (["--ntasgd-nonmono", "0"], "--ntasgd-nonmono must be a positive integer"),
    (["--ntasgd", "--optimizer", "adam"], "--ntasgd averages SGD iterates"),
    (["--alpha", "2", "--sampled-softmax", "100"], "--alpha/--beta regularize"),
    (["--recipe", "bert"], "invalid choice"),
])
def test_bad_awd_values_are_refused_with_one_line(argv, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_config(*argv)
    assert "\n" not in str(err.value)


def test_a_bad_awd_value_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = dist_lm("train", *data_args(), *TINY_AWD, "--ntasgd-nonmono", "-2",
                   "--run-dir", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-lm: error: --ntasgd-nonmono must be a positive integer, got -2"]


def test_a_resume_that_would_lose_the_recipes_state_is_refused(heldout, tmp_path):
    common = [*data_args(heldout, heldout, heldout), *TINY_AWD, "--batch-size", "4",
              "--max-steps", "2", "--log-interval", "1"]
    train_here(*common, "--variable-bptt", "--ntasgd", "--run-dir", tmp_path)
    for flags, message in [(["--no-variable-bptt", "--ntasgd"],
                            "trained with --variable-bptt; resume it with --variable-bptt"),
                           (["--variable-bptt"], "holds an NT-ASGD state; resume it with "
                                                 "--ntasgd")]:
        with pytest.raises(UsageError, match=message):
            train_here(*common, *flags, "--max-steps", "3", "--resume", "auto",
                       "--run-dir", tmp_path)


# --- resume after SIGTERM, bit for bit ----------------------------------------------------------


def rare_word_text(train, tmp_path):
    """Validation text of one word seen once in training: it gets less likely as the model
    learns the word distribution, so validation gets worse and NT-ASGD switches."""
    from collections import Counter

    counts = Counter(Path(train).read_text().split())
    word = sorted(w for w, c in counts.items() if c == 1)[0]
    path = tmp_path / "rare.txt"
    path.write_text((word + " ") * 2000 + "\n")
    return path


# Dropouts on (the masks must be reproduced too), AR/TAR, variable-length BPTT.
AWD_FLAGS = ["--recipe", "awd", "--global-batch-size", "20", "--bptt", "35", "--lr", "2",
             "--dropout", "0.2", "--drop-h", "0.1", "--drop-i", "0.1", "--drop-e", "0.05",
             "--weight-drop", "0.2", "--log-interval", "5"]
SCENARIOS = {
    # Inside the first epoch (about 37 steps); the runs end paused inside the second.
    "mid-variable-epoch": (["--epochs", "2", "--max-steps", "45"], r"Batch 10/", 10, 37),
    # After NT-ASGD switched at the end of epoch 2 (validation only gets worse), inside
    # epoch 3, the last.
    "after-ntasgd-switch": (["--epochs", "4", "--ntasgd", "--ntasgd-nonmono", "1"],
                            r"(?s)switching to NT-ASGD.*\[Epoch 3 Batch 5/", 0, None),
}


@pytest.mark.medium
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sigterm_then_resume_equals_an_uninterrupted_run(scenario, heldout, tmp_path):
    extra, pattern, low, high = SCENARIOS[scenario]
    valid = rare_word_text(heldout, tmp_path) if scenario == "after-ntasgd-switch" else heldout
    data = data_args(heldout, valid, heldout)

    def args(name, *more):
        return [BIN / "dist-lm", "train", *data, *TINY_AWD, *AWD_FLAGS, *extra,
                "--run-dir", tmp_path / name, *more]

    whole = run(args("whole"), timeout=300)
    assert whole.returncode == 0, whole.stderr
    log = tmp_path / "part.log"
    proc = start(args("part"), log)
    wait_for(log, pattern, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("did not stop within 30 s of SIGTERM")
    text = log.read_text()
    assert code == 143 and "checkpoint written" in text, text
    newest = sorted((tmp_path / "part" / "checkpoints").iterdir())[-1]
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["format_version"] == 3 and 0 < meta["progress"]["position"]
    assert low <= meta["step"] < (high or 10 ** 9)
    if scenario == "after-ntasgd-switch":
        assert meta["average"]["trigger_step"] is not None, meta["average"]

    again = run(args("part", "--resume", "auto"), timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("final.params", "best.params"):
        if (tmp_path / "whole" / name).exists():
            assert (tmp_path / "whole" / name).read_bytes() == \
                (tmp_path / "part" / name).read_bytes(), name
    for kind, key in [("train", "train/loss"), ("train", "train/ar"), ("valid", "val/loss")]:
        a = [(r["step"], r[key]) for r in records(tmp_path / "whole", kind)]
        b = [(r["step"], r[key]) for r in records(tmp_path / "part", kind)]
        if kind == "valid":
            assert a == b and len(a) >= 2, (key, a, b)
        else:
            assert [s for s, _ in a] == [s for s, _ in b]
            assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6), key
    if scenario == "after-ntasgd-switch":
        switched = [[(r["step"], r["ntasgd/trigger_step"]) for r in records(d, "ntasgd")]
                    for d in (tmp_path / "whole", tmp_path / "part")]
        assert switched[0] == switched[1] and len(switched[0]) == 1, switched
        # final.params is the average, not the trained parameters the checkpoint holds,
        # and the last validation was of it.
        newest = sorted((tmp_path / "part" / "checkpoints").iterdir())[-1]
        assert max_param_diff(newest / "model.params", tmp_path / "part" / "final.params") > 0
        proc = dist_lm("eval", "--run-dir", tmp_path / "part", "--params", "final",
                       "--test-file", valid, "--columns", "10", "--context", "cpu")
        assert proc.returncode == 0, proc.stderr
        loss = float(re.search(r"test loss ([0-9.]+)", proc.stdout).group(1))
        assert loss == pytest.approx(records(tmp_path / "part", "valid")[-1]["val/loss"],
                                     abs=1e-4)


@pytest.mark.medium
def test_until_it_switches_ntasgd_is_the_recipes_run_bit_for_bit(heldout, tmp_path):
    """Before the trigger fires (it cannot before check n + 2) NT-ASGD takes, evaluates and
    saves exactly what the recipe without it does: a budget too short for a switch gives
    one run, not two."""
    def train(name, *more):
        proc = run([BIN / "dist-lm", "train", *data_args(heldout, heldout, heldout), *TINY_AWD,
                    *AWD_FLAGS, "--epochs", "3", "--run-dir", tmp_path / name, *more],
                   timeout=300)
        assert proc.returncode == 0, proc.stderr
        return tmp_path / name

    plain, nt = train("plain"), train("ntasgd", "--ntasgd", "--ntasgd-nonmono", "5")
    assert records(nt, "ntasgd") == []
    for name in ("final.params", "best.params"):
        assert (plain / name).read_bytes() == (nt / name).read_bytes(), name

    def numbers(run_dir, kind):  # what a record says about the model, not the clock
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith(
            ("throughput/", "system/", "time/"))} for r in records(run_dir, kind)]

    assert numbers(plain, "train") == numbers(nt, "train")
    assert numbers(plain, "valid") == numbers(nt, "valid") and len(numbers(nt, "valid")) == 3


# --- N ranks == 1 process with the global batch ----------------------------------------------

# Every regularizer of the recipe on: drop_e, drop_i, drop_h, weight drop, output dropout,
# AR/TAR, variable-length BPTT, and NT-ASGD, which switches at the end of epoch 2 (the
# validation text only gets worse, rare_word_text); the distributed suite's small lr and
# active clipping. Activation masks belong to columns and weight masks to steps, so every
# rank count draws one process's masks.
DIST = ["--recipe", "awd", "--global-batch-size", "20", "--bptt", "35", "--lr", "1",
        "--clip", "0.1", "--dropout", "0.2", "--drop-h", "0.1", "--drop-i", "0.1",
        "--drop-e", "0.05", "--weight-drop", "0.2", "--alpha", "2", "--beta", "1",
        "--epochs", "4", "--ntasgd", "--ntasgd-nonmono", "1", "--log-interval", "10"]


def awd_cmd(heldout, valid, *extra):
    return [BIN / "dist-lm", "train", *data_args(heldout, valid, heldout), *TINY_AWD, *DIST,
            *extra]


@pytest.fixture(scope="module")
def awd_one_process(tmp_path_factory, heldout):
    out = tmp_path_factory.mktemp("awd-one")
    valid = rare_word_text(heldout, out)
    proc = run(awd_cmd(heldout, valid, "--run-dir", out / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(records(out / "run", "ntasgd")) == 1  # the switch happened
    return out


@pytest.mark.dist
@pytest.mark.medium
@pytest.mark.parametrize("controller,ranks", [("gloo", 2), ("mpi", 3)])
def test_n_ranks_with_every_regularizer_and_ntasgd_take_one_process_steps(
        controller, ranks, awd_one_process, heldout, tmp_path):
    one = awd_one_process / "run"
    proc = run(launcher(controller, ranks, *awd_cmd(
        heldout, awd_one_process / "rare.txt", "--check-sync-interval", "25",
        "--run-dir", tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("final.params", "best.params"):
        assert max_param_diff(one / name, tmp_path / name) < 1e-5, name
    # The same objective was logged, NT-ASGD switched at the same step, and the recipe's
    # global evaluation layouts were kept.
    a, b = records(one, "train"), records(tmp_path, "train")
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a] and len(a) > 10
    for key in ("train/loss", "train/ar", "train/tar"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4), key
    assert [r["step"] for r in records(tmp_path, "ntasgd")] == \
        [r["step"] for r in records(one, "ntasgd")]
    assert json.loads((tmp_path / "run.json").read_text())["eval_columns"] == \
        {"valid": 10, "test": 1}
