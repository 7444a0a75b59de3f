"""Every dropout mask of the models is applied on the CPU, drawn from MXNet's generator as
seeded by (seed, rank, step): different on every rank, the same again after a resume.

MXNet 1.9.1's default CPU LSTM kernel (oneDNN) ignores the fused RNN operator's dropout
between layers; these tests run with that kernel, as every CPU run does.
"""

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from dist_lm.config import ModelConfig
from dist_lm.model import TokenLoss, _LSTM, build_model
from dist_lm.presets import PRESETS
from dist_lm.training.stepper import reseed

V = 200


def make(name="standard_lstm_lm_200", seed=3, **overrides):
    mx.random.seed(seed)
    cfg = ModelConfig(model=name, **dict(PRESETS[name], embed_size=24, hidden_size=24,
                                         **overrides))
    model = build_model(cfg, V)
    model.initialize(mx.init.Xavier())
    return model


def inputs(t=7, b=4):
    return mx.nd.array(np.random.RandomState(0).randint(0, V, (t, b)))


def encoder_out(lstm, x, train: bool, seed=None):
    """The stack's output (T, B, H) in training or predict mode."""
    if seed is not None:
        mx.random.seed(seed)
    states = lstm.begin_state(x.shape[1], func=mx.nd.zeros)
    with mx.autograd.record(train_mode=train):
        out, _ = lstm(x, states)
    return out.asnumpy()


@pytest.mark.parametrize("hybrid", [False, True])
def test_dropout_between_lstm_layers_is_applied_on_the_cpu(hybrid):
    """Only the between-layer dropout is in play: the stack alone, 2 layers, p = 0.5."""
    lstm = _LSTM(24, 2, dropout=0.5, input_size=16)
    lstm.initialize(mx.init.Xavier())
    if hybrid:
        lstm.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.array(np.random.RandomState(1).randn(7, 4, 16))
    predict = encoder_out(lstm, x, train=False)
    a, a_again = encoder_out(lstm, x, True, seed=11), encoder_out(lstm, x, True, seed=11)
    b = encoder_out(lstm, x, True, seed=12)
    assert np.abs(a - predict).max() > 1e-3   # training mode drops out
    assert np.abs(a - b).max() > 1e-3         # the mask depends on the seed
    np.testing.assert_array_equal(a, a_again)  # and only on the seed
    np.testing.assert_array_equal(predict, encoder_out(lstm, x, train=False))


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_stack_in_predict_mode_is_the_fused_stack(hybrid):
    """Layer by layer (dropout > 0) computes what one fused call computes: outputs and
    final states, and (imperatively) the gradients of every weight. MXNet 1.9.1 cannot
    run a backward pass recorded in predict mode through a static-alloc graph that holds
    a Dropout ('vector::_M_range_check'); training never does, so the hybridized case
    checks the forward pass only."""
    runs = []
    for p in (0.5, 0.0):
        mx.random.seed(4)
        lstm = _LSTM(24, 3, dropout=p, input_size=16)
        lstm.initialize(mx.init.Xavier())
        if hybrid:
            lstm.hybridize(static_alloc=True, static_shape=True)
        x = mx.nd.array(np.random.RandomState(0).randn(5, 3, 16))
        states = [mx.nd.array(np.random.RandomState(i).randn(3, 3, 24)) for i in (1, 2)]
        if hybrid:
            out, new_states = lstm(x, states)
            runs.append([out.asnumpy()] + [s.asnumpy() for s in new_states])
            continue
        with mx.autograd.record(train_mode=False):
            out, new_states = lstm(x, states)
            total = (out * out).sum() + sum((s * s).sum() for s in new_states)
        total.backward()
        runs.append([out.asnumpy()] + [s.asnumpy() for s in new_states]
                    + [q.grad().asnumpy() for q in lstm.collect_params().values()])
    assert len(runs[0]) == len(runs[1])
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["standard_lstm_lm_200", "awd_lstm_lm_600"])
def test_every_mask_differs_across_ranks_and_repeats_on_resume(name):
    """What the training loop does before a step with dropout: reseed(seed, rank, step).
    Each of the model's dropouts alone (the others off) must give rank 0 and rank 1
    different outputs at the same step, and the same output again for the same
    (seed, rank, step), as a resumed run draws it."""
    zero = dict(dropout=0.0, weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)
    knobs = ["dropout"] if name.startswith("standard") else list(zero)
    for knob in knobs:
        model = make(name, **dict(zero, **{knob: 0.4}))
        block = TokenLoss(model)
        block.hybridize(static_alloc=True, static_shape=True)
        x = inputs()

        def loss(rank, step):
            reseed(7, rank, step)
            with mx.autograd.record():
                return block(x, x, model.begin_state(4, mx.cpu()))[0].asscalar()

        first = loss(0, 5)
        assert loss(1, 5) != first, knob
        assert loss(0, 6) != first, knob
        assert loss(0, 5) == first, knob


@pytest.mark.medium
def test_resuming_a_checkpoint_of_the_earlier_scheme_says_the_model_changes(
        heldout, tmp_path, capsys):
    """A checkpoint written before the stack drew its own dropout trained without it on a
    CPU: resuming one says, in one line, that the run goes on with it."""
    from conftest import TINY, data_args
    from dist_lm.cli import main
    from dist_lm.training.checkpoint import EARLIER_RNG_SCHEME, list_checkpoints

    run = [*data_args(heldout, heldout, heldout), *TINY, "--num-layers", "2", "--dropout",
           "0.2", "--checkpoint-steps", "5", "--run-dir", str(tmp_path / "run")]
    assert main(["train", *run, "--max-steps", "5"]) == 0
    capsys.readouterr()
    assert main(["train", *run, "--resume", "auto", "--max-steps", "6"]) == 0
    assert "earlier dist-lm" not in capsys.readouterr().err  # this scheme's checkpoint

    meta_file = Path(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1]) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["meta_sha256"]  # as that dist-lm wrote it: no digest of its own
    meta_file.write_text(json.dumps(dict(meta, rng=EARLIER_RNG_SCHEME)))
    assert main(["train", *run, "--resume", "auto", "--max-steps", "7"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "earlier dist-lm" in line]
    assert len(warned) == 1 and warned[0].startswith("dist-lm: warning: the checkpoint at "
                                                     "step 6 was written by an earlier")
