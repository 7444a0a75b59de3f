"""What a run tells people: console lines, TensorBoard scalars and metrics.jsonl.

`make_reporter` is called once at start-up: rank 0 gets a `Reporter` (console in the
reference notebook's format, a tqdm bar when stdout is a terminal, a tensorboardX writer
and `metrics.jsonl` in the run directory); every other rank gets a `QuietReporter` with
the same methods that does nothing, so the training loop never asks which rank it is.
Every value handed in is already global (reduced over ranks); nothing here touches a
device, so logging costs no synchronisation beyond the one the loop does on log steps.

TensorBoard: every scalar is logged against the global step, and again under `by_tokens/`
against the number of training tokens seen, so runs with different rank counts line up.

Besides the log steps and evaluations, the run's history holds the world each start of
training ran in (a `world` record at the step it started from: `world/ranks`,
`world/restarts` and, under an elastic supervisor, why the world was restarted and its
hosts, from runtime/selfreport.py's WORLD) and what each checkpoint cost (a `checkpoint`
record, `checkpoint/write_s`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, TextIO

from ..errors import UsageError
from ..runtime import selfreport


@dataclass
class TrainStats:
    """One log interval, global over ranks."""

    epoch: int
    batch: int             # batches done in this epoch
    num_batches: int       # batches per epoch
    step: int              # optimizer steps done in all
    tokens: int            # training tokens seen in all (all ranks)
    loss: float            # mean token loss over the interval
    lr: float
    grad_norm: float       # mean over the interval of the mean gradient's norm
    clipped: float         # fraction of the interval's steps that were clipped
    samples_per_s: float   # a sample is one column of bptt tokens
    tokens_per_s: float
    ranks: int
    nonfinite_steps: int   # steps skipped for a NaN/Inf so far (--nonfinite skip)
    rss_mb: float          # resident memory, the largest over ranks
    # With --alpha/--beta: the interval's mean AR and TAR terms. `loss` stays the plain
    # cross-entropy (what perplexity means); the objective trained on is loss + ar + tar.
    ar: Optional[float] = None
    tar: Optional[float] = None


# The rows that say how far the run got: a train row's step was reached, a checkpoint
# row's (and a world row's, at a resume) is checkpointed.
PROGRESS = {"train": "step", "checkpoint": "checkpoint", "world": "checkpoint"}


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Reporter:
    def __init__(self, run_dir: Optional[str] = None, config: Optional[dict] = None,
                 stream: Optional[TextIO] = None, steps_per_epoch: int = 0,
                 resume_step: int = 0, resume_tokens: int = 0,
                 fence: Callable[[], None] = lambda: None):
        """fence(): raises when this job no longer holds the run directory (checked
        before each metrics.jsonl write, rundir.RunDirLock.check)."""
        self.out = stream or sys.stdout
        self.fence = fence
        self.run_dir, self.config = run_dir, config
        self.writer = self.token_writer = self.jsonl = self.bar = None
        self.best: Dict[str, float] = {}
        # With --sampled-softmax the training loss is the sampled objective, lower than
        # the cross-entropy over all words: it is named so, and no perplexity is derived
        # from it (validation and test use the full softmax).
        self.sampled = bool(config and config.get("optim", {}).get("sampled_softmax"))
        if run_dir is not None:
            from tensorboardX import SummaryWriter
            # Records after the checkpoint a run resumes from are replayed: drop them from
            # metrics.jsonl, and have TensorBoard discard them (purge_step), so curves go
            # on without duplicated steps. The pid in the file name: one events file per
            # writing process.
            metrics = os.path.join(run_dir, "metrics.jsonl")
            _truncate_records(metrics, resume_step, fence)
            purge = resume_step + 1 if resume_step else None
            self.writer = SummaryWriter(run_dir, filename_suffix=f".{os.getpid()}",
                                        purge_step=purge)
            # Tokens-seen curves live in their own event file, whose steps are tokens.
            self.token_writer = SummaryWriter(
                os.path.join(run_dir, "by_tokens"), filename_suffix=f".{os.getpid()}",
                purge_step=resume_tokens + 1 if resume_step else None)
            self.jsonl = open(metrics, "a", encoding="utf-8")
            if config is not None:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=2)
                                     + "\n```", 0)
        if steps_per_epoch and self.out.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps_per_epoch, unit="batch", dynamic_ncols=True,
                            file=self.out, leave=False)

    # --- sinks -----------------------------------------------------------------------
    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def record(self, kind: str, step: int, tokens: int, values: Dict[str, float]) -> None:
        """One metrics.jsonl object and the same values as TensorBoard scalars; for a
        supervisor, a progress record of the step reached or checkpointed."""
        if kind in PROGRESS and (step or kind != "world"):  # a fresh start resumed nothing
            selfreport.progress(**{PROGRESS[kind]: step})
        try:
            if self.jsonl is not None:
                self.fence()
                self.jsonl.write(json.dumps(dict(kind=kind, step=step, tokens=tokens,
                                                 time=time.time(), **values)) + "\n")
                self.jsonl.flush()
            if self.writer is not None:
                for tag, value in values.items():
                    if "/" in tag:
                        self.writer.add_scalar(tag, value, step)
                        self.token_writer.add_scalar("by_tokens/" + tag, value, tokens)
                self.writer.flush()
                self.token_writer.flush()
        except OSError as err:
            # A full disk or failed storage: one line on every rank (run_everywhere's
            # peers see rank 0 go), exit 2, or 7 if it may pass (errors.exit_code_of);
            # the sinks are dropped so that closing them at exit does not fail again.
            self._abandon_sinks()
            raise UsageError(f"cannot write the run's metrics in {self.run_dir}: "
                             f"{err.strerror or err}") from err

    # --- events ------------------------------------------------------------------------
    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar (terminals only); no device work."""
        if self.bar is not None:
            self.bar.update(steps)

    def train(self, s: TrainStats) -> None:
        if self.sampled:
            objective = f"sampled-softmax loss {s.loss:.2f}"
            values = {"train/sampled_loss": s.loss}
        else:
            objective = f"loss {s.loss:.2f}, ppl {ppl(s.loss):.2f}"
            values = {"train/loss": s.loss, "train/ppl": ppl(s.loss)}
        if s.ar is not None:
            objective += (f", objective {s.loss + s.ar + s.tar:.2f} (AR {s.ar:.3f}, "
                          f"TAR {s.tar:.3f})")
            values.update({"train/objective": s.loss + s.ar + s.tar, "train/ar": s.ar,
                           "train/tar": s.tar})
        self.line(f"[Epoch {s.epoch} Batch {s.batch}/{s.num_batches}] {objective}, "
                  f"throughput {s.samples_per_s:.2f} samples/s, {s.tokens_per_s:.0f} tokens/s")
        self.record("train", s.step, s.tokens, {
            "epoch": s.epoch, "batch": s.batch, **values, "train/lr": s.lr,
            "train/grad_norm": s.grad_norm, "train/clipped_fraction": s.clipped,
            "throughput/tokens_per_s": s.tokens_per_s,
            "throughput/samples_per_s": s.samples_per_s,
            "throughput/tokens_per_s_per_rank": s.tokens_per_s / s.ranks,
            "train/nonfinite_steps": s.nonfinite_steps,
            "system/ranks": s.ranks, "system/rss_mb_max": s.rss_mb})

    def world(self, step: int, tokens: int, ranks: int, info: dict) -> None:
        """The world this start of training runs in: `info` is what the supervisor said
        of it (selfreport.world(): restart, reason, hosts; {} when it said nothing)."""
        restart = info.get("restart", 0)
        restart = restart if isinstance(restart, int) else 0
        reason, hosts = info.get("reason"), info.get("hosts")
        said = [f"restart {restart}" + (f": {reason}" if reason else "")] \
            if "restart" in info else []
        said += [f"hosts {hosts}"] if hosts else []
        self.line(f"World: {ranks} rank{'s' if ranks != 1 else ''}"
                  + (f" ({'; '.join(said)})" if said else ""))
        self.record("world", step, tokens, {"world/ranks": ranks, "world/restarts": restart,
                                            "reason": reason, "hosts": hosts})

    def world_size_dependence(self, reasons: List[str], global_columns: int) -> None:
        """Whether the run's numbers depend on its rank count (Config.world_size_dependence;
        run.json records the same)."""
        if reasons:
            self.line(f"The numbers depend on the rank count: {'; '.join(reasons)}")
        else:
            self.line(f"The numbers do not depend on the rank count: each step is the one "
                      f"process with the {global_columns} global columns takes")

    def checkpoint(self, step: int, tokens: int, seconds: float) -> None:
        """A checkpoint was written in `seconds` (wall, from the gather of the hidden
        states to the agreement that it was written)."""
        self.record("checkpoint", step, tokens, {"checkpoint/write_s": seconds})

    def epoch_start(self, epoch: int, batch: int = 0) -> None:
        if self.bar is not None:
            self.bar.reset()
            self.bar.update(batch)
            self.bar.set_description(f"epoch {epoch}")

    def epoch_end(self, epoch: int, step: int, tokens: int, seconds: float,
                  samples_per_s: float, tokens_per_s: float) -> None:
        self.line(f"[Epoch {epoch}] throughput {samples_per_s:.2f} samples/s, "
                  f"{tokens_per_s:.0f} tokens/s")
        self.record("epoch", step, tokens, {"epoch": epoch, "time/epoch_s": seconds,
                                            "throughput/epoch_samples_per_s": samples_per_s})

    def baseline(self, step: int, tokens: int, loss: float) -> None:
        self.line(f"[Start] valid loss {loss:.2f}, valid ppl {ppl(loss):.2f}")
        self.record("valid", step, tokens, {"val/loss": loss, "val/ppl": ppl(loss)})

    def valid(self, epoch: int, step: int, tokens: int, seconds: float, loss: float) -> None:
        self.line(f"[Epoch {epoch}] time cost {seconds:.2f}s, valid loss {loss:.2f}, "
                  f"valid ppl {ppl(loss):.2f}")
        self.best["best_val_ppl"] = min(self.best.get("best_val_ppl", math.inf), ppl(loss))
        self.record("valid", step, tokens, {"epoch": epoch, "val/loss": loss,
                                            "val/ppl": ppl(loss)})

    def paused(self, epoch: int, batch: int, num_batches: int, step: int, tokens: int,
               loss: float) -> None:
        """Validation where --max-steps paused an epoch: information, no lr decision."""
        self.line(f"Paused by --max-steps at step {step} (epoch {epoch}, batch "
                  f"{batch}/{num_batches}): valid loss {loss:.2f}, valid ppl {ppl(loss):.2f}")
        self.record("valid", step, tokens, {"epoch": epoch, "val/loss": loss,
                                            "val/ppl": ppl(loss), "paused": True})

    def test(self, step: int, tokens: int, loss: float) -> None:
        self.line(f"test loss {loss:.2f}, test ppl {ppl(loss):.2f}")
        self.best["test_ppl"] = ppl(loss)
        self.record("test", step, tokens, {"test/loss": loss, "test/ppl": ppl(loss)})

    def lr_change(self, lr: float) -> None:
        self.line(f"Learning rate now {lr:f}")

    def averaging(self, epoch: int, step: int, tokens: int, nonmono: int) -> None:
        """NT-ASGD switched to averaging after this epoch's validation."""
        self.line(f"[Epoch {epoch}] switching to NT-ASGD at step {step}: validation did not "
                  f"improve on the best before the last {nonmono} checks; validating and "
                  f"saving the average of the parameters from here")
        self.record("ntasgd", step, tokens, {"epoch": epoch, "ntasgd/trigger_step": step})

    def started(self, ranks: int) -> None:
        """The first line of a run: where its files go and how to watch them."""
        self.line(f"Run directory {self.run_dir} ({ranks} rank{'s' if ranks != 1 else ''}); "
                  f"watch it with: tensorboard --logdir {self.run_dir}")

    def done(self, step: int, tokens: int, seconds: float, samples_per_s: float,
             tokens_per_s: float = math.nan) -> None:
        self.line(f"Total training throughput {samples_per_s:.2f} samples/s, "
                  f"{tokens_per_s:.0f} tokens/s")
        self.best["wall_time_s"] = seconds
        self.record("done", step, tokens, {"time/total_s": seconds,
                                           "throughput/total_samples_per_s": samples_per_s})
        if self.writer is not None and self.config is not None:
            self.writer.add_hparams(_flat_hparams(self.config),
                                    {f"hparam/{k}": v for k, v in self.best.items()},
                                    name="hparams", global_step=step)

    def wrote(self) -> None:
        """The last line of a finished run: what is in its run directory."""
        if self.run_dir is None:
            return
        d = self.run_dir
        names = [n for n in ("best.params", "final.params") if os.path.isfile(os.path.join(d, n))]
        ckpt = os.path.join(d, "checkpoints")
        steps = sorted(n for n in os.listdir(ckpt) if n.startswith("step-")) \
            if os.path.isdir(ckpt) else []
        if steps:
            names.append(f"checkpoints/ ({len(steps)}, newest {steps[-1]})")
        names += ["metrics.jsonl", "TensorBoard events (events.out.tfevents.*, by_tokens/, "
                  "hparams/)"]
        self.line(f"Wrote {d}: {', '.join(names)}")

    def _abandon_sinks(self) -> None:
        """Drops metrics.jsonl and the TensorBoard writers after a write failed: closed
        where they still can be, and marked closed where they cannot (tensorboardX closes
        its writers again at exit, which would flush, fail and print a traceback)."""
        for writer in (self.writer, self.token_writer):
            if writer is None:
                continue
            with contextlib.suppress(Exception):
                writer.close()
            for file_writer in (writer.all_writers or {}).values():
                event_writer = getattr(file_writer, "event_writer", None)
                if event_writer is not None:
                    event_writer._closed = True
        if self.jsonl is not None:
            with contextlib.suppress(OSError):
                self.jsonl.close()
        self.writer = self.token_writer = self.jsonl = None

    def close(self) -> None:
        """Flushes and closes everything; safe to call twice (normal exit, error, SIGTERM)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.token_writer.close()
            self.writer = self.token_writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        self.out.flush()


def _truncate_records(path: str, after_step: int, fence: Callable[[], None]) -> None:
    """Keeps the metrics.jsonl lines with step <= after_step (all of them on a fresh run
    in a new directory), rewriting the file atomically."""
    if not os.path.exists(path):
        return
    from .rundir import write_text

    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= after_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash
    if len(keep) != len(lines):
        write_text(path, "".join(keep), fence)


def _flat_hparams(config: dict) -> Dict[str, object]:
    flat = {}
    for group, values in config.items():
        for key, value in values.items():
            flat[f"{group}.{key}"] = value if isinstance(value, (bool, int, float, str)) \
                else str(value)
    return flat


class QuietReporter(Reporter):
    """The reporter of ranks other than 0: same methods, no output, no files."""

    def __init__(self) -> None:
        super().__init__()

    def line(self, text: str) -> None:
        pass

    def record(self, kind: str, step: int, tokens: int, values: Dict[str, float]) -> None:
        pass

    def done(self, step: int, tokens: int, seconds: float, samples_per_s: float,
             tokens_per_s: float = math.nan) -> None:
        pass

    def wrote(self) -> None:
        pass


def make_reporter(is_root: bool, run_dir: str, config: dict, steps_per_epoch: int,
                  resume_step: int = 0, resume_tokens: int = 0,
                  fence: Callable[[], None] = lambda: None) -> Reporter:
    if not is_root:
        return QuietReporter()
    return Reporter(run_dir, config, steps_per_epoch=steps_per_epoch,
                    resume_step=resume_step, resume_tokens=resume_tokens, fence=fence)
