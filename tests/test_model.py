import gluonnlp as nlp
import mxnet as mx
import numpy as np
import pytest

from dist_lm.config import ModelConfig
from dist_lm.model import TokenLoss, build_model
from dist_lm.presets import PRESETS

V = 500
# The largest zoo model takes seconds per test: left out of the fast tier.
SIZES = [pytest.param(n, marks=pytest.mark.medium) if n == "standard_lstm_lm_1500" else n
         for n in sorted(PRESETS)]


def make(name, **overrides):
    cfg = ModelConfig(model=name, **dict(PRESETS[name], **overrides))
    model = build_model(cfg, V)
    model.initialize(mx.init.Xavier())
    return model


def batch(t=6, b=3, seed=0):
    rs = np.random.RandomState(seed)
    return (mx.nd.array(rs.randint(0, V, (t, b))), mx.nd.array(rs.randint(0, V, (t, b))))


@pytest.mark.parametrize("name", SIZES)
def test_every_zoo_model_builds_and_runs_forward_and_backward(name):
    model = make(name)
    inputs, targets = batch()
    states = model.begin_state(3, mx.cpu())
    logits, new_states = model(inputs, states)
    assert logits.shape == (6, 3, V)
    assert [s.shape for s in new_states] == [s.shape for s in states]
    loss_block = TokenLoss(model)
    loss_block.hybridize(static_alloc=True, static_shape=True)
    with mx.autograd.record():
        loss, _ = loss_block(inputs, targets, states)
    loss.backward()
    grads = [p.grad() for p in model.collect_params().values()]
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    assert abs(loss.asscalar() - np.log(V)) < 1.0  # near-uniform at initialisation


@pytest.mark.parametrize("name", SIZES)
def test_parameters_load_into_the_gluonnlp_zoo_model(name, tmp_path):
    ours = make(name)
    vocab = nlp.Vocab(nlp.data.Counter([str(i) for i in range(V - 4)]))
    assert len(vocab) == V
    zoo, _ = nlp.model.get_model(name, vocab=vocab, dataset_name=None)
    zoo.initialize()
    ours.save_parameters(str(tmp_path / "p.params"))
    zoo.load_parameters(str(tmp_path / "p.params"))  # strict: every name must match
    inputs, _ = batch()
    with mx.autograd.predict_mode():
        theirs, _ = zoo(inputs, zoo.begin_state(batch_size=3, func=mx.nd.zeros))
        mine, _ = ours(inputs, ours.begin_state(3, mx.cpu()))
    np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["standard_lstm_lm_200", "awd_lstm_lm_600"])
def test_hybridized_equals_imperative_with_dropout_off(name):
    zero = dict(dropout=0.0, weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)
    model = make(name, **zero)
    inputs, targets = batch()
    states = model.begin_state(3, mx.cpu())
    imperative, _ = TokenLoss(model)(inputs, targets, states)
    hybrid = TokenLoss(model)
    hybrid.hybridize(static_alloc=True, static_shape=True)
    with mx.autograd.record():
        fast, _ = hybrid(inputs, targets, states)
    np.testing.assert_allclose(fast.asnumpy(), imperative.asnumpy(), rtol=1e-6)


def test_dropout_is_active_only_while_training():
    model = make("awd_lstm_lm_600")
    inputs, targets = batch()
    block = TokenLoss(model)
    block.hybridize()
    states = model.begin_state(3, mx.cpu())
    a = block(inputs, targets, states)[0].asscalar()
    b = block(inputs, targets, states)[0].asscalar()
    assert a == b
    with mx.autograd.record():
        c = block(inputs, targets, states)[0].asscalar()
    assert c != a


def test_tied_decoder_shares_the_embedding_matrix():
    model = make("standard_lstm_lm_200")
    assert model.decoder[0].weight is model.embedding[0].weight
    untied = make("standard_lstm_lm_200", tie_weights=False)
    assert untied.decoder[0].weight is not untied.embedding[0].weight
