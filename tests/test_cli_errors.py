"""Bad input gets one line on stderr and exit code 2, from the real command."""

import pytest

from conftest import TINY, VALID, data_args, dist_lm


def write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.fixture
def files(tmp_path):
    return {
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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_line_exit_2(case, files, tmp_path):
    argv, message = CASES[case]
    proc = dist_lm("train", *TINY, *argv(files), "--run-dir", tmp_path / "run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-lm: error: "), proc.stderr
    import re
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def test_eval_of_a_missing_run_dir(tmp_path):
    proc = dist_lm("eval", "--run-dir", tmp_path / "nope", "--test-file", VALID)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
