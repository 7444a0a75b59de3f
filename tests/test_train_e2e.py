"""End to end on the real WikiText-2 files: train, evaluate, reproduce, repeat."""

import re

import pytest

from conftest import TINY, VALID, data_args, dist_lm

pytestmark = pytest.mark.slow

FLOAT = r"([0-9.]+|inf)"


def console(stdout, pattern):
    return [tuple(float(x) for x in m) for m in re.findall(pattern, stdout)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, heldout):
    run_dir = tmp_path_factory.mktemp("run")
    proc = dist_lm("train", *data_args(VALID, heldout, heldout), *TINY,
                   "--embed-size", "64", "--hidden-size", "64", "--lr", "20",
                   "--epochs", "1", "--log-interval", "50",
                   "--eval-first", "--dropout", "0", "--run-dir", run_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc.stdout


def test_training_lowers_validation_perplexity(trained):
    _, out = trained
    (start,) = console(out, rf"\[Start\] valid loss {FLOAT}, valid ppl {FLOAT}")
    valid = console(out, rf"\[Epoch \d+\] time cost [0-9.]+s, valid loss {FLOAT}, "
                         rf"valid ppl {FLOAT}")
    assert valid, out
    # Uniform over ~28k words is ppl ~28k; an epoch of SGD must get far below it.
    assert valid[-1][1] < start[1] / 10, (start, valid)
    batches = console(out, rf"\[Epoch (\d+) Batch (\d+)/(\d+)\] loss {FLOAT}, ppl {FLOAT}, "
                           rf"throughput {FLOAT} samples/s")
    assert [b[1] for b in batches] == [50, 100, 150, 200, 250, 300]
    assert batches[-1][3] < batches[0][3]


def test_run_dir_holds_config_vocab_and_params(trained):
    run_dir, _ = trained
    for name in ["config.json", "vocab.json", "run.json", "best.params", "final.params"]:
        assert (run_dir / name).is_file(), name


def test_eval_reproduces_the_logged_test_perplexity(trained, heldout):
    run_dir, out = trained
    (logged,) = console(out, rf"test loss {FLOAT}, test ppl {FLOAT}")
    proc = dist_lm("eval", "--run-dir", run_dir, "--test-file", heldout, "--context", "cpu")
    assert proc.returncode == 0, proc.stderr
    (again,) = console(proc.stdout, rf"test loss {FLOAT}, test ppl {FLOAT}")
    # The console prints 2 decimals, eval 4: equal up to the console's rounding.
    assert again[0] == pytest.approx(logged[0], abs=0.0051)
    assert again[1] == pytest.approx(logged[1], abs=0.0051)


def test_same_seed_same_config_identical_results(tmp_path, heldout):
    outputs = []
    for name in ("a", "b"):
        proc = dist_lm("train", *data_args(VALID, heldout, heldout), *TINY,
                       "--max-steps", "40", "--log-interval", "10", "--dropout", "0.3",
                       "--run-dir", tmp_path / name, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.replace(str(tmp_path / name), "RUN_DIR"))
    strip = [re.sub(r"throughput [0-9.]+ samples/s, [0-9]+ tokens/s|time cost [0-9.]+s", "", o)
             for o in outputs]
    assert strip[0] == strip[1]
    assert (tmp_path / "a" / "final.params").read_bytes() == \
        (tmp_path / "b" / "final.params").read_bytes()
