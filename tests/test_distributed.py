"""Horovod data parallelism, under Gloo (horovodrun) and MPI (mpirun), 2 CPU ranks.

Every multi-process run is bounded by a timeout: a hang fails the test.
"""

import json
import re

import pytest

from conftest import BIN, REPO, TINY, VALID, data_args, dist_lm, launcher, max_param_diff, run

pytestmark = pytest.mark.dist
CONTROLLERS = ["gloo", "mpi"]
# Two layers with dropout 0.3 on the embedding, between the layers and on the output: the
# masks belong to columns (dist_lm/training/masks.py), so 2 ranks draw what one process
# draws. A small lr keeps float32 reduction-order noise ~1e-7 (at lr 20 it is amplified
# to ~1e-2 by step 20). clip 0.1 is below the gradient norm of every early step.
RECIPE = ["--num-layers", "2", "--dropout", "0.3", "--lr", "1", "--clip", "0.1",
          "--max-steps", "20", "--log-interval", "10", "--epochs", "1"]


def train_cmd(heldout, *extra):
    return [BIN / "dist-lm", "train", *data_args(VALID, heldout, heldout), *TINY, *RECIPE,
            *extra]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, heldout):
    """One process, 20 columns: the reference the 2-rank runs must reproduce."""
    out = tmp_path_factory.mktemp("one")
    proc = run(train_cmd(heldout, "--batch-size", "20", "--run-dir", out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_two_ranks_take_the_same_steps_as_one_process_with_the_global_batch(
        controller, one_process, heldout, tmp_path):
    out = tmp_path / "two"
    # --check-sync-interval 1: all-gathers a digest of every parameter after every step
    # and fails the run if the ranks differ by a single bit.
    proc = run(launcher(controller, 2, *train_cmd(heldout, "--batch-size", "10",
                                                  "--check-sync-interval", "1",
                                                  "--run-dir", out)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert max_param_diff(one_process / "final.params", out / "final.params") < 2e-6
    # Only rank 0 printed the log lines.
    assert len(re.findall(r"\[Epoch 0 Batch 20/\d+\] loss", proc.stdout)) == 1


def test_clipping_was_active_in_the_equivalence_run(one_process, heldout, tmp_path):
    proc = run(train_cmd(heldout, "--batch-size", "20", "--clip", "0",
                         "--run-dir", tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert max_param_diff(one_process / "final.params", tmp_path / "final.params") > 1e-3


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_distributed_eval_equals_single_process_eval(controller, one_process, heldout):
    args = ["eval", "--run-dir", one_process, "--test-file", heldout, "--columns", "8",
            "--context", "cpu"]
    single = dist_lm(*args)
    multi = run(launcher(controller, 2, BIN / "dist-lm", *args), timeout=300)
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr
    loss = [float(re.search(r"test loss ([0-9.]+)", p.stdout).group(1))
            for p in (single, multi)]
    assert loss[0] == pytest.approx(loss[1], abs=1e-4)


def test_global_batch_size_is_split_over_ranks(one_process, heldout, tmp_path):
    proc = run(launcher("gloo", 2, *train_cmd(heldout, "--global-batch-size", "20",
                                              "--run-dir", tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert max_param_diff(one_process / "final.params", tmp_path / "final.params") < 2e-6


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_uneven_corpus_gives_every_rank_the_same_number_of_steps(controller, tmp_path):
    # 9,001 + eos tokens: not a multiple of the 2 x 3 columns nor of bptt.
    words = [f"w{i % 97}" for i in range(9001)]
    corpus = tmp_path / "odd.txt"
    corpus.write_text(" ".join(words) + "\n")
    length = (len(words) + 1) // 6
    expected = (length - 1) // 35
    proc = run(launcher(controller, 2, BIN / "dist-lm", "train",
                        *data_args(corpus, corpus, corpus), *TINY, "--batch-size", "3",
                        "--epochs", "2", "--log-interval", "7",
                        "--eval-batch-size", "3", "--run-dir", tmp_path / "run",
                        "--check-sync-interval", "5"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"\[Epoch 1 Batch (\d+)/(\d+)\]", proc.stdout)[-1] == \
        (str(expected // 7 * 7), str(expected))


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_a_rank_failing_at_start_up_stops_the_job_with_its_message(controller, heldout,
                                                                   tmp_path):
    # Rank 1 alone is given a training file that does not exist.
    script = ('r=${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}; f=$0; '
              '[ "$r" = 1 ] && f=/nonexistent/wiki.train.tokens; '
              'exec dist-lm train --train-file "$f" --valid-file $1 --test-file $1 '
              '--run-dir $2 --context cpu')
    proc = run(launcher(controller, 2, "bash", "-c", script, VALID, heldout, tmp_path),
               timeout=90)
    assert proc.returncode != 0
    # One message per rank (mpirun may interleave the two ranks' lines).
    errors = re.findall(r"dist-lm: error: (\[rank \d\] [^\n]*?holds it)", proc.stderr)
    assert len(errors) == 2, proc.stderr
    assert all("/nonexistent/wiki.train.tokens: no such file" in e for e in errors)
    assert any(e.startswith("[rank 0] rank 1:") for e in errors)


def test_local_clipping_is_the_reference_behaviour_and_differs(one_process, heldout,
                                                               tmp_path):
    proc = run(launcher("gloo", 2, *train_cmd(heldout, "--batch-size", "10", "--clip-mode",
                                              "local", "--run-dir", tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Every rank's own gradient norm exceeded 0.1 at every step: all were clipped.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
            .splitlines() if '"train"' in line]
    assert [r["train/clipped_fraction"] for r in rows] == [1.0, 1.0]
    # Clipping each rank's gradient at 0.1 then averaging is not clipping the average.
    assert max_param_diff(one_process / "final.params", tmp_path / "final.params") > 1e-4


def test_workstation_launcher_runs_two_ranks(heldout, tmp_path):
    proc = run(["bash", REPO / "launch" / "train-workstation.sh",
                *data_args(VALID, heldout, heldout), *TINY, "--max-steps", "4",
                "--log-interval", "2", "--run-dir", tmp_path],
               env={"NP": "2", "CONTROLLER": "mpi"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Batch 4/" in proc.stdout and (tmp_path / "final.params").is_file()


# --- evaluation: one global layout, whatever the rank count ---------------------------------

@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, heldout):
    """standard_lstm_lm_200 after a few steps: parameters the zoo model can load."""
    out = tmp_path_factory.mktemp("zoo")
    proc = run([BIN / "dist-lm", "train", *data_args(VALID, heldout, heldout),
                "--model", "standard_lstm_lm_200", "--context", "cpu", "--max-steps", "3",
                "--log-interval", "3", "--run-dir", out], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def gluonnlp_loss(run_dir, text, columns):
    """The reference notebook's evaluation: GluonNLP's zoo model and CorpusBPTTBatchify."""
    import gluonnlp as nlp
    import mxnet as mx

    vocab = nlp.Vocab.from_json((run_dir / "vocab.json").read_text())
    model, _ = nlp.model.get_model("standard_lstm_lm_200", vocab=vocab, dataset_name=None)
    model.load_parameters(str(run_dir / "final.params"))
    corpus = nlp.data.CorpusDataset(str(text), flatten=True, skip_empty=False, bos=None,
                                    eos="<eos>")
    data = nlp.data.batchify.CorpusBPTTBatchify(vocab, 35, columns, last_batch="discard")(
        corpus)
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    total, count = 0.0, 0
    hidden = model.begin_state(batch_size=columns, func=mx.nd.zeros)
    for inputs, targets in data:
        output, hidden = model(inputs, hidden)
        loss = ce(output.reshape(-3, -1), targets.reshape(-1))
        total += mx.nd.sum(loss).asscalar()
        count += loss.size
    return total / count


def eval_loss(proc):
    assert proc.returncode == 0, proc.stderr
    return float(re.search(r"test loss ([0-9.]+), test ppl", proc.stdout).group(1))


@pytest.mark.parametrize("columns", [20, 1])
def test_evaluation_is_the_same_at_any_rank_count_and_equals_gluonnlp(zoo_run, heldout,
                                                                      columns):
    """20 columns (the notebook's layout) and 1 (fewer columns than ranks: one rank holds
    nothing and still takes part), at 1, 2 (Gloo, MPI) and 3 ranks."""
    args = [BIN / "dist-lm", "eval", "--run-dir", zoo_run, "--test-file", heldout,
            "--columns", columns, "--context", "cpu"]
    losses = {"1": eval_loss(run(args, timeout=300))}
    for controller, n in [("gloo", 2), ("mpi", 2), ("gloo", 3)]:
        losses[f"{controller}{n}"] = eval_loss(run(launcher(controller, n, *args),
                                                   timeout=300))
    # The CLI prints 4 decimals; the sums differ only in float64 reduction order.
    reference = gluonnlp_loss(zoo_run, heldout, columns)
    for key, loss in losses.items():
        assert loss == pytest.approx(reference, abs=1.5e-4), (key, losses, reference)


def test_a_run_validates_on_the_same_global_columns_at_any_rank_count(heldout, tmp_path):
    """--batch-size 10 per rank at 2 ranks and 20 at 1: the same 20 validation columns,
    the same logged validation loss (the trained parameters agree to float noise)."""
    logs = {}
    for ranks, b in [(1, "20"), (2, "10")]:
        out = tmp_path / str(ranks)
        cmd = train_cmd(heldout, "--batch-size", b, "--run-dir", out)
        proc = run(launcher("gloo", 2, *cmd) if ranks == 2 else cmd, timeout=300)
        assert proc.returncode == 0, proc.stderr
        logs[ranks] = [json.loads(line) for line in (out / "metrics.jsonl").read_text()
                       .splitlines() if '"valid"' in line][-1]
        assert json.loads((out / "run.json").read_text())["eval_columns"] == \
            {"valid": 20, "test": 20}
    assert logs[1]["val/loss"] == pytest.approx(logs[2]["val/loss"], abs=1e-5)


# mpirun passes ranks' output on write by write: a line made of several writes (print's)
# can be spliced into another rank's.
BROADCAST = """
import os
import numpy as np
from dist_lm.runtime.dist import make_world
w = make_world()
rng = np.random.default_rng(7)
sent = {"0/0": rng.standard_normal((300, 17)).astype(np.float32),
        "3/1": rng.integers(-5, 5, (4, 2, 3)).astype(np.int64),
        "average/x": rng.standard_normal((2,)).astype(np.float16),
        "hidden/0": rng.standard_normal((1, 4, 8)).astype(np.float32)}
got = w.broadcast_arrays(sent if w.rank == 0 else None, name="t")
assert sorted(got) == sorted(sent), sorted(got)
for k, v in sent.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, got[k].shape)
    assert np.array_equal(got[k], v), k
os.write(1, f"rank {w.rank} received {len(got)} arrays\\n".encode())
"""


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_the_resume_state_reaches_every_rank_array_by_array(controller):
    """What resume broadcasts, one array at a time: rank 0's arrays, names, shapes and
    dtypes on every rank, bit for bit."""
    proc = run(launcher(controller, 2, BIN / "python", "-c", BROADCAST), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(re.findall(r"rank (\d) received 4 arrays", proc.stdout)) == ["0", "1"], \
        proc.stdout
