"""`dist-lm generate`: sample text from a trained run's parameters.

One process on one device; the same seed gives the same words on any machine and any
rank count, because sampling draws from NumPy's generator on the host. The output is the
prompt as the model read it (a word outside the vocabulary as <unk>), then the sampled
words; an `<eos>` (the end of a line of the training text) is printed and ends the line.
"""

from __future__ import annotations

from typing import List, Optional

import mxnet as mx
import numpy as np

from ..data.text import EOS
from ..errors import UsageError


def sample_words(model, vocab, ctx: mx.Context, words: int, temperature: float,
                 prompt: Optional[str], seed: int) -> List[str]:
    """Feeds the prompt (or one `<eos>`), then samples `words` tokens one at a time."""
    if words <= 0:
        raise UsageError(f"--words must be a positive integer, got {words}")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise UsageError(f"--temperature must be a positive number, got {temperature}")
    rng = np.random.RandomState(seed)
    context = (prompt.split() if prompt else []) or [EOS]
    ids = vocab[context]
    states = model.begin_state(1, ctx)
    # inputs (T, 1): the whole prompt in one call, then one token per call.
    logits, states = model(mx.nd.array(np.array(ids)[:, None], ctx=ctx), states)
    out: List[str] = []
    for _ in range(words):
        scores = logits[-1, 0].asnumpy().astype(np.float64) / temperature  # (V,)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        token = int(rng.choice(len(probs), p=probs))
        out.append(vocab.idx_to_token[token])
        logits, states = model(mx.nd.array([[token]], ctx=ctx), states)
    return out


def prompt_as_read(vocab, prompt: Optional[str]) -> List[str]:
    """The prompt's words as the model reads them: unknown ones as the vocabulary's
    unknown token."""
    words = prompt.split() if prompt else []
    return [vocab.idx_to_token[i] for i in vocab[words]] if words else []


def format_text(words: List[str]) -> str:
    """Words on lines: each `<eos>` is shown and ends its line."""
    return " ".join(words).replace(f"{EOS} ", f"{EOS}\n").strip()
