"""The one typed configuration of a training run, its presets, and its command line.

Precedence, lowest to highest: field defaults < the training recipe (--recipe; by
default the one of the model's family, presets.RECIPES) < the model preset named by
--model < a JSON file given with --config (for example a run's own config.json) <
explicit flags. Every field's `help` is its documentation and its `--help` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

from .errors import UsageError
from .presets import PRESETS, RECIPES


def opt(default: Any, help: str, choices: Optional[tuple] = None,  # noqa: A002
        shown: Optional[str] = None) -> Any:
    """A Config field. shown: what `--help` names as the default of a field whose None
    stands for something else (another option's value, no limit)."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "shown": shown})


@dataclass
class DataConfig:
    data_dir: Optional[str] = opt(
        None, "directory with wiki.{train,valid,test}.tokens (WikiText) or "
        "ptb.{train,valid,test}.txt (PTB). Without it and without --*-file: "
        "$DIST_LM_DATA_MIRROR/NAME if complete, else $MXNET_HOME/datasets/NAME (MXNET_HOME: "
        "~/.mxnet), fetched there when missing; NAME is --download's dataset, else wikitext-2")
    train_file: Optional[str] = opt(None, "training text; overrides --data-dir's train split")
    valid_file: Optional[str] = opt(None, "validation text; overrides --data-dir's valid split")
    test_file: Optional[str] = opt(None, "test text; overrides --data-dir's test split")
    download: Optional[str] = opt(
        None, "fetch this dataset into --data-dir when a split is missing, verified by sha1 "
        "(without --data-dir: the dataset to find or fetch, see --data-dir)",
        choices=("wikitext-2", "wikitext-103"))
    min_freq: int = opt(1, "drop words seen fewer times than this in the training split")
    max_vocab: Optional[int] = opt(None, "keep at most this many words (most frequent first)",
                                   shown="no limit")
    cache_dir: Optional[str] = opt(
        None, "where token ids and vocabularies are cached; delete it to clear",
        shown="$DIST_LM_CACHE_DIR, else .dist-lm-cache beside the training split if "
        "writable, else ~/.cache/dist-lm")


@dataclass
class ModelConfig:
    model: str = opt("standard_lstm_lm_200", "model preset (GluonNLP zoo name) or 'custom'")
    family: str = opt("standard", "'standard' (StandardRNN) or 'awd' (AWDRNN) layout",
                      choices=("standard", "awd"))
    embed_size: int = opt(200, "embedding size")
    hidden_size: int = opt(200, "LSTM hidden size")
    num_layers: int = opt(2, "LSTM layers")
    tie_weights: bool = opt(True, "share the embedding matrix with the decoder")
    dropout: float = opt(0.2, "dropout on the embedding, between layers and on the output")
    weight_drop: float = opt(0.0, "DropConnect on the hidden-to-hidden weights (AWD)")
    drop_h: float = opt(0.0, "dropout between LSTM layers, per time step mask (AWD)")
    drop_i: float = opt(0.0, "dropout on the embedded input, per time step mask (AWD)")
    drop_e: float = opt(0.0, "drop whole embedding rows (words) (AWD)")


@dataclass
class OptimConfig:
    optimizer: str = opt("sgd", "optimizer", choices=("sgd", "adam"))
    lr: float = opt(20.0, "learning rate (for the global batch; see --lr-scaling)")
    momentum: float = opt(0.0, "SGD momentum")
    wd: float = opt(0.0, "weight decay")
    clip: float = opt(0.25, "clip the global gradient norm to this; 0 disables clipping")
    lr_decay: float = opt(0.25, "multiply the lr by this when validation loss stops improving")
    clip_mode: str = opt(
        "global", "'global': clip the norm of the gradient averaged over all ranks (the "
        "same step as one process with the global batch); 'local': clip each rank's own "
        "gradient before the allreduce, as the single-GPU reference loop does",
        choices=("global", "local"))
    lr_scaling: str = opt(
        "none", "scale --lr with the number of ranks N: 'linear' (x N), 'sqrt' (x sqrt N) "
        "or 'none'. Keep 'none' when --global-batch-size keeps the global batch fixed",
        choices=("none", "linear", "sqrt"))
    warmup_steps: int = opt(0, "raise the lr linearly from lr/steps to lr over this many "
                               "steps (helps when --lr-scaling raises it)")
    sampled_softmax: Optional[int] = opt(
        None, "train the decoder with a sampled softmax over this many log-uniform "
        "candidates per step instead of all words (for large vocabularies; evaluation keeps "
        "the full softmax). Needs a vocabulary sorted by frequency, as built here",
        shown="off")
    alpha: float = opt(0.0, "activation regularization (AR): add alpha x mean square of the "
                            "last LSTM layer's output after its dropout to the training "
                            "objective")
    beta: float = opt(0.0, "temporal activation regularization (TAR): add beta x mean square "
                           "of the step-to-step change of the last layer's output before "
                           "its dropout")
    lr_update_interval: Optional[int] = opt(
        None, "instead of --lr-decay at every validation without improvement, multiply "
        "the lr by --lr-update-factor after this many in a row", shown="off")
    lr_update_factor: float = opt(0.1, "see --lr-update-interval")
    adam_beta1: float = opt(0.9, "Adam's beta1")
    adam_epsilon: float = opt(1e-8, "Adam's epsilon")
    ntasgd: bool = opt(False, "NT-ASGD: once validation has not improved on the best of "
                              "all checks but the last --ntasgd-nonmono, average the SGD "
                              "iterates and validate, test and save the average")
    ntasgd_nonmono: int = opt(5, "the non-monotone interval n of --ntasgd, in epoch-end "
                                 "validations")


@dataclass
class RunConfig:
    batch_size: int = opt(20, "BPTT columns per process (per rank under Horovod); the "
                              "global batch is ranks x this")
    global_batch_size: Optional[int] = opt(
        None, "BPTT columns over all ranks, split over any number of ranks up to it as "
        "evenly as possible, in contiguous blocks (overrides --batch-size)",
        shown="ranks x --batch-size")
    eval_batch_size: int = opt(
        20, "validation columns over all ranks, whatever their number (the reference "
        "notebook's 20); every rank count validates on the same batches")
    test_batch_size: Optional[int] = opt(
        None, "test columns over all ranks. GluonNLP's published perplexities validate "
        "on 10 columns and test on 1", shown="--eval-batch-size")
    bptt: int = opt(35, "time steps per batch")
    variable_bptt: bool = opt(
        False, "variable-length BPTT: each step's length is drawn around --bptt (or half "
        "of it with probability 0.05), with sd 5 and at least 5, and its lr scaled by "
        "length / --bptt")
    recipe: str = opt(
        "auto", "the training recipe whose values fill the options not given: 'standard' "
        "(the reference notebook's), 'awd' (GluonNLP's AWD-LSTM script, docs/awd.md) or "
        "'auto' (the model family's)", choices=("auto", "standard", "awd"))
    epochs: int = opt(3, "passes over the training split")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps in all",
                                   shown="no limit")
    log_interval: int = opt(200, "steps between log lines; an epoch of fewer steps logs "
                                 "once, at its end")
    seed: int = opt(1, "random seed (parameters, dropout)")
    eval_first: bool = opt(False, "evaluate the validation split once before training")
    context: str = opt("auto", "'cpu', 'gpu' or 'gpu:N', or 'auto' (a GPU when present)")
    run_dir: Optional[str] = opt(None, "where the run writes its files",
                                 shown="runs/<the --model name>")


@dataclass
class DistConfig:
    fp16_allreduce: bool = opt(False, "compress gradients to float16 for the allreduce")
    fusion_threshold_mb: Optional[float] = opt(
        None, "Horovod tensor fusion buffer in MiB (HOROVOD_FUSION_THRESHOLD; Horovod's "
        "default 128)")
    cycle_time_ms: Optional[float] = opt(
        None, "Horovod background cycle in ms (HOROVOD_CYCLE_TIME; Horovod's default 1)")
    exchange: str = opt(
        "dense", "how the embedding/decoder gradients travel with --sampled-softmax: "
        "'dense' (allreduce all V rows) or 'rows' (only the rows the step touched; same "
        "result, far fewer bytes at large vocabularies)", choices=("dense", "rows"))
    check_sync_interval: int = opt(
        0, "every N steps, check that all ranks hold bit-identical parameters (0: never)")


@dataclass
class ReliabilityConfig:
    resume: str = opt("none", "'auto': continue from the newest intact checkpoint in "
                              "RUN_DIR/checkpoints (start fresh if there is none); a "
                              "checkpoint directory; or 'none'")
    resume_strict: bool = opt(False, "fail instead of falling back to an older checkpoint "
                                     "when the newest one is damaged")
    checkpoint_steps: int = opt(0, "also checkpoint every N steps (0: at epoch ends and by "
                                   "--checkpoint-minutes only)")
    checkpoint_minutes: float = opt(30.0, "also checkpoint when this many minutes passed "
                                          "since the last one (0: never by time)")
    keep_checkpoints: int = opt(3, "keep the newest N checkpoints (plus the best one)")
    nonfinite: str = opt("stop", "on a NaN/Inf loss or gradient: 'stop' (exit 3 keeping the "
                                 "last good checkpoint) or 'skip' (drop those steps and "
                                 "count them; costs one pass over the gradients per step)",
                         choices=("stop", "skip"))
    watchdog_s: float = opt(600.0, "exit (code 4) if no step or evaluation batch completes "
                                   "for this many seconds, e.g. a peer rank vanished "
                                   "(0: off)")
    checkpoint_timeout_s: float = opt(1800.0, "the watchdog's limit while a checkpoint or "
                                              "parameter file is written (rank 0 writes, the "
                                              "other ranks wait), instead of --watchdog-s "
                                              "(0: no limit)")


GROUPS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig,
          "dist": DistConfig, "reliability": ReliabilityConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        """Builds a Config from nested dicts, refusing unknown groups and keys."""
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: expected a JSON object")
        unknown = set(raw) - set(GROUPS)
        if unknown:
            raise UsageError(f"{source}: unknown section(s) {sorted(unknown)}")
        parts = {}
        for group, klass in GROUPS.items():
            values = raw.get(group, {})
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - names
            if bad:
                raise UsageError(f"{source}: unknown key(s) {sorted(bad)} in '{group}'")
            parts[group] = klass(**values)
        return cls(**parts)

    def validate(self) -> "Config":
        """Checks values a user can get wrong; raises UsageError with one line."""
        r, m, o, d = self.run, self.model, self.optim, self.data
        for name, value in [("--batch-size", r.batch_size), ("--bptt", r.bptt),
                            ("--epochs", r.epochs), ("--log-interval", r.log_interval),
                            ("--embed-size", m.embed_size), ("--hidden-size", m.hidden_size),
                            ("--num-layers", m.num_layers), ("--min-freq", d.min_freq)]:
            if value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        if self.optim.warmup_steps < 0 or self.dist.check_sync_interval < 0:
            raise UsageError("--warmup-steps and --check-sync-interval must be >= 0")
        rel = self.reliability
        if rel.keep_checkpoints <= 0:
            raise UsageError(f"--keep-checkpoints must be a positive integer, got "
                             f"{rel.keep_checkpoints}")
        for name, value in [("--checkpoint-steps", rel.checkpoint_steps),
                            ("--checkpoint-minutes", rel.checkpoint_minutes),
                            ("--watchdog-s", rel.watchdog_s),
                            ("--checkpoint-timeout-s", rel.checkpoint_timeout_s)]:
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a non-negative number, got {value}")
        for name, value in [("--fusion-threshold-mb", self.dist.fusion_threshold_mb),
                            ("--cycle-time-ms", self.dist.cycle_time_ms)]:
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{name} must be a positive number, got {value}")
        for name, value in [("--eval-batch-size", r.eval_batch_size),
                            ("--test-batch-size", r.test_batch_size),
                            ("--global-batch-size", r.global_batch_size),
                            ("--max-steps", r.max_steps), ("--max-vocab", d.max_vocab),
                            ("--sampled-softmax", o.sampled_softmax)]:
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        for name, value in [("--dropout", m.dropout), ("--weight-drop", m.weight_drop),
                            ("--drop-h", m.drop_h), ("--drop-i", m.drop_i),
                            ("--drop-e", m.drop_e)]:
            if not 0.0 <= value < 1.0:
                raise UsageError(f"{name} must be in [0, 1), got {value}")
        for name, value in [("--lr", o.lr), ("--lr-decay", o.lr_decay)]:
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"{name} must be a positive number, got {value}")
        for name, value in [("--clip", o.clip), ("--momentum", o.momentum), ("--wd", o.wd),
                            ("--alpha", o.alpha), ("--beta", o.beta)]:
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name} must be a non-negative number, got {value}")
        self._validate_awd()
        if m.tie_weights and m.embed_size != m.hidden_size and m.family == "standard":
            raise UsageError("--tie-weights needs --embed-size equal to --hidden-size "
                             f"(got {m.embed_size} and {m.hidden_size})")
        if self.dist.exchange == "rows" and o.sampled_softmax is None:
            raise UsageError("--exchange rows needs --sampled-softmax (with the full "
                             "softmax every decoder row has a gradient)")
        if m.model not in PRESETS and m.model != "custom":
            raise UsageError(f"unknown model '{m.model}'; choose from "
                             f"{', '.join(sorted(PRESETS))} or 'custom'")
        if self.run.run_dir is None:
            self.run.run_dir = os.path.join("runs", m.model)
        if self.run.test_batch_size is None:
            self.run.test_batch_size = self.run.eval_batch_size
        return self

    def _validate_awd(self) -> None:
        """The AWD recipe's options (docs/awd.md)."""
        o = self.optim
        for name, value in [("--lr-update-interval", o.lr_update_interval),
                            ("--ntasgd-nonmono", o.ntasgd_nonmono)]:
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value}")
        for name, value in [("--lr-update-factor", o.lr_update_factor),
                            ("--adam-epsilon", o.adam_epsilon)]:
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"{name} must be a positive number, got {value}")
        if not 0.0 <= o.adam_beta1 < 1.0:
            raise UsageError(f"--adam-beta1 must be in [0, 1), got {o.adam_beta1}")
        if o.ntasgd and o.optimizer != "sgd":
            raise UsageError(f"--ntasgd averages SGD iterates; it needs --optimizer sgd, "
                             f"not {o.optimizer}")
        if (o.alpha or o.beta) and o.sampled_softmax is not None:
            raise UsageError("--alpha/--beta regularize the full-softmax objective; set "
                             "them to 0 with --sampled-softmax")

    def for_world(self, ranks: int) -> "Config":
        """Resolves the options that depend on the number of ranks: a --global-batch-size
        G is split over any N <= G ranks (`data.text.column_range`: contiguous blocks of
        G // N or G // N + 1 columns; `batch_size` becomes the smaller, G // N), and the
        same global evaluation layout is kept."""
        g = self.run.global_batch_size
        if g is not None:
            if ranks > g:
                raise UsageError(f"--global-batch-size {g} is smaller than the {ranks} ranks: "
                                 f"every rank trains on at least one column; use at most {g} "
                                 f"ranks or a --global-batch-size of at least {ranks}")
            self.run.batch_size = g // ranks
        return self

    def global_columns(self, ranks: int) -> int:
        """G, the training columns over all ranks: --global-batch-size, else ranks x
        --batch-size."""
        return self.run.global_batch_size or ranks * self.run.batch_size

    def world_size_dependence(self) -> List[str]:
        """Why the numbers of this run depend on its number of ranks N, one reason per
        setting (none: N ranks take exactly the steps of one process with the global
        batch, up to float reduction noise, runtime/dist.py). The one place this is
        decided: `dist-lm launch` in elastic mode refuses a run with reasons (elastic.py),
        and the run records them (run.json) and says them at start."""
        o, reasons = self.optim, []
        if self.run.global_batch_size is None:
            reasons.append("no --global-batch-size (the global batch is ranks x "
                           "--batch-size)")
        if o.clip_mode == "local":
            reasons.append("--clip-mode local (each rank clips its own gradient before "
                           "the average)")
        if o.lr_scaling != "none":
            reasons.append(f"--lr-scaling {o.lr_scaling} (the lr is scaled with the rank "
                           f"count)")
        if self.dist.fp16_allreduce:
            reasons.append("--fp16-allreduce (each rank's gradient is rounded to float16 "
                           "before the sum)")
        return reasons

    def scaled_lr(self, ranks: int) -> float:
        """--lr after --lr-scaling. 'linear' keeps the per-sample step size of a run whose
        per-rank batch is fixed (the global batch grows with N) but is unstable at large N
        without warm-up; 'sqrt' is the gentler compromise; 'none' is right when the global
        batch is the same as the single-process recipe's."""
        factor = {"none": 1.0, "linear": float(ranks), "sqrt": math.sqrt(ranks)}
        return self.optim.lr * factor[self.optim.lr_scaling]


# --- command line -------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    if get_origin(tp) is Union:  # Optional[X]
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def default_help(group: str, f: dataclasses.Field) -> str:
    """What `--help` says of a field's default: the value a bare `dist-lm train` trains
    with (the field's, or the default model preset's or its recipe's), and which presets
    and recipes set it otherwise; '' when there is nothing to say."""
    model = ModelConfig().model
    bare = dict(recipe_of("auto", PRESETS[model]["family"]).get(group, {}))
    if group == "model":
        bare.update(PRESETS[model])
    value = bare.get(f.name, f.default)
    parts = [f"default: {value if value is not None else f.metadata['shown']}"] \
        if value is not None or f.metadata["shown"] else []
    if group == "model" and f.name != "model" and any(f.name in p for p in PRESETS.values()):
        parts.append("set by the --model preset")
    parts += [f"{name} recipe: {recipe[group][f.name]}" for name, recipe in RECIPES.items()
              if recipe.get(group, {}).get(f.name, value) != value]
    return f" ({'; '.join(parts)})" if parts else ""


def metavar(name: str, tp: Any) -> str:
    """What `--help` shows a field's value as: what it is, not its type's letter."""
    if tp is str:
        return {"model": "MODEL", "context": "DEVICE", "resume": "{auto,none,DIR}"}.get(
            name, "DIR" if name.endswith("_dir") else "FILE")
    return {int: "N", float: "X"}[tp]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per Config field; defaults are None so explicit flags can be told
    apart (their help names the real default, `default_help`)."""
    parser.add_argument("--config", metavar="FILE", help="JSON config file (e.g. a run's "
                        "config.json); flags given here override it")
    for group, klass in GROUPS.items():
        hints = get_type_hints(klass)
        arg_group = parser.add_argument_group(group)
        for f in dataclasses.fields(klass):
            tp = _base_type(hints[f.name])
            kwargs: dict = {"dest": f"{group}.{f.name}", "default": None,
                            "help": f.metadata["help"] + default_help(group, f)}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = tp
                kwargs["metavar"] = metavar(f.name, tp)
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                    kwargs.pop("metavar")
            arg_group.add_argument(_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    """Applies the precedence: defaults < preset < --config file < explicit flags."""
    explicit = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    file_cfg: dict = {}
    if getattr(args, "config", None):
        try:
            with open(args.config, encoding="utf-8") as fh:
                file_cfg = json.load(fh)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot read --config {args.config}: {err}") from None
        Config.from_dict(file_cfg, source=args.config)  # refuse unknown keys early
    given = dict(explicit, **{f"{group}.{name}": value for group, values in file_cfg.items()
                              if isinstance(values, dict) for name, value in values.items()
                              if f"{group}.{name}" not in explicit})
    model_name = given.get("model.model") or ModelConfig().model
    recipe = recipe_of(given.get("run.recipe", "auto"), given.get("model.family") or
                       PRESETS.get(model_name, {}).get("family", ModelConfig().family))
    merged: dict = {group: dict(values) for group, values in recipe.items()}
    merged["model"] = dict(PRESETS.get(model_name, {}), model=model_name)
    if "run.batch_size" in given and "run.global_batch_size" not in given:
        # A per-rank --batch-size of the user's replaces the recipe's global batch.
        merged.get("run", {}).pop("global_batch_size", None)
    for group, values in file_cfg.items():
        merged.setdefault(group, {}).update(values)
    for key, value in explicit.items():
        group, name = key.split(".")
        merged.setdefault(group, {})[name] = value
    return Config.from_dict(merged).validate()


def recipe_of(name: str, family: str) -> dict:
    """The recipe's Config values by section; 'auto' is the family's recipe."""
    if name == "auto":
        name = family if family in RECIPES else "standard"
    if name not in RECIPES:
        raise UsageError(f"unknown recipe '{name}'; choose from auto, "
                         f"{', '.join(sorted(RECIPES))}")
    return RECIPES[name]


# --- dist-lm launch ---------------------------------------------------------------------------

@dataclass
class LaunchConfig:
    """`dist-lm launch`'s own options (runtime/launch.py, runtime/elastic.py); Horovod's
    flag names where horovodrun has the same option. With --host-discovery-script the job
    is elastic."""

    grace: float = opt(20.0, "seconds the launcher has to end once the job is seen failing, "
                             "then its session is killed")
    host_discovery_script: Optional[str] = opt(
        None, "elastic mode: an executable that prints the usable hosts, one `host` or "
              "`host:slots` per line (the MPI Operator's /etc/mpi/discover_hosts.sh); "
              "polled, and the job is restarted on the hosts it lists", shown="not elastic")
    min_np: int = opt(1, "elastic: the fewest ranks the job trains with; with fewer slots "
                         "it waits for hosts (--elastic-timeout). Each rank's share of the "
                         "global batch grows as ranks go: G/min-np columns must fit a device")
    max_np: Optional[int] = opt(None, "elastic: the most ranks (at most the training "
                                      "command's --global-batch-size)",
                                shown="--global-batch-size")
    slots_per_host: int = opt(1, "elastic: ranks on a host whose discovery line gives no "
                                 "slots")
    reset_limit: int = opt(20, "elastic: restarts after failures (a lost rank or host) "
                               "before the job ends; growing does not count")
    blacklist_cooldown_range: Optional[tuple] = opt(
        (60.0, 600.0), "elastic: MIN MAX seconds a host that failed sits out, doubling from "
                       "MIN with each failure of that host up to MAX")
    elastic_timeout: float = opt(600.0, "elastic: seconds to wait for --min-np slots before "
                                        "the job ends")
    discovery_interval: float = opt(5.0, "elastic: seconds between runs of the discovery "
                                         "script while the job trains")
    grow_interval: float = opt(120.0, "elastic: a job that could grow restarts larger no "
                                      "sooner than this many seconds after its last (re)start")
    checkpoint_minutes: float = opt(5.0, "elastic: the training command's "
                                         "--checkpoint-minutes when it sets neither that nor "
                                         "--checkpoint-steps (a lost host costs the steps "
                                         "since the last checkpoint)")
    busy_timeout: Optional[float] = opt(
        None, "elastic: seconds, in all, to start the world again while its run directory "
              "is still locked by a rank of an earlier world (exit 5), before the job ends; "
              "not counted against --reset-limit",
        shown="the training command's longer of --checkpoint-timeout-s and --watchdog-s, "
              "+ 120")
    allow_world_size_dependence: bool = opt(
        False, "elastic: run a training command whose numbers depend on the rank count "
               "(--clip-mode local, --lr-scaling linear or sqrt, --fp16-allreduce), which "
               "changes between worlds; refused without this flag "
               "(docs/reliability.md, \"When the numbers do not depend on N\")")

    @property
    def elastic(self) -> bool:
        return self.host_discovery_script is not None

    def validate(self) -> "LaunchConfig":
        low, high = self.blacklist_cooldown_range
        checks = [("--grace", self.grace > 0), ("--slots-per-host", self.slots_per_host > 0),
                  ("--reset-limit", self.reset_limit >= 0),
                  ("--blacklist-cooldown-range", 0 <= low <= high),
                  ("--elastic-timeout", self.elastic_timeout > 0),
                  ("--discovery-interval", self.discovery_interval > 0),
                  ("--grow-interval", self.grow_interval >= 0),
                  ("--checkpoint-minutes", self.checkpoint_minutes > 0),
                  ("--busy-timeout", self.busy_timeout is None or self.busy_timeout > 0),
                  ("--min-np", self.min_np > 0),
                  ("--max-np", self.max_np is None or self.max_np > 0)]
        for flag, ok in checks:
            if not ok:
                raise UsageError(f"{flag}: out of range (see dist-lm launch --help)")
        if self.min_np and self.max_np and self.min_np > self.max_np:
            raise UsageError(f"--min-np {self.min_np} is above --max-np {self.max_np}")
        given = [f for f, v in [("--min-np", self.min_np != 1), ("--max-np", self.max_np),
                                ("--allow-world-size-dependence",
                                 self.allow_world_size_dependence)] if v]
        if given and not self.elastic:
            raise UsageError(f"{given[0]} needs --host-discovery-script (elastic mode)")
        return self


def launch_parser() -> argparse.ArgumentParser:
    """`dist-lm launch [OPTIONS] LAUNCHER [ARGS...]`: one flag per LaunchConfig field."""
    parser = argparse.ArgumentParser(
        prog="dist-lm launch", description="Runs LAUNCHER (mpirun, horovodrun) so that the "
        "job ends whole, with one line that names a lost rank or node; with "
        "--host-discovery-script, elastically (docs/reliability.md).")
    hints = get_type_hints(LaunchConfig)
    for f in dataclasses.fields(LaunchConfig):
        tp = _base_type(hints[f.name])
        shown = f.metadata["shown"] or f.default
        shown = " ".join(map(str, shown)) if isinstance(shown, tuple) else shown
        kwargs: dict = {"dest": f.name, "default": f.default,
                        "help": f"{f.metadata['help']} (default: {shown})"}
        if tp is tuple:
            kwargs.update(nargs=2, type=float, metavar=("MIN", "MAX"))
        elif tp is bool:
            kwargs.update(action="store_true", help=f.metadata["help"])
        else:
            kwargs.update(type=tp, metavar={int: "N", str: "FILE"}.get(
                tp, "MINUTES" if f.name.endswith("minutes") else "SECONDS"))
        parser.add_argument(_flag(f.name), **kwargs)
    parser.add_argument("launcher", nargs=argparse.REMAINDER,
                        help="the launcher's command line: mpirun ... dist-lm train ...")
    return parser


def launch_config_from_args(args: argparse.Namespace) -> LaunchConfig:
    return LaunchConfig(**{f.name: (tuple(getattr(args, f.name))
                                    if f.name == "blacklist_cooldown_range"
                                    else getattr(args, f.name))
                           for f in dataclasses.fields(LaunchConfig)}).validate()
