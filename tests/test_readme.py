"""The README as a newcomer runs it: every command it shows parses or runs (dist-lm's own
argument parser, the Makefile's targets, the launchers' --dry-run), every file it links
exists, and its `make smoke` console sample has the lines `make smoke` prints, the
first and the last included (numbers masked: they move with the machine and the model)."""

import os
import re
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, REPO, run

README = (REPO / "README.md").read_text(encoding="utf-8")


def blocks(lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.M | re.S)


def commands():
    """The shell blocks' commands, continuation lines joined."""
    out = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


def inline_dist_lm():
    """`dist-lm ...` spans in the text that are whole commands (with options; not a bare
    subcommand's name)."""
    return [s for s in re.findall(r"`((?:\.venv/bin/)?dist-lm [^`]+)`", README)
            if " --" in s and "..." not in s and "--help" not in s]


def dist_lm_argv(command):
    words = shlex.split(command)
    at = next(i for i, w in enumerate(words) if w.endswith("dist-lm"))
    return words[at + 1:]


def test_the_readme_shows_the_quickstart_and_the_test_command():
    cmds = commands()
    assert "make smoke" in cmds and cmds.index("make smoke") < cmds.index("make train")
    quickstart = [[line.split("#")[0].strip() for line in b.splitlines()] for b in blocks("sh")]
    assert ["make train", "make test"] in quickstart  # CI's .ci/run runs make test
    assert 120 <= len(README.splitlines()) <= 220


def test_every_dist_lm_command_parses():
    from dist_lm.cli import parse

    shown = [c for c in commands() if "dist-lm " in c and c.split()[0].endswith("dist-lm")]
    shown += inline_dist_lm()
    assert len(shown) >= 4, shown
    for command in shown:
        parse(dist_lm_argv(command))  # raises CommandLineError (a UsageError) if not


def test_the_readmes_gluonnlp_line_trains_the_scripts_model():
    from dist_lm.cli import parse
    from dist_lm.config import config_from_args

    (line,) = [c for c in commands() if "--emsize" in c]
    cfg = config_from_args(parse(dist_lm_argv(line)))
    assert cfg.model.model == "awd_lstm_lm_600" and cfg.optim.ntasgd


def test_every_make_target_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    shown = [c for c in commands() if c.startswith("make ")]
    shown += re.findall(r"`(make [a-z-]+)`", README)
    for command in shown:
        words = [w for w in shlex.split(command)[1:] if "=" not in w]
        assert words and set(words) <= targets, command


def test_the_launch_commands_parse_in_dry_run_mode():
    shown = [c for c in commands() if c.startswith("launch/")]
    assert any("train-workstation.sh" in c for c in shown)
    for command in shown:
        words = shlex.split(command)
        if "--dry-run" not in words:
            words.insert(1, "--dry-run")
        proc = run([sys.executable if words[0] == "launch/submit" else "bash",
                    REPO / words[0], *words[1:]], timeout=60)
        assert proc.returncode == 0 and proc.stdout, (command, proc.stderr)


def test_every_linked_file_and_tool_exists():
    links = re.findall(r"\]\(([^)#\s]+)", README)
    assert len(links) >= 10
    for link in links:
        if not link.startswith("http"):
            assert (REPO / link).exists(), link
    for command in commands():
        if command.startswith(".venv/bin/"):
            assert (BIN / command.split()[0].split("/")[-1]).exists(), command


def masked(line):
    return re.sub(r"\d+(\.\d+)?", "N", line.rstrip())


@pytest.mark.medium
def test_make_smoke_prints_the_readmes_console_sample_within_a_minute(tmp_path):
    """The smoke run is `make smoke`'s own recipe (make -n), with its run and cache
    directories in tmp_path; its CPU time (not its wall time: the machine is shared)
    stays under a minute."""
    run_dir = tmp_path / "smoke"
    # Under `make test` MAKELEVEL and MAKEFLAGS would make it print "make[1]: Entering".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    recipe = subprocess.run(["make", "-n", "--no-print-directory", "smoke",
                             f"VENV={BIN.parent}", f"SMOKE_DIR={run_dir}",
                             f"CACHE_DIR={tmp_path / 'cache'}"],
                            cwd=REPO, capture_output=True, text=True, check=True,
                            env=env).stdout
    recipe = "\n".join(line for line in recipe.splitlines() if "setup-env" not in line)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run(["bash", "-c", recipe], timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert cpu < 60, cpu
    printed = [masked(line.replace(str(run_dir), "runs/smoke"))
               for line in proc.stdout.splitlines()]
    (sample,) = [b for b in blocks("console") if "runs/smoke" in b]
    assert [masked(line) for line in sample.splitlines()] == printed
    assert Path(run_dir / "best.params").is_file()
