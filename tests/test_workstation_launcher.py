"""launch/train-workstation.sh's command line, read without starting a job (--dry-run
prints the command it would run): horovodrun's and mpirun's -np and -H, the environment
variables, and the controller the Makefile shares with it."""

import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO

SCRIPT = REPO / "launch" / "train-workstation.sh"


def dry(*args, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NP", "HOSTS", "CONTROLLER", "IFACE")}
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          env=dict(clean, **env), timeout=30)
    return proc.returncode, shlex.split(proc.stdout), proc.stderr


def after(words, flag):
    return words[words.index(flag) + 1]


def test_np_and_h_flags_as_horovodrun_and_mpirun_take_them():
    code, words, err = dry("-np", "3", "-H", "a:2,b:1", "--dry-run", "--epochs", "1")
    assert code == 0, err
    assert words[:3] == ["dist-lm", "launch", "mpirun"]
    assert after(words, "-np") == "3" and after(words, "-H") == "a:2,b:1"
    assert words[-3:] == ["train", "--epochs", "1"]


def test_the_flags_override_the_environment_which_still_works():
    _, words, _ = dry("--dry-run", NP="4", HOSTS="x:4")
    assert (after(words, "-np"), after(words, "-H")) == ("4", "x:4")
    _, words, _ = dry("-np", "2", "--dry-run", NP="4")
    assert (after(words, "-np"), after(words, "-H")) == ("2", "localhost:2")
    _, words, _ = dry("-H", "p:1,q:2", "--dry-run", "--", "--lr", "5")
    assert after(words, "-np") == "3" and words[-2:] == ["--lr", "5"]  # HOSTS' slots
    _, words, _ = dry("--dry-run", CONTROLLER="gloo", NP="2", IFACE="eth1")
    assert words[2] == "horovodrun" and "--gloo" in words
    assert after(words, "--network-interface") == "eth1"
    _, words, _ = dry("-np", "1", "--dry-run", "--max-steps", "2")
    assert words == ["dist-lm", "train", "--max-steps", "2"]  # one plain process


@pytest.mark.parametrize("args, message", [
    (["-np"], "-np needs a rank count"), (["-np", "two"], "NP must be a positive integer"),
    (["-H", "a b"], "HOSTS must be host:slots"),
])
def test_bad_flags_one_line_exit_2(args, message):
    code, words, err = dry("--dry-run", *args)
    assert code == 2 and words == [] and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_one_default_controller_mpi_shared_with_the_makefile():
    """mpirun: under horovodrun a stop checkpoint longer than 5 s is lost
    (docs/reliability.md)."""
    _, words, _ = dry("-np", "2", "--dry-run")
    assert words[2] == "mpirun"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^CONTROLLER \?=\s*$", makefile, re.M), "the Makefile sets its own"
    assert "$(if $(CONTROLLER),CONTROLLER=$(CONTROLLER))" in makefile
    assert "should run under mpirun" in (REPO / "docs" / "reliability.md").read_text()
