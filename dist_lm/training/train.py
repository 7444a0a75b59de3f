"""Training: the reference notebook's recipe, or the AWD-LSTM one, on any number of ranks.

`train` locks the run directory for the job (rank 0, before writing anything there) and
builds the run once: the config for this many ranks, this rank's columns of the data
(b_r of the G global columns at any N <= G ranks, weighted so that N ranks take one
process's steps, runtime/dist.py), the model and its trainer, the checkpoint parts
(restored on --resume), and the objects that do rank-0 work (reporter, run directory;
quiet versions on other ranks). The run's history records the world it starts in, and
the rank's exit record its step and newest checkpoint (runtime/selfreport.py).
`fit` is the loop, top to bottom: epochs of BPTT steps, a log line every --log-interval
steps, checkpoints when agreed, and at each epoch end validation, the plateau decision,
the test pass at a new best and a checkpoint. Nothing in it asks which rank it is on.
The AWD recipe's parts are objects chosen at start-up, which do nothing in the standard
recipe: the epoch's windows (fixed or variable-length BPTT, bptt.py), the AR/TAR sums of
the log (regularize.py) and the NT-ASGD average (ntasgd.py), which evaluation and the
saved parameters use once it has switched on.

Where a run stops, and what a resumed run does:
- epoch end: checkpoint after validation; resume starts the next epoch;
- --max-steps inside an epoch (a pause): checkpoint at that step, then the validation
  perplexity of the parameters there is reported for information only (no plateau
  decision, no best.params, no test pass: those belong to epoch ends); a resumed run
  with a larger --max-steps continues the epoch and ends exactly where an uninterrupted
  run ends;
- a signal (SIGTERM/SIGINT) during training: checkpoint at the agreed step;
- a signal during validation or test: the evaluation is abandoned within two batches
  and the checkpoint holds the end of the epoch's training, so a resumed run evaluates
  again and takes the same decision.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import mxnet as mx

from ..config import Config
from ..data.bptt import make_windows
from ..data.corpus import Corpus, eval_columns, load_corpus
from ..data.text import column_range
from ..errors import Preempted
from ..model import build_model
from ..runtime import selfreport
from ..runtime.dist import World, run_everywhere
from ..runtime.launcher_env import launcher_gone
from ..runtime.lifecycle import STOP, Agreement, StopAgreed, Watchdog
from .checkpoint import Checkpointer, Parts, Progress, hidden_for_rank
from .evaluate import Evaluator
from .meter import IntervalMeter
from .ntasgd import make_averager
from .observe import TrainStats, make_reporter
from .regularize import make_terms
from .rundir import make_run_dir
from .schedule import LRSchedule
from .stepper import Stepper, seed_everything


@dataclass
class Run:
    """Everything the loop works with, built once by `train`."""

    cfg: Config
    world: World
    ctx: mx.Context
    corpus: Corpus
    model: object
    stepper: Stepper
    schedule: LRSchedule
    progress: Progress
    meter: IntervalMeter
    windows: object       # bptt.FixedWindows or VariableWindows
    terms: object         # regularize.TermSums or NoTerms
    average: object       # ntasgd.Averager or NoAverage
    checkpointer: Checkpointer
    agreement: Agreement
    valid: Evaluator
    test: Evaluator
    run_dir: object
    reporter: object
    watchdog: Optional[Watchdog] = None

    @property
    def columns(self) -> int:
        """b_r, this rank's training columns (its recurrent state's batch size)."""
        return self.corpus.train.columns

    @property
    def global_columns(self) -> int:
        """G, the training columns over all ranks: a step's samples."""
        return self.cfg.global_columns(self.world.size)

    def tokens(self) -> int:
        """Training tokens seen over all ranks."""
        return self.windows.rows(self.progress) * self.global_columns

    def heartbeat(self) -> None:
        """After every evaluation batch: progress for the watchdog, stop agreement."""
        self.watchdog.beat()
        self.agreement.poll_stop()


def train(cfg: Config, world: World) -> dict:
    """Runs the whole training job on this rank; returns the run's summary on every rank."""
    cfg = run_everywhere(world, lambda: cfg.for_world(world.size), "config")
    seed_everything(cfg.run.seed)
    ctx = world.context(cfg.run.context)
    run_dir = run_everywhere(world, lambda: make_run_dir(cfg.run.run_dir, world.is_root),
                             "run-dir")
    try:
        return train_in(run_dir, cfg, world, ctx)
    finally:
        run_dir.release()


def train_in(run_dir, cfg: Config, world: World, ctx: mx.Context) -> dict:
    """The job in its locked run directory: the run is built, then fitted."""
    corpus = load_corpus(cfg, world)
    vocab_json = corpus.vocab_json
    model = build_model(cfg.model, len(corpus.vocab))
    model.initialize(mx.init.Xavier(), ctx=ctx)
    # w_r = b_r N / G: this rank's share of the global mean, for the gradient and the log.
    g = cfg.global_columns(world.size)
    weight = corpus.train.columns * world.size / g
    stepper = Stepper(model, cfg, world, ctx, weight)
    o, progress = cfg.optim, Progress()
    windows = make_windows(corpus.train, cfg.run.variable_bptt, cfg.run.bptt, cfg.run.seed,
                           progress)
    parts = Parts(model, stepper.trainer,
                  LRSchedule(cfg.scaled_lr(world.size), o.warmup_steps, o.lr_decay,
                             interval=o.lr_update_interval, factor=o.lr_update_factor),
                  progress, IntervalMeter(world, ctx, o.clip, cfg.reliability.nonfinite,
                                          weight),
                  make_terms(o.alpha, o.beta, world, ctx, weight),
                  make_averager(o.ntasgd, model, o.ntasgd_nonmono))
    checkpointer = Checkpointer(parts, world, run_dir, cfg, vocab_json,
                                corpus.train.num_batches, windows.done, corpus.digests)
    hidden = checkpointer.resume(ctx)
    world.broadcast_params(model.collect_params())
    run_dir.write_json("config.json", cfg.to_dict())
    run_dir.write_text("vocab.json", vocab_json)
    columns = eval_columns(cfg)
    # Whether another rank count would take other steps, and why (Config decides).
    dependence = cfg.world_size_dependence()
    run_dir.write_json("run.json", {"ranks": world.size, "eval_columns": columns,
                                    "train_columns": [len(column_range(g, r, world.size))
                                                      for r in range(world.size)],
                                    "world_size_invariant": not dependence,
                                    "world_size_dependence": dependence})
    run = Run(cfg, world, ctx, corpus, model, stepper, parts.schedule, parts.progress,
              parts.meter, windows, parts.terms, parts.average, checkpointer,
              Agreement(world, cfg.reliability.checkpoint_minutes,
                        cfg.reliability.checkpoint_steps),
              Evaluator(model, corpus.valid, columns["valid"], world, ctx),
              Evaluator(model, corpus.test, columns["test"], world, ctx), run_dir, None)
    run.reporter = make_reporter(world.is_root, cfg.run.run_dir, cfg.to_dict(),
                                 windows.num_batches, resume_step=parts.progress.step,
                                 resume_tokens=run.tokens(), fence=run_dir.fence)
    run.reporter.started(world.size)
    run.reporter.world(progress.step, run.tokens(), world.size, selfreport.world())
    run.reporter.world_size_dependence(dependence, g)
    selfreport.describe("training", lambda: {"step": progress.step,
                                             "checkpoint": checkpointer.newest_step})
    STOP.arm()
    try:
        with Watchdog(cfg.reliability.watchdog_s, orphaned=launcher_gone) as run.watchdog:
            return fit(run, hidden_for_rank(hidden, world, ctx) if hidden else None)
    finally:
        STOP.arm(False)
        run.reporter.close()


def fit(run: Run, states) -> dict:
    """The epochs. `states`: this rank's recurrent state to continue an epoch with."""
    cfg, p, windows = run.cfg, run.progress, run.windows
    max_steps = cfg.run.max_steps or math.inf
    start, first_step = time.time(), p.step
    if cfg.run.eval_first and p.step == 0:
        run.reporter.baseline(p.step, run.tokens(), evaluate(
            run, run.valid, run.model.begin_state(run.columns, run.ctx)))
    # An epoch whose batches are all done is resumed for its validation.
    while p.epoch < cfg.run.epochs and (p.step < max_steps or windows.done(p)):
        run.reporter.epoch_start(p.epoch, p.batch)
        epoch_start, epoch_first_step = time.time(), p.step
        run.meter.restart_clock()  # not the evaluation, checkpoint or resume before it
        if states is None:
            states = run.model.begin_state(run.columns, run.ctx)
        while not windows.done(p) and p.step < max_steps:
            states = train_step(run, states)
            stop, checkpoint = run.agreement.poll(p.step)
            if checkpoint:
                save(run, states)
            if stop:
                raise stopped(run, "")
        if not windows.done(p):
            pause(run, states)
            break
        end_epoch(run, time.time() - epoch_start, p.step - epoch_first_step)
        states = None
    seconds = time.time() - start
    save_params(run, "final.params")
    samples = run.global_columns * (p.step - first_step)
    rows = run.windows.rows(p) / max(p.step, 1)  # bptt, or the mean drawn length
    run.reporter.done(p.step, run.tokens(), seconds, samples / max(seconds, 1e-9),
                      samples * rows / max(seconds, 1e-9))
    run.reporter.wrote()
    return {"steps": p.step, "best_val_loss": run.schedule.best_val,
            "test_loss": p.test_loss, "seconds": seconds,
            "nonfinite_steps": run.meter.nonfinite_steps}


def train_step(run: Run, states):
    """One optimizer step on the next window; a log line when the interval is full."""
    cfg, p = run.cfg, run.progress
    window = run.windows.next(p)  # inputs, targets (n, b); n = bptt unless variable
    lr = run.schedule.lr(p.step) * window.lr_scale
    loss, norm, finite, states = run.stepper.step(window.inputs, window.targets, states,
                                                  lr, p.step)
    run.meter.add(loss, norm, finite)
    run.terms.add(run.stepper.terms, finite)
    run.windows.advance(p, window)
    p.step += 1
    run.average.update(p.step)
    run.reporter.advance()
    run.watchdog.beat()
    if cfg.dist.check_sync_interval and p.step % cfg.dist.check_sync_interval == 0:
        run.world.check_in_sync(run.model.collect_params(), p.step)
    # An epoch of fewer steps than --log-interval logs once, at its end: a short run
    # shows its loss.
    short = cfg.run.log_interval > run.windows.num_batches and run.windows.done(p)
    if run.meter.steps == cfg.run.log_interval or (short and run.meter.steps):
        interval = run.meter.close()
        samples_per_s = run.global_columns * interval.timed_steps / interval.seconds
        rows_per_step = run.windows.rows(p) / p.step  # bptt, or the mean drawn length
        run.reporter.train(TrainStats(
            epoch=p.epoch, batch=p.batch, num_batches=run.windows.num_batches,
            step=p.step, tokens=run.tokens(), loss=interval.loss,
            grad_norm=interval.grad_norm, clipped=interval.clipped, lr=lr,
            samples_per_s=samples_per_s, tokens_per_s=samples_per_s * rows_per_step,
            ranks=run.world.size, nonfinite_steps=run.meter.nonfinite_steps,
            rss_mb=run.world.max_over_ranks(current_rss_mb(), name="rss"),
            **run.terms.close()))
    return states


def end_epoch(run: Run, train_seconds: float, steps: int) -> None:
    """Validation, the plateau decision, the test pass at a new best, a checkpoint."""
    cfg, p = run.cfg, run.progress
    run.meter.close()  # the steps after the last log line are checked here
    run.terms.close()
    if steps:
        samples_per_s = run.global_columns * steps / train_seconds
        run.reporter.epoch_end(p.epoch, p.step, run.tokens(), train_seconds, samples_per_s,
                               samples_per_s * run.windows.rows(p) / max(p.step, 1))
    started = time.time() - train_seconds
    # A stop agreed during evaluation checkpoints this point: the epoch trained, its
    # validation still due.
    fresh = run.model.begin_state(run.columns, run.ctx)
    val = evaluate(run, run.valid, fresh)
    test = evaluate(run, run.test, fresh) if val < run.schedule.best_val else None
    run.reporter.valid(p.epoch, p.step, run.tokens(), time.time() - started, val)
    if run.average.observe(val, p.step):  # NT-ASGD: averaging from here
        run.reporter.averaging(p.epoch, p.step, run.tokens(), cfg.optim.ntasgd_nonmono)
    if run.schedule.observe(val):
        p.best_step, p.test_loss = p.step, test
        save_params(run, "best.params")
        run.reporter.test(p.step, run.tokens(), test)
    else:
        run.reporter.lr_change(run.schedule.current)
    p.epoch += 1
    run.windows.start_epoch(p)
    save(run, fresh)


def pause(run: Run, states) -> None:
    """--max-steps inside an epoch: a checkpoint to continue from, and the validation
    perplexity here for information (the schedule is left alone)."""
    save(run, states)
    p = run.progress
    run.reporter.paused(p.epoch, p.batch, run.windows.num_batches, p.step, run.tokens(),
                        evaluate(run, run.valid, None))


def evaluate(run: Run, evaluator: Evaluator, states) -> float:
    """The evaluator's loss (of the NT-ASGD average once it switched on). A stop agreed
    during the pass abandons it within two batches: `states` (this rank's recurrent state)
    are checkpointed at this point, with the trained parameters back in place, unless
    states is None (this point is checkpointed already), and the run stops."""
    try:
        with run.average.applied():
            return evaluator.loss(run.heartbeat)
    except StopAgreed:
        if states is not None:
            save(run, states)
        raise stopped(run, " during evaluation") from None


def save_params(run: Run, name: str) -> None:
    """best.params or final.params: the NT-ASGD average once it switched on."""
    with run.average.applied(), writing(run, f"the write of {name}"):
        run_everywhere(run.world, lambda: run.run_dir.save_params(name, run.model), name)


def save(run: Run, states) -> None:
    """A checkpoint of this point (every save of the run comes here), and its cost."""
    began = time.perf_counter()
    with writing(run, "the checkpoint write"):
        run.checkpointer.save(states)
    run.agreement.saved()
    run.reporter.checkpoint(run.progress.step, run.tokens(), time.perf_counter() - began)


def writing(run: Run, what: str):
    """Rank 0 writing while the others wait in a collective, however long the storage
    takes: the watchdog's --checkpoint-timeout-s applies, not --watchdog-s."""
    return run.watchdog.waiting(what, run.cfg.reliability.checkpoint_timeout_s,
                                "--checkpoint-timeout-s")


def stopped(run: Run, where: str) -> Preempted:
    step = run.progress.step
    run.reporter.line(f"Stopping at step {step}{where} on a signal; checkpoint written. "
                      f"Resume with --resume auto.")
    return Preempted(f"stopped by a signal at step {step}{where}, checkpoint written")


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")
