"""NT-ASGD (Merity et al. 2018): SGD until validation stops improving, then SGD whose
iterates are averaged; validation, best.params and final.params use the average.

The trigger is non-monotone: at an epoch-end validation with loss v, and the losses of
the earlier checks v_0..v_{t-1},

    switch when  t > n  and  v > min(v_0 .. v_{t-n-1})

(the best of all checks but the last n), as GluonNLP's word_language_model.py `--ntasgd`
and Merity's `--nonmono` do; the losses are recorded only until the switch. At the
switch after step T the average is the parameters then, and after every later step t

    avg <- avg + (theta_t - avg) / (t - T + 1)

so it is the mean of theta_T .. theta_t. (GluonNLP counts t from nominal batches per
epoch, which drifts when the lengths vary; this is the exact count.) The optimizer keeps
taking the same SGD steps; only what is evaluated and saved changes.

The average lives beside the parameters on the device and is the same on every rank
without communication: the parameters are, and the trigger reads the validation loss
reduced over all ranks. A checkpoint keeps it with the optimizer state
("average/<name>" arrays in optimizer.nd, as torch.optim.ASGD keeps its `ax` in the
optimizer) and the trigger state in meta.json.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import mxnet as mx

PREFIX = "average/"


def structural_params(model) -> Dict[str, object]:
    """The model's parameters by the names .params files use ('embedding.0.weight'), so
    they do not depend on how many blocks the process built before; a tied decoder's
    weight appears once (under the embedding's name)."""
    seen, params = set(), {}
    for name, param in model._collect_params_with_prefix().items():
        if id(param) not in seen:
            seen.add(id(param))
            params[name] = param
    return params


class Averager:
    def __init__(self, model, nonmono: int):
        self.params = structural_params(model)   # name -> Parameter
        self.nonmono = nonmono
        self.history: List[float] = []    # validation losses before the switch
        self.trigger_step: Optional[int] = None
        self.average: Dict[str, mx.nd.NDArray] = {}

    @property
    def active(self) -> bool:
        return self.trigger_step is not None

    def observe(self, val_loss: float, step: int) -> bool:
        """Takes an epoch end's validation loss after `step` optimizer steps; True when it
        switches to averaging here."""
        if self.active:
            return False
        t, n = len(self.history), self.nonmono
        switch = t > n and val_loss > min(self.history[:-n])
        self.history.append(val_loss)
        if switch:
            self.trigger_step = step
            self.average = {name: p.data().copy() for name, p in self.params.items()}
        return switch

    def update(self, step: int) -> None:
        """After optimizer step `step` (steps done): folds the parameters into the mean.
        Three element-wise passes over the parameters, on the device."""
        if not self.active:
            return
        weight = 1.0 / (step - self.trigger_step + 1)
        for name, avg in self.average.items():
            avg += (self.params[name].data() - avg) * weight

    @contextmanager
    def applied(self):
        """While inside, the model holds the average (written in place, so hybridized
        graphs see it); the trained parameters are put back on the way out, also when
        the body raises. Nothing happens before the switch."""
        if not self.active:
            yield
            return
        saved = {name: p.data().copy() for name, p in self.params.items()}
        try:
            for name, avg in self.average.items():
                self.params[name].data()[:] = avg
            yield
        finally:
            for name, data in saved.items():
                self.params[name].data()[:] = data

    # --- checkpoint part -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"nonmono": self.nonmono, "history": list(self.history),
                "trigger_step": self.trigger_step}

    def arrays(self) -> Dict[str, mx.nd.NDArray]:
        return {PREFIX + name: a for name, a in self.average.items()}

    def load_state_dict(self, state: dict, arrays: Dict[str, object],
                        ctx: mx.Context) -> None:
        """state from meta.json; arrays: the checkpoint's arrays by name (NumPy), of which
        the "average/" ones are this part's."""
        self.history, self.trigger_step = list(state["history"]), state["trigger_step"]
        self.average = {name: mx.nd.array(arrays[PREFIX + name], ctx=ctx)
                        for name in self.params.keys()} if self.active else {}


class NoAverage:
    """Stands in for Averager without --ntasgd: plain SGD, nothing to average."""

    active = False

    def observe(self, val_loss: float, step: int) -> bool:
        return False

    def update(self, step: int) -> None:
        pass

    @contextmanager
    def applied(self):
        yield

    def state_dict(self) -> None:
        return None

    def arrays(self) -> dict:
        return {}

    def load_state_dict(self, state, arrays, ctx) -> None:
        pass


def make_averager(enabled: bool, model, nonmono: int):
    return Averager(model, nonmono) if enabled else NoAverage()
