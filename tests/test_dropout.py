"""Dropout masks belong to columns of the global batch, not to ranks.

Activation masks are drawn per (seed, site, step, global column) on the host
(dist_lm/training/masks.py) and multiplied in by the model; weight-level masks (drop_e,
weight_drop) come from MXNet's generator seeded by (seed, step) alone. So a rank holding
columns [a, b) applies exactly the masks one process holding all G columns applies to
them. MXNet 1.9.1's default CPU LSTM kernel (oneDNN) ignores the fused RNN operator's
dropout between layers; these tests run with that kernel, as every CPU run does.
"""

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from dist_lm.config import ModelConfig
from dist_lm.model import MaskSite, TokenLoss, _LSTM, build_model
from dist_lm.presets import PRESETS
from dist_lm.training.masks import ColumnMasks
from dist_lm.training.stepper import reseed

V = 200
ZERO = dict(dropout=0.0, weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)


def make(name="standard_lstm_lm_200", seed=3, **overrides):
    mx.random.seed(seed)
    cfg = ModelConfig(model=name, **dict(PRESETS[name], embed_size=24, hidden_size=24,
                                         **overrides))
    model = build_model(cfg, V)
    model.initialize(mx.init.Xavier())
    return model


def inputs(t=7, b=4):
    return mx.nd.array(np.random.RandomState(0).randint(0, V, (t, b)))


def stack_out(lstm, x, between):
    """The stack's output (T, B, H), with masks between its layers or none."""
    states = lstm.begin_state(x.shape[1], func=mx.nd.zeros)
    with mx.autograd.record():
        out, _ = lstm(x, states, between)
    return out.asnumpy()


@pytest.mark.parametrize("hybrid", [False, True])
def test_masks_between_lstm_layers_are_applied_on_the_cpu(hybrid):
    """The stack alone, 2 layers: a mask of p = 0.5 changes the output, a mask of ones
    gives the fused stack's output."""
    lstm = _LSTM(24, 2, input_size=16)
    lstm.initialize(mx.init.Xavier())
    if hybrid:
        lstm.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.array(np.random.RandomState(1).randn(7, 4, 16))
    mask = ColumnMasks([MaskSite("between0", 0.5, 24, True)], 1, 0).draw(0, 7, 4)[0]
    dropped = stack_out(lstm, x, [mx.nd.array(mask)])
    kept = stack_out(lstm, x, [mx.nd.ones((7, 4, 24))])
    fused = _LSTM(24, 2, input_size=16, params=lstm.collect_params())
    whole = stack_out(fused, x, None)
    assert np.abs(dropped - kept).max() > 1e-3
    np.testing.assert_allclose(kept, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_stack_layer_by_layer_is_the_fused_stack(hybrid):
    """Layer by layer (masks of ones) computes what one fused call computes: outputs and
    final states, and the gradients of every weight."""
    runs = []
    for between in ([mx.nd.ones((5, 3, 24))] * 2, None):
        mx.random.seed(4)
        lstm = _LSTM(24, 3, input_size=16)
        lstm.initialize(mx.init.Xavier())
        if hybrid:
            lstm.hybridize(static_alloc=True, static_shape=True)
        x = mx.nd.array(np.random.RandomState(0).randn(5, 3, 16))
        states = [mx.nd.array(np.random.RandomState(i).randn(3, 3, 24)) for i in (1, 2)]
        with mx.autograd.record():
            out, new_states = lstm(x, states, between)
            total = (out * out).sum() + sum((s * s).sum() for s in new_states)
        total.backward()
        runs.append([out.asnumpy()] + [s.asnumpy() for s in new_states]
                    + [q.grad().asnumpy() for q in lstm.collect_params().values()])
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


SITES = [MaskSite("embedding", 0.3, 5, True), MaskSite("output", 0.4, 6, False)]


def test_a_ranks_masks_are_its_columns_of_the_one_process_masks():
    """Any split of G = 7 columns into contiguous blocks gives each block exactly the
    masks one process draws for those columns, at every step and window length."""
    for step, steps in [(0, 9), (41, 3)]:
        whole = ColumnMasks(SITES, 5, 0).draw(step, steps, 7)
        for first, count in [(0, 3), (3, 4), (6, 1)]:
            part = ColumnMasks(SITES, 5, first).draw(step, steps, count)
            for got, want in zip(part, whole):
                np.testing.assert_array_equal(got, want[:, first:first + count])
    assert [m.shape for m in whole] == [(3, 7, 5), (1, 7, 6)]


def test_masks_depend_on_seed_step_site_and_column_and_have_the_rate():
    masks = ColumnMasks(SITES, 5, 0)
    a, b = masks.draw(3, 10, 400), masks.draw(4, 10, 400)
    np.testing.assert_array_equal(a[0], masks.draw(3, 10, 400)[0])  # the same on resume
    assert not np.array_equal(a[0], b[0])                       # another step
    assert not np.array_equal(a[0], ColumnMasks(SITES, 6, 0).draw(3, 10, 400)[0])  # seed
    assert not np.array_equal(a[0][:, 0], a[0][:, 1])           # another column
    different = ColumnMasks([MaskSite("between0", 0.3, 5, True)], 5, 0).draw(3, 10, 400)
    assert not np.array_equal(a[0], different[0])               # another site
    for site, mask in zip(SITES, a):
        assert set(np.unique(mask)) == {0.0, np.float32(1 / (1 - site.p))}
        assert abs((mask == 0).mean() - site.p) < 0.02


@pytest.mark.parametrize("name", ["standard_lstm_lm_200", "awd_lstm_lm_600"])
def test_every_activation_dropout_is_a_site_and_changes_the_training_loss(name):
    """Each of the model's activation dropouts alone is one mask site; training with its
    mask differs from predict mode, and masks of ones give predict mode's loss."""
    knobs = ["dropout"] if name.startswith("standard") else ["dropout", "drop_h", "drop_i"]
    x = inputs()
    for knob in knobs:
        model = make(name, **dict(ZERO, **{knob: 0.4}))
        sites = model.mask_sites()
        assert sites and all(site.p == 0.4 for site in sites)
        block = TokenLoss(model)
        block.hybridize(static_alloc=True, static_shape=True)
        masks = ColumnMasks(sites, 7, 0).draw(5, 7, 4)

        def loss(masks):
            with mx.autograd.record():
                return block(x, x, model.begin_state(4, mx.cpu()),
                             *[mx.nd.array(m) for m in masks])[0].asscalar()

        plain = TokenLoss(model)
        predict = plain(x, x, model.begin_state(4, mx.cpu()))[0].asscalar()
        assert loss(masks) != pytest.approx(predict, abs=1e-6), knob
        assert loss([np.ones_like(m) for m in masks]) == pytest.approx(predict, abs=1e-6)


@pytest.mark.parametrize("knob", ["weight_drop", "drop_e"])
def test_a_weight_mask_is_the_same_for_every_block_of_columns(knob):
    """A weight-level mask belongs to the step, not to the columns: after reseed(seed,
    step), a rank holding columns [2, 4) computes for them what one process holding all
    4 computes, and another step draws another mask."""
    model = make("awd_lstm_lm_600", **dict(ZERO, **{knob: 0.5}))
    assert model.mask_sites() == []
    block = TokenLoss(model)
    block.hybridize(static_alloc=True, static_shape=True)
    x = inputs(b=4)

    def outputs(columns, step):
        reseed(9, step)
        with mx.autograd.record():
            logits, _ = model(x[:, columns], model.begin_state(len(columns), mx.cpu()))
        return logits.asnumpy()

    whole, part = outputs([0, 1, 2, 3], 5), outputs([2, 3], 5)
    np.testing.assert_allclose(part, whole[:, 2:], rtol=1e-5, atol=1e-6)
    assert np.abs(outputs([2, 3], 6) - part).max() > 1e-4


@pytest.mark.medium
def test_resuming_a_checkpoint_of_an_earlier_scheme_says_the_model_changes(
        heldout, tmp_path, capsys):
    """A checkpoint written before the stack drew its own dropout trained without it on a
    CPU, and one written while masks were drawn per rank drew other noise: resuming
    either says so in one line."""
    from conftest import TINY, data_args
    from dist_lm.cli import main
    from dist_lm.training.checkpoint import (EARLIER_RNG_SCHEME, META_DIGEST, RANK_RNG_SCHEME,
                                             list_checkpoints)

    run = [*data_args(heldout, heldout, heldout), *TINY, "--num-layers", "2", "--dropout",
           "0.2", "--checkpoint-steps", "5", "--run-dir", str(tmp_path / "run")]
    assert main(["train", *run, "--max-steps", "5"]) == 0
    capsys.readouterr()
    assert main(["train", *run, "--resume", "auto", "--max-steps", "6"]) == 0
    assert "earlier dist-lm" not in capsys.readouterr().err  # this scheme's checkpoint

    for step, scheme, says in [(6, EARLIER_RNG_SCHEME, "did not apply the dropout"),
                               (7, RANK_RNG_SCHEME, "drew dropout masks per rank")]:
        meta_file = Path(list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1]) / \
            "meta.json"
        meta = dict(json.loads(meta_file.read_text()), rng=scheme)
        del meta[META_DIGEST]  # as those versions wrote it: no digest of its own
        meta_file.write_text(json.dumps(meta))
        assert main(["train", *run, "--resume", "auto", "--max-steps", str(step + 1)]) == 0
        warned = [line for line in capsys.readouterr().err.splitlines()
                  if "earlier dist-lm" in line]
        assert len(warned) == 1 and warned[0].startswith(
            f"dist-lm: warning: the checkpoint at step {step} was written by an earlier")
        assert says in warned[0]
