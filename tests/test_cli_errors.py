"""Bad input gets one line on stderr and exit code 2, from the real command."""

import re

import pytest

from conftest import TINY, VALID, data_args, dist_lm


def write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, heldout):
    """A run directory with checkpoints, trained on the held-out text."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    proc = dist_lm("train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "10",
                   "--checkpoint-steps", "5", "--log-interval", "5",
                   "--run-dir", run_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture
def files(tmp_path, trained_run, heldout):
    import shutil
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(sorted((trained_run / "checkpoints").iterdir())[-1], truncated)
    (truncated / "hidden.nd").write_bytes((truncated / "hidden.nd").read_bytes()[:10])
    a_file = write(tmp_path / "a-file", b"x")
    return {
        "run": trained_run, "heldout": heldout, "foreign": foreign, "truncated": truncated,
        "under_a_file": a_file / "run",
        "newest": sorted((trained_run / "checkpoints").iterdir())[-1],
        "empty": write(tmp_path / "empty.txt", b""),
        "latin1": write(tmp_path / "latin1.txt", b"caf\xe9 cr\xe8me\n" * 50),
        "binary": write(tmp_path / "bin.txt", bytes(range(256)) * 10),
        "tiny": write(tmp_path / "tiny.txt", b"just a few words\n"),
        "nodir": tmp_path / "no-such-dir",
        "emptydir": tmp_path,
    }


CASES = {
    "missing directory": (lambda f: ["--data-dir", f["nodir"]], "no such directory"),
    "missing split": (lambda f: ["--data-dir", f["emptydir"]], "train split .* no such file"),
    "missing file": (lambda f: data_args(train=f["nodir"] / "x.txt"), "no such file"),
    "empty corpus": (lambda f: data_args(train=f["empty"]), "is empty"),
    "not utf-8": (lambda f: data_args(train=f["latin1"]), "not UTF-8 text"),
    "binary": (lambda f: data_args(train=f["binary"]), "binary file"),
    "too small": (lambda f: data_args(train=f["tiny"]), "too few for one batch"),
    "unknown model": (lambda f: data_args() + ["--model", "lstm_9000"], "unknown model"),
    "zero batch": (lambda f: data_args() + ["--batch-size", "0"], "--batch-size must be"),
    "negative bptt": (lambda f: data_args() + ["--bptt", "-1"], "--bptt must be"),
    "unknown flag": (lambda f: data_args() + ["--bacth-size", "3"], "unrecognized arguments"),
    "zero validation columns": (lambda f: data_args() + ["--eval-batch-size", "0"],
                                "--eval-batch-size must be"),
    "negative test columns": (lambda f: data_args() + ["--test-batch-size", "-1"],
                              "--test-batch-size must be"),
    "nan learning rate": (lambda f: data_args() + ["--lr", "nan"], "--lr must be a positive"),
    "dropout of 1.5": (lambda f: data_args() + ["--dropout", "1.5"], r"--dropout must be in"),
    "unwritable run dir": (lambda f: data_args() + ["--run-dir", f["under_a_file"]],
                           "is not writable"),
    "foreign checkpoint": (lambda f: data_args() + ["--resume", f["foreign"]],
                           "unreadable meta.json"),
    "truncated checkpoint": (lambda f: data_args() + ["--resume", f["truncated"]],
                             "hidden.nd is damaged"),
    "missing checkpoint": (lambda f: data_args() + ["--resume", f["nodir"]],
                           "no such checkpoint directory"),
    "other data": (lambda f: data_args() + ["--resume", f["newest"]],
                   "trained on other data: its train split has sha1 [0-9a-f]{40} "),
    "other vocabulary": (lambda f: data_args(f["heldout"], f["heldout"], f["heldout"])
                         + ["--resume", f["newest"], "--max-vocab", "500"],
                         "different vocabulary"),
    "other model": (lambda f: data_args(f["heldout"], f["heldout"], f["heldout"])
                    + ["--resume", f["newest"], "--hidden-size", "48", "--embed-size", "48"],
                    "different model .*embed_size, hidden_size"),
    "other global batch": (lambda f: data_args(f["heldout"], f["heldout"], f["heldout"])
                           + ["--resume", f["newest"], "--batch-size", "7"],
                           "20 global columns .* this run has 7"),
    "run dir with checkpoints, no --resume": (
        lambda f: data_args(f["heldout"], f["heldout"], f["heldout"])
        + ["--run-dir", f["run"]], "holds checkpoints: pass --resume auto"),
}


@pytest.mark.medium
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(case, files, tmp_path):
    argv, message = CASES[case]
    args = [str(a) for a in argv(files)]
    if "--run-dir" not in args:
        args += ["--run-dir", str(tmp_path / "run")]
    proc = dist_lm("train", *TINY, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # The command line's errors name the subcommand, the run's name the program.
    prefix = "dist-lm train: error: " if case == "unknown flag" else "dist-lm: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def test_eval_of_a_missing_run_dir(tmp_path):
    proc = dist_lm("eval", "--run-dir", tmp_path / "nope", "--test-file", VALID)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


@pytest.mark.parametrize("value", ["abc", "0"])
def test_a_bad_thread_count_in_the_environment(value, tmp_path):
    proc = dist_lm("train", *TINY, *data_args(), "--run-dir", tmp_path / "run",
                   env={"OMP_NUM_THREADS": value}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"dist-lm: error: OMP_NUM_THREADS must be a positive integer, not '{value}'"]


def test_a_checkpoint_of_another_format_is_refused_not_skipped(trained_run, heldout, tmp_path):
    """Skipping it as damaged would start the run afresh and prune the user's checkpoints."""
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    meta = json.loads((newest / "meta.json").read_text())
    meta["format_version"] = 1
    (newest / "meta.json").write_text(json.dumps(meta))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = dist_lm("train", *data_args(heldout, heldout, heldout), *TINY, "--max-steps", "20",
                   "--run-dir", run_dir, "--resume", "auto", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has format 1, written by another version" in lines[0], \
        proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.medium
@pytest.mark.parametrize("split, flags, fix", [
    ("valid", [], "use a smaller --eval-batch-size or --bptt"),
    ("test", ["--eval-batch-size", "1", "--test-batch-size", "20"],
     "use a smaller --test-batch-size (default: --eval-batch-size) or --bptt"),
    ("train", ["--global-batch-size", "20"], "use a smaller --global-batch-size or --bptt"),
    ("train", ["--batch-size", "20"], "use a smaller --batch-size or --bptt, or fewer ranks"),
])
def test_a_split_too_small_names_the_option_that_fits_it(split, flags, fix, tmp_path):
    """Fewer ranks do not help where the columns are global (evaluation, a global
    batch): the line names only the options that do."""
    small = write(tmp_path / "small.txt", b"a few words of text here\n" * 40)  # 280 tokens
    files = {"train": VALID, "valid": VALID, "test": VALID, split: small}
    proc = dist_lm("train", *TINY, *data_args(files["train"], files["valid"], files["test"]),
                   *flags, "--run-dir", tmp_path / "run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"dist-lm: error: the {split} split has 280 tokens") and \
        line.endswith(fix), line
