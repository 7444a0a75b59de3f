"""The LSTM language models: pure math, no I/O, no ranks, no Horovod.

`LSTMLM` is the project's own HybridBlock for the GluonNLP zoo families. GluonNLP 0.10.0's
`StandardRNN` calls `nd.Dropout` in its forward and so cannot be hybridized; this block
computes the same function with `F.Dropout` and hybridizes. Its children carry the zoo's
names (`embedding`, `encoder`, `decoder`), so `.params` files load across the two where
the architectures match (see tests/test_model.py).

Dropout comes in two kinds, and the model only applies masks; it never decides what
a mask is keyed by:
- activation dropout (the embedding's output, between LSTM layers, the output; AWD's
  drop_i, drop_h and output dropout) multiplies by masks the caller passes in, one per
  site of `mask_sites()`, in that order: (T, B, W) for a fresh mask per element, or
  (1, B, W) for one mask per column shared over time, each 0 or 1 / (1 - p). Whoever
  trains draws them per global column (training/masks.py), so a column gets the same
  mask whichever rank holds it. Without masks (evaluation, generation) nothing is
  dropped, and the LSTM stack is one fused call.
- weight-level dropout (AWD's drop_e on embedding rows, weight_drop on h2h weights)
  masks parameters that every rank shares, so every rank must draw the one mask one
  process draws: MXNet's `Dropout` with `cudnn_off` draws it from the generator the
  training loop seeds with (seed, step) alone, in the graph's fixed order.
The fused `RNN` operator's own dropout is never used: MXNet 1.9.1's CPU kernel (oneDNN)
skips it, and cuDNN's keeps a random state of its own. So a multi-layer LSTM with
dropout runs one fused call per layer with the mask between (`_LSTM`), and CPU and GPU
train the same model.

Shapes (T = time steps, B = batch columns, V = vocabulary, E = embed, H = hidden):
    inputs  (T, B) int token ids
    states  standard: [h (L, B, H), c (L, B, H)]
            awd:      [h_0, c_0, h_1, c_1, ...], each (1, B, H_l)
    logits  (T, B, V)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import mxnet as mx
from mxnet.gluon import HybridBlock, nn, rnn

from .config import ModelConfig
from .presets import PRESETS  # noqa: F401 (also importable from here)


@dataclass(frozen=True)
class MaskSite:
    """Where an activation dropout sits: its name, rate, width W (features) and whether
    it draws a fresh mask per time step (mask (T, B, W)) or one per column (1, B, W)."""

    name: str
    p: float
    width: int
    per_step: bool

    def shape(self, steps: int, columns: int) -> tuple:
        return (steps if self.per_step else 1, columns, self.width)


def _dropout(F, x, p: float, axes=()):
    """Weight-level dropout of x while training (identity in predict mode), its mask from
    MXNet's generator on every device: cudnn_off keeps cuDNN's own generator out."""
    return F.Dropout(x, p=p, axes=axes, cudnn_off=True)


def _masked(F, x, mask):
    """x (T, B, W) times its mask, (T, B, W) or (1, B, W); x itself without one."""
    if mask is None:
        return x
    return F.broadcast_mul(x, mask)


class _RowDropEmbedding(nn.Embedding):
    """Embedding whose rows (whole words) are dropped with probability p while training."""

    def __init__(self, vocab_size: int, embed_size: int, p: float, **kwargs):
        super().__init__(vocab_size, embed_size, **kwargs)
        self._p = p

    def hybrid_forward(self, F, x, weight):
        # weight (V, E): one Bernoulli draw per row, shared along axis 1.
        weight = _dropout(F, weight, self._p, axes=(1,))
        return super().hybrid_forward(F, x, weight)


class _LSTM(rnn.LSTM):
    """`rnn.LSTM` (same parameters, same names, same fused `RNN` operator) that packs its
    weights for the operator with one 2-D concat instead of `_rnn_param_concat`.

    The fused operator takes every weight and bias as one flat vector, in the order
    [w_i2h, w_h2h per layer, then b_i2h, b_h2h per layer]. Gluon builds it with a 1-D
    concat that copies element by element: 6.6 ms on one core for the 643k parameters of
    standard_lstm_lm_200, ~20x a memcpy, and about as much again for the split in
    backward. Every block has a multiple of 4H elements, so viewing each as rows of 4H
    and concatenating rows gives the same vector, bit for bit, through the fast row copy
    (0.3 ms). Layout TNC, one direction, no projection or sequence lengths (the zoo's
    LSTMs; the constructor refuses others).

    Given masks for the outputs of the layers but the last (`between`), it runs one fused
    call per layer and multiplies each layer's output by its mask before the next; without
    them, one fused call for the whole stack (see the module docstring): the fused
    operator's own dropout is never used.
    """

    def _alias(self) -> str:
        # The prefix rnn.LSTM gets, so that full parameter names, and with them the
        # (name-sorted) order in which Trainer and Horovod see the parameters, stay as
        # they were.
        return "lstm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self._layout, self._dir, self._projection_size, self._use_sequence_length) != \
                ("TNC", 1, None, False):
            raise ValueError("_LSTM packs weights for a one-direction TNC LSTM without "
                             "projection or sequence lengths; use rnn.LSTM otherwise")

    def __call__(self, inputs, states, between=None):
        # rnn.LSTM's __call__ would drop a third argument (its sequence_length, unused
        # here); the models always pass their states.
        return HybridBlock.__call__(self, inputs, states, between)

    def hybrid_forward(self, F, inputs, states, between=None, **kwargs):
        """inputs (T, B, C); states [h, c], each (L, B, H); between: None, or L - 1 masks
        (T, B, H) or (1, B, H) for the outputs of layers 0..L-2. Returns the last layer's
        output (T, B, H) and the new states."""
        if F is mx.nd:  # rnn.LSTM's check, for imperative calls
            for state, info in zip(states, self.state_info(inputs.shape[1])):
                if state.shape != info["shape"]:
                    raise ValueError(f"Invalid recurrent state shape. Expecting "
                                     f"{info['shape']}, got {state.shape}.")
        if between:
            return self._layer_by_layer(F, inputs, states, between, kwargs)
        return self._fused(F, inputs, states, range(self._num_layers), kwargs)

    def _fused(self, F, inputs, states, layers, kwargs):
        """One fused `RNN` call over `layers` (consecutive), with no dropout of its own.
        inputs (T, B, C); states [h, c], each (len(layers), B, H)."""
        width = 4 * self._hidden_size  # each weight and bias block viewed as (-1, 4H) rows
        flat = F.concat(*[kwargs[f"l{layer}_{gate}_{kind}"].reshape((-1, width))
                          for kind in ("weight", "bias")
                          for layer in layers
                          for gate in ("i2h", "h2h")], dim=0).reshape((-1,))
        out = F.RNN(inputs, flat, *states, state_size=self._hidden_size,
                    num_layers=len(layers), bidirectional=False, p=0.0,
                    state_outputs=True, mode="lstm",
                    lstm_state_clip_min=self._lstm_state_clip_min,
                    lstm_state_clip_max=self._lstm_state_clip_max,
                    lstm_state_clip_nan=self._lstm_state_clip_nan)
        return out[0], [out[1], out[2]]

    def _layer_by_layer(self, F, x, states, between, kwargs):
        """The stack as one fused call per layer, each layer's output (T, B, H) times its
        mask before the next (none after the last layer, as the fused operator's own
        dropout). states [h, c], each (L, B, H); layer l's state is row l."""
        h_out, c_out = [], []
        for layer in range(self._num_layers):
            row = [F.slice_axis(s, axis=0, begin=layer, end=layer + 1) for s in states]
            x, (h, c) = self._fused(F, x, row, [layer], kwargs)
            h_out.append(h)
            c_out.append(c)
            if layer < self._num_layers - 1:
                x = _masked(F, x, between[layer])
        return x, [F.concat(*h_out, dim=0), F.concat(*c_out, dim=0)]


class _WeightDropLSTM(_LSTM):
    """One fused LSTM layer with DropConnect on its hidden-to-hidden weights (AWD-LSTM)."""

    def __init__(self, hidden_size: int, input_size: int, p: float):
        super().__init__(hidden_size, 1, input_size=input_size)
        self._p = p

    def _alias(self) -> str:
        return "_weightdroplstm"  # its own class name, as the prefix has always been

    def hybrid_forward(self, F, inputs, states, between=None, **kwargs):
        # l0_h2h_weight (4H, H): a fresh mask per forward, as in the AWD recipe, the same
        # on every rank (a weight-level mask, see the module docstring).
        kwargs["l0_h2h_weight"] = _dropout(F, kwargs["l0_h2h_weight"], self._p)
        return super().hybrid_forward(F, inputs, states, None, **kwargs)


class LSTMLM(HybridBlock):
    """Embedding -> LSTM stack -> (tied) dense decoder, for both zoo families.

    family='standard' is GluonNLP's StandardRNN: one fused multi-layer LSTM with `dropout`
    on the embedding, between layers (a fresh mask per element) and on the output (one
    mask per column, shared over time).
    family='awd' is GluonNLP's AWDRNN: one LSTM per layer, row dropout on the embedding
    matrix (drop_e), time-shared masks on the input (drop_i), between layers (drop_h) and
    on the output (dropout), DropConnect on h2h weights (weight_drop).
    Activation masks come in as `masks`, a dict by site name (`mask_sites`); None: none
    dropped (predict mode, evaluation).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self._family = cfg.family
        self._num_layers = cfg.num_layers
        awd = cfg.family == "awd"
        # With tied weights the last layer must emit E features to meet the (V, E) decoder.
        last = cfg.embed_size if cfg.tie_weights else cfg.hidden_size
        self._sites = _mask_sites(cfg, last)
        with self.name_scope():
            self.embedding = nn.HybridSequential()
            with self.embedding.name_scope():
                init = mx.init.Uniform(0.1)
                if awd and cfg.drop_e:
                    self.embedding.add(_RowDropEmbedding(vocab_size, cfg.embed_size,
                                                         cfg.drop_e, weight_initializer=init))
                else:
                    self.embedding.add(nn.Embedding(vocab_size, cfg.embed_size,
                                                    weight_initializer=init))
            if awd:
                self.encoder = nn.HybridSequential()
                with self.encoder.name_scope():
                    for layer in range(cfg.num_layers):
                        n_in = cfg.embed_size if layer == 0 else cfg.hidden_size
                        n_out = last if layer == cfg.num_layers - 1 else cfg.hidden_size
                        if cfg.weight_drop:
                            self.encoder.add(_WeightDropLSTM(n_out, n_in, cfg.weight_drop))
                        else:
                            self.encoder.add(_LSTM(n_out, 1, input_size=n_in))
            else:
                self.encoder = _LSTM(cfg.hidden_size, cfg.num_layers,
                                     input_size=cfg.embed_size)
            self.decoder = nn.HybridSequential()
            with self.decoder.name_scope():
                shared = self.embedding[0].params if cfg.tie_weights else None
                self.decoder.add(nn.Dense(vocab_size, flatten=False, in_units=last,
                                          params=shared))

    def mask_sites(self) -> List[MaskSite]:
        """The activation dropouts, in the order `masks_by_site` takes their masks."""
        return list(self._sites)

    def masks_by_site(self, masks) -> Optional[Dict[str, object]]:
        """A sequence of masks in `mask_sites` order -> the dict the forward takes (None
        for no masks)."""
        if not masks:
            return None
        if len(masks) != len(self._sites):
            raise ValueError(f"{len(masks)} dropout masks for {len(self._sites)} sites")
        return {site.name: mask for site, mask in zip(self._sites, masks)}

    def begin_state(self, batch_size: int, ctx: mx.Context) -> List[mx.nd.NDArray]:
        """Zero states as one flat list (see the module docstring for shapes)."""
        if self._family == "awd":
            return [s for layer in self.encoder
                    for s in layer.begin_state(batch_size, func=mx.nd.zeros, ctx=ctx)]
        return self.encoder.begin_state(batch_size, func=mx.nd.zeros, ctx=ctx)

    def hybrid_forward(self, F, inputs, states, masks=None):
        x, states = self.features(F, inputs, states, masks)
        return self.decoder(x), states

    def features(self, F, inputs, states, masks=None):
        """What the decoder reads: inputs (T, B) -> (T, B, H_last), and the new states.
        Loss blocks that score only some classes (SampledTokenLoss) call this directly."""
        x, out_states = self.encode(F, inputs, states, masks)
        return self.drop_output(F, x, masks), out_states

    def encode(self, F, inputs, states, masks=None):
        """The last LSTM layer's output before the output dropout: inputs (T, B) ->
        (T, B, H_last), and the new states. Temporal activation regularization reads it
        (regularize.py); `drop_output` of it is what the decoder reads."""
        masks = masks or {}
        # inputs (T, B) -> embedded (T, B, E)
        x = self.embedding(inputs)
        if self._family == "awd":
            x = _masked(F, x, masks.get("drop_i"))
            out_states = []
            for layer, lstm in enumerate(self.encoder):
                x, (h, c) = lstm(x, states[2 * layer:2 * layer + 2])
                out_states += [h, c]
                x = _masked(F, x, masks.get(f"drop_h{layer}"))
        else:
            x = _masked(F, x, masks.get("embedding"))
            between = [masks[f"between{layer}"] for layer in range(self._num_layers - 1)] \
                if "between0" in masks else None
            x, out_states = self.encoder(x, states, between)
        return x, out_states

    def drop_output(self, F, x, masks=None):
        """The output dropout of x (T, B, H_last): one mask per column, shared over time."""
        return _masked(F, x, (masks or {}).get("output"))


def _mask_sites(cfg: ModelConfig, last: int) -> List[MaskSite]:
    """The activation dropouts of a model of `cfg` whose rate is not 0, in forward order;
    last: the last layer's width."""
    between = range(cfg.num_layers - 1)
    if cfg.family == "awd":
        sites = [MaskSite("drop_i", cfg.drop_i, cfg.embed_size, False)] + \
            [MaskSite(f"drop_h{layer}", cfg.drop_h, cfg.hidden_size, False)
             for layer in between] + [MaskSite("output", cfg.dropout, last, False)]
    else:
        sites = [MaskSite("embedding", cfg.dropout, cfg.embed_size, True)] + \
            [MaskSite(f"between{layer}", cfg.dropout, cfg.hidden_size, True)
             for layer in between] + [MaskSite("output", cfg.dropout, cfg.hidden_size, False)]
    return [site for site in sites if site.p]


def build_model(cfg: ModelConfig, vocab_size: int) -> LSTMLM:
    return LSTMLM(cfg, vocab_size)


class TokenLoss(HybridBlock):
    """Mean next-token cross-entropy of a language model over a (T, B) batch.

    Wrapping the model and the loss in one block lets one hybridized graph cover the
    whole forward pass, so MXNet can plan its memory once (static_alloc/static_shape).
    """

    def __init__(self, model: LSTMLM, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.model = model
        self._ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()

    def hybrid_forward(self, F, inputs, targets, states, *masks):
        # masks: the model's activation masks in `mask_sites` order (training), or none.
        logits, states = self.model(inputs, states,
                                    self.model.masks_by_site(masks))  # (T, B, V)
        loss = self._ce(logits.reshape((-3, -1)),           # (T*B, V)
                        targets.reshape((-1,)))             # (T*B,) -> per token (T*B,)
        return loss.mean(), states                          # (1,)


class SampledTokenLoss(HybridBlock):
    """Mean sampled-softmax cross-entropy over a (T, B) batch (`--sampled-softmax K`).

    Each token is scored against its true class and the step's K candidates (see
    sampling.py) instead of all V classes: logits (T, B, 1 + K) rather than (T, B, V), so
    the decoder costs K/V of the full softmax in time and memory. As GluonNLP's
    `_SampledDenseHelper` (its big LM) does: every logit has log(expected count) of its
    class subtracted, and a candidate equal to the token's true class (an accidental
    hit) gets -1e37 so it drops out of the normalisation. The decoder's weight and bias
    are the model's own parameters (tied or not); only their rows for the true classes
    and the candidates receive gradient. Evaluation keeps the full softmax (TokenLoss),
    so perplexities stay comparable.
    """

    def __init__(self, model: LSTMLM, num_sampled: int, **kwargs):
        super().__init__(**kwargs)
        self._k = num_sampled
        with self.name_scope():
            self.model = model
        dense = model.decoder[0]
        # Registered here so the hybridized graph receives them as inputs; the model
        # still owns them (collect_params lists them once, under their own names).
        self.weight, self.bias = dense.weight, dense.bias

    def hybrid_forward(self, F, inputs, targets, states, candidates, log_q_true,
                       log_q_candidates, *masks, weight, bias):
        # inputs, targets (T, B); candidates, log_q_candidates (K,); log_q_true (T, B);
        # masks as TokenLoss's; weight (V, H_last), bias (V,)
        x, states = self.model.features(F, inputs, states,
                                        self.model.masks_by_site(masks))   # (T, B, H)
        # One gather for the targets' rows and the candidates' rows: the backward of each
        # gather writes a dense (V, H) gradient before it is summed into the parameter's,
        # so one gather instead of two saves a V x H buffer and a pass over it.
        ids = F.concat(targets.reshape((-1,)), candidates, dim=0)          # (T*B + K,)
        rows, row_bias = F.take(weight, ids), F.take(bias, ids)    # (T*B + K, H), (T*B + K,)
        n = -self._k  # the candidates are the last K
        true = (x * rows.slice_axis(axis=0, begin=0, end=n).reshape_like(x)).sum(axis=2) + \
            row_bias.slice_axis(axis=0, begin=0, end=n).reshape_like(targets)  # (T, B)
        sampled = F.FullyConnected(x, rows.slice_axis(axis=0, begin=n, end=None),
                                   row_bias.slice_axis(axis=0, begin=n, end=None),
                                   num_hidden=self._k, flatten=False)      # (T, B, K)
        hits = F.broadcast_equal(targets.expand_dims(axis=2),
                                 candidates.reshape((1, 1, -1)))           # (T, B, K)
        sampled = F.broadcast_sub(sampled + hits * -1e37,
                                  log_q_candidates.reshape((1, 1, -1)))
        logits = F.concat((true - log_q_true).expand_dims(axis=2), sampled, dim=2)
        # The true class is column 0 of every row of (T, B, 1 + K).
        loss = -F.log_softmax(logits, axis=2).slice_axis(axis=2, begin=0, end=1)
        return loss.mean(), states
