"""GluonNLP's `word_language_model.py` spellings for `dist-lm train`, and the underscore
spellings of dist-lm's own options.

A command line pasted from GluonNLP v0.x's scripts/language_model (its README's AWD and
standard LSTM lines) is read as that script reads it: its options with the same meaning
become dist-lm's (`--emsize 200` is `--embed-size 200`), argparse's prefixes included
(`--weight_drop` is the script's `--weight_dropout`), and the model is the one the script
would build: AWDRNN when the weight dropout (default 0.5) is above 0, else StandardRNN,
with the script's defaults for the sizes and dropouts not given; named by its zoo preset
when it is one (`--model awd_lstm_lm_600`), else `--model custom`. The recipe is then the
family's (presets.RECIPES: the AWD one is the script's defaults). Options whose meaning
differs here (`--batch_size`, `--gpu`, `--gpus`, `--save`, `--eval_only`, `--test_mode`,
a `--model` cell other than lstm) are refused, all of them in one line, each with the
exact replacement. Pure text: no argparse, no MXNet.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UsageError
from .presets import PRESETS

# The script's options (GluonNLP v0.x word_language_model.py), with whether each takes a
# value; the store_true ones do not.
SCRIPT_FLAGS = {
    "--model": True, "--emsize": True, "--nhid": True, "--nlayers": True, "--lr": True,
    "--clip": True, "--epochs": True, "--batch_size": True, "--bptt": True,
    "--dropout": True, "--dropout_h": True, "--dropout_i": True, "--dropout_e": True,
    "--weight_dropout": True, "--tied": False, "--log-interval": True, "--save": True,
    "--eval_only": False, "--gpu": True, "--gpus": True, "--optimizer": True, "--wd": True,
    "--alpha": True, "--beta": True, "--ntasgd": False, "--test_mode": False,
    "--lr_update_interval": True, "--lr_update_factor": True,
}
# Same meaning, another spelling: the script's option -> dist-lm's. (--lr, --clip,
# --epochs, --bptt, --dropout, --log-interval, --optimizer, --wd, --alpha, --beta and
# --ntasgd are spelled the same in both.)
RENAMED = {"--emsize": "--embed-size", "--nhid": "--hidden-size", "--nlayers": "--num-layers",
           "--dropout_h": "--drop-h", "--dropout_i": "--drop-i", "--dropout_e": "--drop-e",
           "--weight_dropout": "--weight-drop", "--tied": "--tie-weights",
           "--lr_update_interval": "--lr-update-interval",
           "--lr_update_factor": "--lr-update-factor"}
# The model fields the script builds from, its defaults, and dist-lm's names for them.
MODEL_FIELDS = {"--emsize": ("embed_size", 400), "--nhid": ("hidden_size", 1150),
                "--nlayers": ("num_layers", 3), "--dropout": ("dropout", 0.4),
                "--dropout_h": ("drop_h", 0.2), "--dropout_i": ("drop_i", 0.65),
                "--dropout_e": ("drop_e", 0.1), "--weight_dropout": ("weight_drop", 0.5)}
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# dist-lm options that choose the model themselves: with any of them, the script's
# choice of model is not made here.
MODEL_CHOICE = {"--model", "--family", "--config", "--embed-size", "--hidden-size",
                "--num-layers"}


def _script_flag(token: str, own: Sequence[str]) -> Optional[str]:
    """The script's option `token` names, as the script's argparse reads it (exact, or
    a prefix of exactly one of its options), unless it is one of dist-lm's own."""
    if token in own:
        return None
    if token in SCRIPT_FLAGS:
        return token
    matches = [f for f in SCRIPT_FLAGS if f.startswith(token) and "_" in token]
    return matches[0] if len(matches) == 1 else None


def _refusal(flag: str, value: Optional[str]) -> str:
    if flag == "--batch_size":
        return (f"--batch_size {value}: use --global-batch-size {value} (the script's batch "
                f"is over all its devices; dist-lm's --batch-size is per rank)")
    if flag == "--gpu":
        return (f"--gpu {value}: use --context gpu:{value} for one process; under "
                f"horovodrun or mpirun leave --context auto (each rank takes its local GPU)")
    if flag == "--gpus":
        n = len([g for g in (value or "").split(",") if g.strip()])
        return (f"--gpus {value}: one rank per GPU instead: launch/train-workstation.sh "
                f"-np {n} ... (each rank takes its local GPU)")
    if flag == "--save":
        stem = (value or "").removesuffix(".params") or "runs/NAME"
        return (f"--save {value}: use --run-dir {stem} (its best.params is what --save "
                f"wrote; final.params and checkpoints beside it)")
    if flag == "--eval_only":
        return "--eval_only: use dist-lm eval --run-dir DIR --data-dir DIR"
    if flag == "--test_mode":
        return "--test_mode: use make smoke (the shipped sample corpus), or --max-steps N"
    return (f"--model {value}: dist-lm trains LSTMs only (its --model names a preset: "
            f"{', '.join(sorted(PRESETS))} or custom)")


def _model_args(given: Dict[str, str], tied: bool) -> List[str]:
    """The dist-lm options for the model the script would build from `given`."""
    fields = {name: float(given.get(flag, default)) if "drop" in name
              else int(given.get(flag, default))
              for flag, (name, default) in MODEL_FIELDS.items()}
    family = "awd" if fields["weight_drop"] > 0 else "standard"
    if family == "standard":  # StandardRNN has none of these
        fields.update(weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0)
    wanted = dict(fields, family=family, tie_weights=tied)
    for name, preset in PRESETS.items():
        full = dict(dict(weight_drop=0.0, drop_h=0.0, drop_i=0.0, drop_e=0.0), **preset)
        if all(full.get(k) == v for k, v in wanted.items()):
            return ["--model", name]
    out = ["--model", "custom", "--family", family,
           "--tie-weights" if tied else "--no-tie-weights"]
    for name, value in fields.items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def translate(argv: List[str], own: Sequence[str]) -> Tuple[List[str], List[str]]:
    """argv of `dist-lm train` with the script's and the underscore spellings read as
    dist-lm's; `own`: dist-lm train's option strings. Returns (argv, notes), notes being
    what was read as what. Raises UsageError naming every option whose meaning differs."""
    tokens: List[str] = []
    for token in argv:  # --flag=value as two tokens, for the script's flags
        head, eq, tail = token.partition("=")
        if eq and token.startswith("--") and (_script_flag(head, own) or head == "--dropout"):
            tokens += [head, tail]
        else:
            tokens.append(token)
    out: List[str] = []
    refused: List[str] = []
    model_given: Dict[str, str] = {}
    tied, script_model, chooses = False, False, False
    dropout: Optional[str] = None  # both programs' --dropout: part of the script's model
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--"):
            out.append(token)
            continue
        if token == "--model" and i < len(tokens) and tokens[i] in CELLS:
            cell = tokens[i]
            i += 1
            if cell != "lstm":
                refused.append(_refusal("--model", cell))
            continue  # --model lstm: the script's cell, what dist-lm trains
        chooses |= token.split("=")[0] in MODEL_CHOICE
        if token == "--dropout" and i < len(tokens):
            dropout = tokens[i]
            i += 1
            continue
        flag = _script_flag(token, own)
        if flag is None:
            dashed = token.split("=")[0].replace("_", "-")
            if "_" in token.split("=")[0] and dashed in own:  # --max_steps: --max-steps
                out.append(dashed + token[len(dashed):])
            else:
                out.append(token)
            continue
        value = None
        if SCRIPT_FLAGS[flag]:
            if i >= len(tokens):
                raise UsageError(f"{token} expects a value")
            value = tokens[i]
            i += 1
        if flag in ("--batch_size", "--gpu", "--gpus", "--save", "--eval_only",
                    "--test_mode"):
            refused.append(_refusal(flag, value))
        elif flag in MODEL_FIELDS:
            model_given[flag] = value
            script_model = True
        elif flag == "--tied":
            tied = script_model = True
        else:
            out += [RENAMED.get(flag, flag)] + ([value] if value is not None else [])
    if refused:
        raise UsageError("GluonNLP word_language_model.py options that mean something else "
                         "here: " + "; ".join(refused))
    if dropout is not None and (chooses or not script_model):
        out += ["--dropout", dropout]
    elif dropout is not None:
        model_given["--dropout"] = dropout
    if not script_model:
        return out, []
    if chooses:  # dist-lm's own model options decide; the script's sizes override them
        extra = [a for flag, value in model_given.items()
                 for a in (RENAMED[flag], value)] + (["--tie-weights"] if tied else [])
    else:
        try:
            extra = _model_args(model_given, tied)
        except ValueError as err:
            raise UsageError(f"GluonNLP model option: {err}") from None
    return extra + out, [" ".join(extra)]
