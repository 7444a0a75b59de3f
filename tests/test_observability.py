"""TensorBoard, metrics.jsonl, console, generate and report, read back by real tools."""

import json
import re
import socket
import subprocess
import time
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import BIN, REPO, TINY, VALID, data_args, dist_lm, launcher, records, run

SCALARS = ["train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/clipped_fraction",
           "throughput/tokens_per_s", "throughput/samples_per_s",
           "throughput/tokens_per_s_per_rank", "val/loss", "val/ppl", "test/ppl",
           "time/epoch_s", "system/ranks"]
# Dropout 0 and lr 1 keep 2-rank and 1-process runs equal to float32 noise (see
# test_distributed.py); the tiny model is at a high loss where clipping at 0.25 is active.
ARGS = ["--dropout", "0", "--lr", "1", "--log-interval", "6", "--epochs", "2"]


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """Two epochs of 12 batches of 10 columns x 35: 100 lines of 43 words and <eos>."""
    words = VALID.read_text(encoding="utf-8").split()[:4300]
    path = tmp_path_factory.mktemp("short") / "short.tokens"
    path.write_text("\n".join(" ".join(words[i:i + 43]) for i in range(0, 4300, 43)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, heldout, short_text):
    run_dir = tmp_path_factory.mktemp("tb")
    proc = run(launcher("gloo", 2, BIN / "dist-lm", "train",
                        *data_args(short_text, heldout, heldout), *TINY, *ARGS,
                        "--batch-size", "5", "--run-dir", run_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc.stdout


@pytest.mark.parametrize("flags, step", [([], 18), (["--eval-first"], 6)])
def test_the_first_log_line_of_an_epoch_does_not_time_the_evaluation_before_it(
        flags, step, short_text, tmp_path):
    """Validation and test on the whole WikiText-2 validation split take the tiny model far
    longer than 6 steps. The interval that starts an epoch began when the evaluation before
    it ended (the previous epoch's, after its records and checkpoint, or --eval-first's
    baseline), so the seconds its throughput implies fit between the record just before it
    and its own."""
    proc = run([BIN / "dist-lm", "train", *data_args(short_text, VALID, VALID), *TINY, *ARGS,
                "--batch-size", "10", "--run-dir", tmp_path, *flags], timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = metrics(tmp_path)
    (first,) = [i for i, r in enumerate(rows) if r["kind"] == "train" and r["step"] == step]
    assert rows[first - 1]["kind"] in ("valid", "test", "checkpoint") and \
        records(tmp_path, "test")
    seconds = 10 * 6 / rows[first]["throughput/samples_per_s"]  # 6 steps of 10 columns
    assert seconds < rows[first]["time"] - rows[first - 1]["time"], (seconds, rows)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.dist
def test_event_files_hold_every_scalar_and_match_the_records(two_rank_run):
    run_dir, stdout = two_rank_run
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one writer: rank 0 (the file name carries its pid)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tokens_acc = EventAccumulator(str(run_dir / "by_tokens"))
    tokens_acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in SCALARS:
        assert tag in tags and "by_tokens/" + tag in tokens_acc.Tags()["scalars"], tag
    rows = metrics(run_dir)
    train_rows = [r for r in rows if r["kind"] == "train"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_rows] == [6, 12, 18, 24]
    for event, row in zip(loss, train_rows):
        assert event.value == pytest.approx(row["train/loss"], rel=1e-6)
    by_tokens = tokens_acc.Scalars("by_tokens/train/loss")
    assert [e.step for e in by_tokens] == [r["tokens"] for r in train_rows]
    assert train_rows[0]["tokens"] == 6 * 2 * 5 * 35
    console = [float(x) for x in re.findall(r"Batch \d+/\d+\] loss ([0-9.]+)", stdout)]
    assert console == [round(r["train/loss"], 2) for r in train_rows]
    assert acc.Scalars("system/ranks")[0].value == 2
    assert all(0 <= e.value <= 1 for e in acc.Scalars("train/clipped_fraction"))
    val = [r for r in rows if r["kind"] == "valid"]
    assert [round(r["val/ppl"], 2) for r in val] == \
        [float(x) for x in re.findall(r"valid ppl ([0-9.]+)", stdout)]
    assert (run_dir / "config.json").is_file()
    assert list((run_dir / "hparams").glob("events.out.tfevents.*"))


@pytest.mark.dist
def test_two_rank_loss_equals_one_process_loss(two_rank_run, heldout, short_text, tmp_path):
    run_dir, _ = two_rank_run
    proc = dist_lm("train", *data_args(short_text, heldout, heldout), *TINY, *ARGS,
                   "--batch-size", "10", "--run-dir", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    two = [r["train/loss"] for r in metrics(run_dir) if r["kind"] == "train"]
    one = [r["train/loss"] for r in metrics(tmp_path) if r["kind"] == "train"]
    assert len(two) == 4 and two == pytest.approx(one, rel=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_a_real_tensorboard_server_serves_the_runs_scalars(two_rank_run):
    run_dir, _ = two_rank_run
    port = free_port()
    server = subprocess.Popen([BIN / "tensorboard", "--logdir", run_dir, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, tags = time.time() + 60, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
                if tags.get(".", {}).get("train/loss"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert tags and "train/loss" in tags["."], tags
        url = f"{base}/data/plugin/scalars/scalars?run=.&tag=train/loss"
        with urllib.request.urlopen(url, timeout=10) as r:
            points = json.load(r)
        expected = [r["train/loss"] for r in metrics(run_dir) if r["kind"] == "train"]
        assert [p[1] for p in points] == [6, 12, 18, 24]
        assert [p[2] for p in points] == pytest.approx(expected, rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.dist
def test_generate_is_deterministic_and_in_vocabulary(two_rank_run):
    run_dir, _ = two_rank_run
    vocab = set(json.loads((run_dir / "vocab.json").read_text())["idx_to_token"])
    outs = [dist_lm("generate", "--run-dir", run_dir, "--words", "30", "--seed", "7",
                    "--context", "cpu", "--prompt", "The game") for _ in range(2)]
    assert all(p.returncode == 0 for p in outs), outs[0].stderr
    assert outs[0].stdout == outs[1].stdout
    words = outs[0].stdout.split()
    # The prompt as the model read it, then 30 words.
    assert words[:2] == [w if w in vocab else "<unk>" for w in ("The", "game")]
    assert len(words) == 32
    assert set(words) <= vocab
    lines = outs[0].stdout.splitlines()
    assert all(line.endswith(" <eos>") for line in lines[:-1])  # <eos> shown, ends a line
    assert "<eos>" not in lines[-1][:-5]
    other = dist_lm("generate", "--run-dir", run_dir, "--words", "30", "--seed", "8",
                    "--context", "cpu", "--prompt", "The game")
    assert other.stdout != outs[0].stdout


@pytest.mark.dist
def test_report_writes_a_png_and_a_summary(two_rank_run, tmp_path):
    run_dir, _ = two_rank_run
    out = tmp_path / "r.png"
    proc = dist_lm("report", run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image
    assert matplotlib.image.imread(str(out)).shape[:2] == (480, 1500)
    assert re.search(r"\s24\s+[0-9.]+\s+[0-9.]+\s+\d+", proc.stdout), proc.stdout


@pytest.mark.medium
def test_device_syncs_happen_on_log_steps_only(heldout, tmp_path, monkeypatch):
    """Counts host reads of device values in-process: 20 more steps between two log
    steps must not add 20 more reads."""
    import mxnet as mx

    from dist_lm.cli import build_parser
    from dist_lm.config import config_from_args
    from dist_lm.runtime.dist import LocalWorld
    from dist_lm.training.train import train

    reads = {"n": 0}
    original = mx.nd.NDArray.asnumpy

    def counting(self):
        reads["n"] += 1
        return original(self)

    monkeypatch.setattr(mx.nd.NDArray, "asnumpy", counting)
    counts = []
    for steps in (10, 30):
        reads["n"] = 0
        argv = ["train", *map(str, data_args(VALID, heldout, heldout)), *TINY,
                "--max-steps", str(steps), "--log-interval", str(steps), "--epochs", "1",
                "--run-dir", str(tmp_path / str(steps))]
        train(config_from_args(build_parser().parse_args(argv)), LocalWorld())
        counts.append(reads["n"])
    assert counts[0] == counts[1], counts


SAMPLE = [REPO / "dist_lm" / "data" / "sample" / f"{split}.txt"
          for split in ("train", "valid", "test")]


@pytest.mark.medium
def test_a_short_run_says_where_it_writes_logs_each_epoch_once_and_lists_its_files(tmp_path):
    """The default --log-interval (200) is longer than the sample corpus's 32-step epoch:
    each epoch logs once, at its end, with tokens/s beside samples/s."""
    run_dir = tmp_path / "run"
    proc = dist_lm("train", *data_args(*SAMPLE), *TINY, "--epochs", "2", "--run-dir", run_dir,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"Run directory {run_dir} (1 rank); watch it with: "
                        f"tensorboard --logdir {run_dir}")
    logged = re.findall(r"^\[Epoch (\d) Batch (\d+)/(\d+)\] loss [0-9.]+, ppl [0-9.]+, "
                        r"throughput [0-9.]+ samples/s, (\d+) tokens/s$", proc.stdout, re.M)
    assert [(e, b, n) for e, b, n, _ in logged] == [("0", "32", "32"), ("1", "32", "32")]
    rows = records(run_dir, "train")
    assert [r["step"] for r in rows] == [32, 64]
    assert [int(t) for *_, t in logged] == [round(r["throughput/tokens_per_s"]) for r in rows]
    assert re.search(r"^\[Epoch 1\] throughput [0-9.]+ samples/s, \d+ tokens/s$", proc.stdout,
                     re.M)
    assert lines[-1] == (f"Wrote {run_dir}: best.params, final.params, checkpoints/ (2, "
                         f"newest step-000000064), metrics.jsonl, TensorBoard events "
                         f"(events.out.tfevents.*, by_tokens/, hparams/)")
    assert (run_dir / "best.params").is_file() and list(run_dir.glob("events.out.*"))


@pytest.mark.parametrize("code,exit_code", [(28, 7), (5, 7), (13, 2)])  # ENOSPC, EIO, EACCES
def test_a_metrics_write_that_fails_is_one_error_and_closes_quietly(tmp_path, code,
                                                                    exit_code):
    """A full disk (or failed storage) under TensorBoard's writer: one error, not a
    traceback, and the writers' exit hooks do not flush (and fail) again."""
    import errno
    import io
    import os

    from dist_lm.errors import UsageError, exit_code_of
    from dist_lm.training.observe import Reporter

    reporter = Reporter(str(tmp_path), {}, stream=io.StringIO())
    file_writers = [fw for w in (reporter.writer, reporter.token_writer)
                    for fw in w.all_writers.values()]

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    reporter.writer.flush = full
    with pytest.raises(UsageError, match=r"cannot write the run's metrics in .*: "
                                         + os.strerror(code)) as raised:
        reporter.record("train", 5, 100, {"train/loss": 1.0})
    assert exit_code_of(raised.value) == exit_code
    assert (errno.ENOSPC, errno.EIO, errno.EACCES) == (28, 5, 13)
    reporter.close()  # nothing left to close
    for file_writer in file_writers:  # what tensorboardX's exit hook calls
        assert file_writer.event_writer._closed
        file_writer.event_writer.close()
