"""A global batch of G columns on any N <= G ranks: the columns split as evenly as they go
(contiguous blocks in rank order, `column_range`), each rank's share weighted by
w_r = b_r N / G, so that N ranks take the steps of one process with G columns, log its
losses, and resume from a checkpoint at any other rank count.

Every multi-process run is bounded by a timeout: a hang fails the test.
"""

import json
import shutil

import mxnet as mx
import numpy as np
import pytest

from conftest import (BIN, TINY, VALID, data_args, launcher, max_param_diff, parse_config,
                      records, run)
from dist_lm.data import text as D
from dist_lm.errors import UsageError
from dist_lm.runtime.dist import LocalWorld

G = 20
# As tests/test_distributed.py: two layers with dropout 0.3 everywhere (the masks belong
# to columns, so any split draws one process's masks), and lr 1, which keeps float32
# reduction noise below 1e-5 over the STEPS; clip 0.1 is below the gradient norm of
# every early step, so those steps are clipped.
STEPS, PAUSE = 120, 90
RECIPE = ["--num-layers", "2", "--dropout", "0.3", "--lr", "1", "--clip", "0.1", "--epochs",
          "1", "--log-interval", "50"]


# --- unit level ----------------------------------------------------------------------------

def test_the_split_is_contiguous_in_rank_order_and_as_even_as_it_goes():
    assert [len(D.column_range(G, r, 3)) for r in range(3)] == [6, 7, 7]
    for total in (1, 7, 20, 80):
        for ranks in range(1, total + 1):
            blocks = [D.column_range(total, r, ranks) for r in range(ranks)]
            assert [c for b in blocks for c in b] == list(range(total))
            assert {len(b) for b in blocks} <= {total // ranks, -(-total // ranks)}


def test_more_ranks_than_global_columns_is_refused_in_one_line():
    cfg = parse_config(*TINY, "--global-batch-size", "20")
    with pytest.raises(UsageError) as err:
        cfg.for_world(21)
    assert "\n" not in str(err.value)
    assert "--global-batch-size 20 is smaller than the 21 ranks" in str(err.value)
    cfg = parse_config(*TINY, "--global-batch-size", "20").for_world(3)
    assert (cfg.run.batch_size, cfg.global_columns(3)) == (6, 20)
    assert parse_config(*TINY, "--batch-size", "4").for_world(3).global_columns(3) == 12


class RankOf(LocalWorld):
    """Rank `rank` of `size`, in this one process, for what needs only the two numbers
    (collectives see this rank alone)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_each_rank_maps_its_block_of_the_one_process_layout(heldout):
    from dist_lm.data.corpus import load_corpus

    def train_shard(world):
        cfg = parse_config(*TINY, *data_args(heldout, heldout, heldout),
                           "--global-batch-size", str(G)).for_world(world.size)
        return load_corpus(cfg, world, need=("train",)).train

    whole = train_shard(LocalWorld())
    parts = [train_shard(RankOf(r, 3)) for r in range(3)]
    assert [p.columns for p in parts] == [6, 7, 7]
    np.testing.assert_array_equal(np.concatenate([p.cols for p in parts]), whole.cols)


def test_the_saved_hidden_state_is_cut_by_the_same_blocks_at_any_rank_count():
    from dist_lm.training.checkpoint import hidden_for_rank

    full = [np.arange(2 * G * 3, dtype=np.float32).reshape(2, G, 3) + k for k in (0, 1000)]
    for ranks in (1, 3, 4, 7, G):
        cut = [hidden_for_rank(full, RankOf(r, ranks), mx.cpu()) for r in range(ranks)]
        for r in range(ranks):
            assert cut[r][0].shape[1] == len(D.column_range(G, r, ranks))
        for k in range(2):  # gathered in rank order, as a checkpoint saves them
            np.testing.assert_array_equal(
                np.concatenate([c[k].asnumpy() for c in cut], axis=1), full[k])


def _stepper(init_file, cfg, weight):
    from dist_lm.model import LSTMLM
    from dist_lm.training.stepper import Stepper

    model = LSTMLM(cfg.model, 50)
    model.load_parameters(str(init_file), ctx=mx.cpu())
    return model, Stepper(model, cfg, LocalWorld(), mx.cpu(), weight)


def _params(model):
    return {k: v.data().asnumpy().copy()
            for k, v in model._collect_params_with_prefix().items()}


@pytest.mark.parametrize("ranks", [3, 7])
def test_the_weighted_shares_average_to_the_global_batchs_gradient(tmp_path, ranks):
    """One SGD step (lr 1, no clip) of each rank's stepper on its block: the mean of the
    ranks' updates (what the allreduce's average applies) is one process's update."""
    from dist_lm.model import LSTMLM

    cfg = parse_config(*TINY, "--dropout", "0", "--lr", "1", "--clip", "0")
    init = LSTMLM(cfg.model, 50)
    init.initialize(mx.init.Xavier(), ctx=mx.cpu())
    init.save_parameters(str(tmp_path / "init.params"))
    before = _params(init)
    batch = np.random.default_rng(0).integers(0, 50, size=(2, 5, G))  # inputs, targets

    def update(columns, weight):
        model, stepper = _stepper(tmp_path / "init.params", cfg, weight)
        stepper.step(batch[0][:, columns], batch[1][:, columns],
                     model.begin_state(len(columns), mx.cpu()))
        return {k: v - before[k] for k, v in _params(model).items()}

    one = update(range(G), 1.0)
    shares = [update(c, len(c) * ranks / G) for c in
              (D.column_range(G, r, ranks) for r in range(ranks))]
    for k in one:
        mean = sum(s[k] for s in shares) / ranks
        np.testing.assert_allclose(mean, one[k], atol=1e-6, err_msg=k)


def test_local_clipping_sees_the_ranks_own_gradient_norm(tmp_path):
    """--clip-mode local clips g_r, not w_r g_r: the norm it reports and clips by is the
    one an unweighted step of the same columns has."""
    from dist_lm.model import LSTMLM

    cfg = parse_config(*TINY, "--dropout", "0", "--clip", "0.1", "--clip-mode", "local")
    init = LSTMLM(cfg.model, 50)
    init.initialize(mx.init.Xavier(), ctx=mx.cpu())
    init.save_parameters(str(tmp_path / "init.params"))
    batch = np.random.default_rng(1).integers(0, 50, size=(2, 5, 7))
    norms = []
    for weight in (1.0, 7 * 3 / G):
        model, stepper = _stepper(tmp_path / "init.params", cfg, weight)
        _, norm, _, _ = stepper.step(batch[0], batch[1], model.begin_state(7, mx.cpu()))
        norms.append(float(norm.asscalar()))
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_a_log_interval_saved_at_four_ranks_resumes_at_one():
    """The meter's sums are N x the global values at the N that saved them."""
    from dist_lm.training.meter import IntervalMeter

    meter = IntervalMeter(LocalWorld(), mx.cpu(), clip=0.25, nonfinite="stop")
    # 5 steps of global loss 5.0, norm 1.0, all clipped, summed over 4 ranks.
    meter.load_state_dict({"steps": 5, "first_step": 11, "sums": [100.0, 20.0, 20.0, 0.0],
                           "nonfinite_steps": 0}, ranks=4)
    one = mx.nd.ones((1,))
    for _ in range(5):
        meter.add(one * 5, one, one)
    interval = meter.close()
    assert (interval.loss, interval.grad_norm, interval.clipped) == \
        pytest.approx((5.0, 1.0, 1.0))


# --- N ranks against one process -------------------------------------------------------------

def train_cmd(heldout, run_dir, *extra):
    return [BIN / "dist-lm", "train", *data_args(VALID, heldout, heldout), *TINY, *RECIPE,
            "--run-dir", run_dir, *extra]


# With --alpha/--beta the objective adds the AR and TAR terms, which the log reports too.
AR_TAR = ["--alpha", "2", "--beta", "1"]
LOGGED = ("train/loss", "train/ar", "train/tar")


def logged(run_dir):
    """What the log says at each logged step: the losses, and the tokens seen."""
    return {r["step"]: ({k: r[k] for k in LOGGED if k in r}, r["tokens"])
            for r in records(run_dir, "train")}


def reference(tmp_path_factory, heldout, *extra):
    """One process with the G = 20 columns, STEPS steps."""
    out = tmp_path_factory.mktemp("one")
    proc = run(train_cmd(heldout, out, "--batch-size", str(G), "--max-steps", str(STEPS),
                         *extra), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(logged(out)) == list(range(50, STEPS + 1, 50))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, heldout):
    return reference(tmp_path_factory, heldout)


@pytest.fixture(scope="module")
def one_process_ar_tar(tmp_path_factory, heldout):
    return reference(tmp_path_factory, heldout, *AR_TAR)


def assert_same_run(run_dir, one_process, since=0):
    """The parameters, logged losses (and AR/TAR terms) and token counts of one process;
    since: the step the last process of the run started at."""
    assert max_param_diff(one_process / "final.params", run_dir / "final.params") < 1e-5
    got, want = logged(run_dir), logged(one_process)
    assert sorted(got) == sorted(want)
    for step, (values, seen) in want.items():
        for key, value in values.items():
            # The AR/TAR terms are ~1e-3 here: to 2e-5 of their value (a plain mean of the
            # ranks' terms is 1e-3 of it off).
            close = pytest.approx(value, abs=1e-5) if key == "train/loss" else \
                pytest.approx(value, rel=2e-5)
            assert got[step][0][key] == close, (step, key, got, want)
        assert got[step][0].keys() == values.keys() and got[step][1] == seen
    # Samples over the run: G per step, over the same seconds as the throughput.
    done = records(run_dir, "done")[-1]
    assert done["throughput/total_samples_per_s"] * done["time/total_s"] == \
        pytest.approx(G * (done["step"] - since), rel=1e-6)


@pytest.mark.dist
@pytest.mark.medium
@pytest.mark.parametrize("controller,ranks,extra", [("mpi", 3, ()), ("gloo", 3, AR_TAR)])
def test_uneven_ranks_take_the_steps_of_one_process_with_the_global_batch(
        controller, ranks, extra, request, heldout, tmp_path):
    """20 columns on 3 ranks (6/7/7), under MPI, and under Gloo with AR/TAR."""
    one = request.getfixturevalue("one_process_ar_tar" if extra else "one_process")
    out = tmp_path / "run"
    proc = run(launcher(controller, ranks, *train_cmd(
        heldout, out, "--global-batch-size", str(G), "--max-steps", str(STEPS),
        "--check-sync-interval", "50", *extra)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    shares = [len(D.column_range(G, r, ranks)) for r in range(ranks)]
    assert len(set(shares)) == 2  # the split is uneven
    assert json.loads((out / "run.json").read_text())["train_columns"] == shares
    assert_same_run(out, one)


@pytest.mark.dist
@pytest.mark.medium
def test_a_checkpoint_at_four_ranks_resumes_at_three_and_at_one(one_process, heldout,
                                                                tmp_path):
    """Paused by --max-steps PAUSE at 4 ranks (inside a log interval and an epoch: the
    hidden state of every column and an interval's sums are in the checkpoint), then
    resumed to STEPS at 3 ranks (6/7/7) and at 1 process, dropout on."""
    first = tmp_path / "four"
    proc = run(launcher("mpi", 4, *train_cmd(heldout, first, "--global-batch-size", str(G),
                                             "--max-steps", str(PAUSE))), timeout=300)
    assert proc.returncode == 0, proc.stderr
    for ranks in (3, 1):
        out = tmp_path / f"then{ranks}"
        shutil.copytree(first, out)
        cmd = train_cmd(heldout, out, "--global-batch-size", str(G), "--max-steps",
                        str(STEPS), "--resume", "auto")
        proc = run(launcher("mpi", ranks, *cmd) if ranks > 1 else cmd, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"newest step-{STEPS:09d}" in proc.stdout  # it ran to STEPS
        assert_same_run(out, one_process, since=PAUSE)


@pytest.mark.dist
def test_more_ranks_than_global_columns_stop_every_rank_with_one_line(heldout, tmp_path):
    """Exit 2 on every rank (mpirun passes it on; horovodrun would exit 1)."""
    cmd = train_cmd(heldout, tmp_path, "--global-batch-size", "2")
    proc = run(launcher("mpi", 3, *cmd), timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "dist-lm: error:" in line]
    assert len(errors) == 3, proc.stderr
    assert all("--global-batch-size 2 is smaller than the 3 ranks" in e for e in errors)
    assert "Traceback" not in proc.stderr
