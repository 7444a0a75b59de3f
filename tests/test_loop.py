"""The training loop's parts and edges, in one process: the schedule, the stop/checkpoint
agreement, skipped steps, the non-finite check at epoch ends, the aggregated norm, and
runs cut into --max-steps chunks (with momentum, Adam, and plateau decay firing)."""

import json
import math
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from conftest import TINY, data_args, parse_config, records
from dist_lm.training.checkpoint import list_checkpoints, verify
from dist_lm.runtime.dist import LocalWorld, global_norm
from dist_lm.errors import NonFiniteError
from dist_lm.runtime.lifecycle import Agreement
from dist_lm.training.schedule import LRSchedule


# --- the schedule ------------------------------------------------------------------------

def test_schedule_warms_up_then_decays_on_plateau_and_round_trips():
    s = LRSchedule(base=8.0, warmup_steps=4, decay=0.25)
    assert [s.lr(i) for i in range(6)] == [2.0, 4.0, 6.0, 8.0, 8.0, 8.0]
    assert s.observe(5.0) and s.observe(4.0)        # improvements keep the rate
    assert not s.observe(4.5) and s.lr(10) == 2.0   # a plateau decays it
    again = LRSchedule(base=1.0)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again == s and not again.observe(4.0) and again.lr(10) == 0.5


# --- agreement: one time-based request, one checkpoint ---------------------------------

class TwoRanks(LocalWorld):
    """Rank 0 of two, whose peer sends zeros: the allreduce returns this rank's flags."""

    size = 2

    def allreduce_sum(self, array, name):
        return array.copy()


def test_a_time_based_request_gives_exactly_one_checkpoint(monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr("dist_lm.runtime.lifecycle.time.time", lambda: clock["t"])
    agree = Agreement(TwoRanks(), checkpoint_minutes=1, checkpoint_steps=0)
    decisions = []
    for step in range(1, 9):
        clock["t"] += 25  # 25 s per step: due at step 3 (75 s > 60 s)
        stop, checkpoint = agree.poll(step)
        decisions.append(checkpoint)
        if checkpoint:
            agree.saved()
    # Requested at step 3, agreed at step 4 (one step of lag), and not again at step 5
    # by the request step 4 sent before the checkpoint was written; due again at step 7.
    assert decisions == [False, False, False, True, False, False, False, True]


# --- a skipped step changes nothing ------------------------------------------------------

def tiny_trainer(optimizer, params):
    net = mx.gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Xavier())
    world = LocalWorld()
    trainer = world.make_trainer(net.collect_params(), optimizer, params)
    grads = [p.grad() for p in net.collect_params().values()]
    return world, net, trainer, grads


def snapshot(net, trainer):
    updater = trainer._updaters[0]
    states = {k: [s.asnumpy() for s in (v if isinstance(v, (tuple, list)) else [v])]
              for k, v in updater.states.items()}
    return ([p.data().asnumpy() for p in net.collect_params().values()], states,
            trainer._optimizer.num_update, dict(trainer._optimizer._index_update_count))


@pytest.mark.parametrize("clip_mode", ["global", "local"])
@pytest.mark.parametrize("optimizer,params", [
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}),
    ("adam", {"learning_rate": 0.1, "wd": 0.01})])
def test_a_skipped_step_leaves_parameters_and_optimizer_state_unchanged(
        optimizer, params, clip_mode):
    world, net, trainer, grads = tiny_trainer(optimizer, params)
    x = mx.nd.array(np.random.RandomState(0).randn(5, 4))
    with mx.autograd.record():
        loss = net(x).sum()
    loss.backward()
    world.gradient_step(trainer, grads, 0.25, clip_mode, skip_nonfinite=True)  # a real one
    before = snapshot(net, trainer)
    assert before[1] and before[2] == 1  # momentum / moments exist and were used
    with mx.autograd.record():
        loss = net(x).sum()
    loss.backward()
    grads[0][0, 0] = np.nan
    _, finite = world.gradient_step(trainer, grads, 0.25, clip_mode, skip_nonfinite=True)
    assert finite.asscalar() == 0
    after = snapshot(net, trainer)
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        for a, b in zip(before[1][k], after[1][k]):
            np.testing.assert_array_equal(a, b)
    assert before[2:] == after[2:]


# --- the aggregated norm (GPU default) run on the CPU -------------------------------------

def test_the_aggregated_norm_equals_the_per_array_norm():
    rs = np.random.RandomState(3)
    arrays = [rs.randn(*s).astype("float32") for s in [(300, 7), (7,), (5, 5, 5), (1,)]]
    want = math.sqrt(sum(float((a.astype("float64") ** 2).sum()) for a in arrays))
    nd = [mx.nd.array(a) for a in arrays]
    aggregated, per_array = global_norm(nd, aggregated=True), global_norm(nd, aggregated=False)
    assert aggregated.shape == per_array.shape == (1,)
    assert aggregated.asscalar() == pytest.approx(want, rel=1e-6)
    assert per_array.asscalar() == pytest.approx(want, rel=1e-6)


# --- in-process training runs ---------------------------------------------------------------

def train_here(*argv):
    from dist_lm.training.train import train

    return train(parse_config(*argv), LocalWorld())


def test_a_non_finite_step_after_the_last_log_line_stops_before_the_epoch_end(
        heldout, tmp_path, monkeypatch):
    """The held-out text is 37 batches of 20 x 35; with log lines every 30 steps, steps
    31-37 are read only at the epoch end, which must check them before validating,
    keeping parameters as best, or checkpointing."""
    from dist_lm.training.stepper import Stepper

    real = Stepper.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, norm, finite, states = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 33:
            finite = finite * 0
        return loss, norm, finite, states

    monkeypatch.setattr(Stepper, "step", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"steps 31-37"):
        train_here(*data_args(heldout, heldout, heldout), *TINY, "--log-interval", "30",
                   "--epochs", "1", "--run-dir", run_dir)
    assert calls["n"] == 37
    assert list_checkpoints(run_dir / "checkpoints") == []
    assert not (run_dir / "best.params").exists()
    assert records(run_dir, "valid") == []


CHUNKED = ["--epochs", "3", "--log-interval", "7", "--lr", "1", "--lr-decay", "0.5"]


def rare_word_text(tmp_path):
    """Validation text of one word seen once in training: its probability falls as the
    model learns the word distribution, so validation gets worse and the lr decays."""
    from collections import Counter

    counts = Counter(Path(tmp_path / "train.txt").read_text().split())
    word = sorted(w for w, c in counts.items() if c == 1)[0]
    path = tmp_path / "rare.txt"
    path.write_text((word + " ") * 2000 + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("optim", [["--momentum", "0.9"], ["--optimizer", "adam", "--lr",
                                                           "0.01"]])
def test_a_run_cut_into_max_steps_chunks_ends_where_an_uninterrupted_run_ends(
        optim, heldout, tmp_path):
    """3 epochs of 37 steps; pauses at steps 50 (inside epoch 1) and 80 (inside epoch 2,
    after the plateau decay at the end of epoch 1): same parameters, bit for bit, same
    learning rates at every logged step, same validation losses."""
    (tmp_path / "train.txt").write_text(heldout.read_text())
    rare = rare_word_text(tmp_path)
    args = [*data_args(tmp_path / "train.txt", rare, heldout), *TINY, *CHUNKED, *optim]
    train_here(*args, "--run-dir", tmp_path / "whole")
    for max_steps in (50, 80, 111):
        train_here(*args, "--run-dir", tmp_path / "chunks", "--resume", "auto",
                   "--max-steps", max_steps)
    whole, chunks = tmp_path / "whole", tmp_path / "chunks"
    assert (whole / "final.params").read_bytes() == (chunks / "final.params").read_bytes()
    lr = [(r["step"], r["train/lr"]) for r in records(whole, "train")]
    assert lr == [(r["step"], r["train/lr"]) for r in records(chunks, "train")]
    base = float(optim[optim.index("--lr") + 1]) if "--lr" in optim else 1.0
    assert {x for _, x in lr} >= {base, base / 2}, lr  # the plateau decay fired
    epoch_end = [(r["step"], r["val/loss"]) for r in records(whole, "valid")]
    assert [s for s, _ in epoch_end] == [37, 74, 111]
    # The chunked run also reports validation where it paused, for information only.
    chunked = {r["step"]: r["val/loss"] for r in records(chunks, "valid")}
    assert sorted(chunked) == [37, 50, 74, 80, 111]
    assert [chunked[s] for s, _ in epoch_end] == [v for _, v in epoch_end]
    meta = verify(list_checkpoints(chunks / "checkpoints")[-1]).meta
    assert meta["progress"]["epoch"] == 3 and meta["schedule"]["current"] < base


def test_the_first_interval_after_a_resume_times_only_its_own_steps():
    """Throughput after a resume: the restored steps ran in another process, so only the
    steps taken here count against the time measured here."""
    from dist_lm.training.meter import IntervalMeter

    meter = IntervalMeter(LocalWorld(), mx.cpu(), clip=0.25, nonfinite="stop")
    meter.load_state_dict({"steps": 8, "first_step": 1, "sums": [40.0, 8.0, 8.0, 0.0],
                           "nonfinite_steps": 0})
    one = mx.nd.ones((1,))
    for _ in range(2):
        meter.add(one * 5, one, one)
    interval = meter.close()
    assert (interval.steps, interval.timed_steps) == (10, 2)
    assert interval.loss == pytest.approx(5.0)


# --- the host stays near the device ------------------------------------------------------

EXECUTED = []


class _Slow(mx.operator.CustomOp):
    """Identity that takes 50 ms and records that it ran: a device slower than the host."""

    def forward(self, is_train, req, in_data, out_data, aux):
        import time

        time.sleep(0.05)
        EXECUTED.append(1)
        self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], out_grad[0])


@mx.operator.register("dist_lm_test_slow")
class _SlowProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def list_arguments(self):
        return ["data"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return _Slow()


def test_the_host_waits_for_the_device_within_two_steps(monkeypatch):
    """Without a bound the host queues a whole log interval of steps ahead of a slower
    device, and a stop's checkpoint waits for all of them."""
    from dist_lm.model import LSTMLM
    from dist_lm.training.stepper import Stepper

    real = LSTMLM.features

    def slow_features(self, F, inputs, states, masks=None):
        x, states = real(self, F, inputs, states, masks)
        return F.Custom(x, op_type="dist_lm_test_slow"), states

    monkeypatch.setattr(LSTMLM, "features", slow_features)
    cfg = parse_config(*TINY, "--dropout", "0")
    model = LSTMLM(cfg.model, 50)
    model.initialize(mx.init.Xavier())
    stepper = Stepper(model, cfg, LocalWorld(), mx.cpu())
    rng = np.random.default_rng(0)
    states = model.begin_state(4, mx.cpu())
    EXECUTED.clear()
    behind = []
    for step in range(8):
        batch = rng.integers(0, 50, size=(2, 5, 4))
        _, _, _, states = stepper.step(batch[0], batch[1], states, None, step)
        behind.append(step + 1 - len(EXECUTED))  # forward passes not yet run
    mx.nd.waitall()
    assert len(EXECUTED) == 8 and max(behind) <= 1, behind
