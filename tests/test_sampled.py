"""The sampled softmax (--sampled-softmax K) and the touched-rows gradient exchange
(--exchange rows): the sampler's distribution and reproducibility, the loss against
GluonNLP's sampled block on the same tensors, which rows get gradient, what the run logs,
bad values, resume, and 2 ranks against one process under Gloo and MPI."""


import mxnet as mx
import numpy as np
import pytest

from conftest import (BIN, TINY, VALID, data_args, dist_lm, launcher, max_param_diff,
                      parse_config, records, run)
from dist_lm.config import ModelConfig
from dist_lm.model import LSTMLM, SampledTokenLoss
from dist_lm.training.sampling import LogUniformSampler


# --- the sampler -------------------------------------------------------------------------

def test_candidates_are_distinct_and_depend_only_on_seed_and_step():
    sampler = LogUniformSampler(5000, 300, seed=7)
    a, b = sampler.draw(12), LogUniformSampler(5000, 300, seed=7).draw(12)
    assert len(set(a.ids.tolist())) == 300 and a.ids.min() >= 0 and a.ids.max() < 5000
    assert np.array_equal(a.ids, b.ids) and a.num_tries == b.num_tries
    assert not np.array_equal(a.ids, sampler.draw(13).ids)
    assert not np.array_equal(a.ids, LogUniformSampler(5000, 300, seed=8).draw(12).ids)
    assert a.num_tries >= 300


def test_expected_counts_match_how_often_ids_are_drawn():
    """The correction subtracts log(expected count): over many steps, the share of steps
    that draw an id must equal the mean expected count the sampler reports for it."""
    sampler = LogUniformSampler(1000, 50, seed=3)
    probe = np.array([0, 1, 5, 30, 200, 900])
    seen = np.zeros(len(probe))
    expected = np.zeros(len(probe))
    steps = 3000
    for step in range(steps):
        drawn = sampler.draw(step)
        seen += np.isin(probe, drawn.ids)
        expected += np.exp(sampler.log_expected(probe, drawn.num_tries))
    seen, expected = seen / steps, expected / steps
    # Binomial standard error at 3000 steps is at most 0.009.
    assert np.abs(seen - expected).max() < 0.03, (seen, expected)
    assert seen[0] > 0.9 and seen[-1] < 0.2  # frequent ids are drawn far more often


# --- the loss ----------------------------------------------------------------------------

def small_model(tie: bool, vocab=60):
    cfg = ModelConfig(model="custom", embed_size=8, hidden_size=8, num_layers=1,
                      tie_weights=tie, dropout=0.0)
    model = LSTMLM(cfg, vocab)
    model.initialize(mx.init.Xavier())
    return model


def batch(vocab=60, steps=5, cols=3, k=12, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, size=(steps, cols))
    sampler = LogUniformSampler(vocab, k, seed)
    drawn = sampler.draw(0)
    targets = rng.integers(0, vocab, size=(steps, cols))
    targets[0, :] = drawn.ids[:cols]  # accidental hits, certainly
    return inputs, targets, sampler, drawn


@pytest.mark.parametrize("tie", [True, False])
def test_sampled_loss_equals_gluonnlps_sampled_block(tie):
    from gluonnlp.model.sampled_block import _SampledDenseHelper

    model = small_model(tie)
    inputs, targets, sampler, drawn = batch()
    nd = lambda a: mx.nd.array(a, dtype="float32")  # noqa: E731
    states = model.begin_state(3, mx.cpu())
    ours, _ = SampledTokenLoss(model, 12)(
        nd(inputs), nd(targets), states, nd(drawn.ids),
        nd(sampler.log_expected(targets, drawn.num_tries)), nd(drawn.log_expected))

    x, _ = model.features(mx.nd, nd(inputs), states)               # (T, B, E)
    w, b = model.decoder[0].weight.data(), model.decoder[0].bias.data()
    label = nd(targets.reshape(-1))
    w_all = mx.nd.concat(w.take(nd(drawn.ids)), w.take(label), dim=0)
    b_all = mx.nd.concat(b.take(nd(drawn.ids)), b.take(label), dim=0)
    expected_sampled = mx.nd.array(np.exp(drawn.log_expected.astype(np.float64)))
    expected_true = mx.nd.array(np.exp(sampler.log_expected(targets, drawn.num_tries)
                                       .astype(np.float64)).reshape(-1))
    helper = _SampledDenseHelper(60, 12, 8, remove_accidental_hits=True, sparse_label=True)
    pred, new_label = helper(x.reshape((-1, 8)), (nd(drawn.ids), expected_sampled,
                                                  expected_true), label, w_all, b_all)
    theirs = mx.gluon.loss.SoftmaxCrossEntropyLoss()(pred, new_label).mean()
    np.testing.assert_allclose(ours.asscalar(), theirs.asscalar(), rtol=1e-5)


def test_a_sampled_step_needs_its_step_number():
    """A default step would draw the same candidates at every step."""
    from dist_lm.runtime.dist import LocalWorld
    from dist_lm.training.stepper import Stepper

    cfg = parse_config(*TINY, "--sampled-softmax", "12")
    model = LSTMLM(cfg.model, 60)
    model.initialize(mx.init.Xavier())
    stepper = Stepper(model, cfg, LocalWorld(), mx.cpu())
    inputs, targets, _, _ = batch()
    with pytest.raises(ValueError, match="need the step number"):
        stepper.step(inputs, targets, model.begin_state(3, mx.cpu()))
    loss, *_ = stepper.step(inputs, targets, model.begin_state(3, mx.cpu()), None, 0)
    assert np.isfinite(loss.asscalar())


def test_only_the_touched_rows_of_the_decoder_get_gradient():
    """What --exchange rows relies on: the tied matrix's gradient is zero outside the
    step's inputs, targets and candidates."""
    model = small_model(True)
    inputs, targets, sampler, drawn = batch()
    nd = lambda a: mx.nd.array(a, dtype="float32")  # noqa: E731
    block = SampledTokenLoss(model, 12)
    with mx.autograd.record():
        loss, _ = block(nd(inputs), nd(targets), model.begin_state(3, mx.cpu()),
                        nd(drawn.ids), nd(sampler.log_expected(targets, drawn.num_tries)),
                        nd(drawn.log_expected))
    loss.backward()
    grad = np.abs(model.decoder[0].weight.grad().asnumpy()).sum(axis=1)
    touched = np.unique(np.concatenate([inputs.ravel(), targets.ravel(), drawn.ids]))
    untouched = np.setdiff1d(np.arange(60), touched)
    assert len(untouched) > 0 and (grad[untouched] == 0).all()
    assert (grad[touched] > 0).mean() > 0.9


# --- runs --------------------------------------------------------------------------------

RECIPE = ["--dropout", "0", "--lr", "1", "--clip", "0.1", "--max-steps", "20",
          "--log-interval", "10", "--epochs", "1", "--sampled-softmax", "256"]


def train_cmd(heldout, *extra):
    return [BIN / "dist-lm", "train", *data_args(VALID, heldout, heldout), *TINY, *RECIPE,
            *extra]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, heldout):
    out = tmp_path_factory.mktemp("sampled-one")
    proc = run(train_cmd(heldout, "--batch-size", "20", "--run-dir", out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.medium
def test_a_sampled_run_logs_its_objective_apart_and_validates_with_the_full_softmax(
        one_process):
    out, proc = one_process
    assert "sampled-softmax loss" in proc.stdout and "] loss" not in proc.stdout
    train = records(out, "train")
    assert train and all("train/sampled_loss" in r and "train/ppl" not in r for r in train)
    # The pause's validation is the full softmax: its loss is above the sampled objective.
    (valid,) = records(out, "valid")
    assert valid["val/loss"] > train[-1]["train/sampled_loss"]


@pytest.mark.medium
def test_a_sampled_run_cut_by_max_steps_resumes_exactly(heldout, tmp_path, one_process):
    out, _ = one_process
    chunks = tmp_path / "chunks"
    for steps in ("8", "20"):
        proc = run(train_cmd(heldout, "--batch-size", "20", "--run-dir", chunks,
                             "--resume", "auto", "--max-steps", steps), timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert (chunks / "final.params").read_bytes() == (out / "final.params").read_bytes()


@pytest.mark.medium
@pytest.mark.parametrize("value,message", [
    ("0", "--sampled-softmax must be a positive integer"),
    ("-3", "--sampled-softmax must be a positive integer"),
    ("100000000", "must be between 1 and half the vocabulary"),
])
def test_a_bad_sample_count_is_one_line_and_exit_2(value, message, heldout, tmp_path):
    proc = dist_lm("train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "1",
                   "--sampled-softmax", value, "--run-dir", tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.medium
def test_row_exchange_needs_the_sampled_softmax(heldout, tmp_path):
    proc = dist_lm("train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "1",
                   "--exchange", "rows", "--run-dir", tmp_path)
    assert proc.returncode == 2 and "--exchange rows needs --sampled-softmax" in proc.stderr


@pytest.mark.dist
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("exchange", ["dense", "rows"])
def test_two_ranks_with_sampled_softmax_take_one_process_steps(
        controller, exchange, one_process, heldout, tmp_path):
    """Every rank scores against the same candidates, so 2 x 10 columns take the steps of
    1 x 20; the touched-rows exchange gives the dense allreduce's result."""
    out, _ = one_process
    proc = run(launcher(controller, 2, *train_cmd(
        heldout, "--batch-size", "10", "--exchange", exchange, "--check-sync-interval", "1",
        "--run-dir", tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert max_param_diff(out / "final.params", tmp_path / "final.params") < 2e-6
