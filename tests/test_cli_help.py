"""`dist-lm --help` and `dist-lm train --help`, read as a user reads them: every
subcommand listed, and each option's default shown once, as the value a bare
`dist-lm train` trains with."""

import dataclasses
import re

from conftest import dist_lm, parse_config
from dist_lm.config import GROUPS

# Options whose default is named, not a value: what each name means in the Config.
DESCRIBED = {
    "--test-batch-size": ("--eval-batch-size", lambda cfg: cfg.run.eval_batch_size),
    "--run-dir": ("runs/<the --model name>", lambda cfg: f"runs/{cfg.model.model}"),
    "--global-batch-size": ("ranks x --batch-size", lambda cfg: None),
    "--max-vocab": ("no limit", lambda cfg: None),
    "--max-steps": ("no limit", lambda cfg: None),
    "--sampled-softmax": ("off", lambda cfg: None),
    "--lr-update-interval": ("off", lambda cfg: None),
    "--cache-dir": ("$DIST_LM_CACHE_DIR, else .dist-lm-", lambda cfg: None),
}


def options(help_text: str) -> dict:
    """Each option's help text on one line, by its first flag."""
    found, current = {}, None
    for line in help_text.splitlines():
        start = re.match(r"  (-\S+)", line)
        if start:
            current = start.group(1).rstrip(",")
            found[current] = line.strip()
        elif current and line.startswith("    "):
            found[current] += " " + line.strip()
        else:
            current = None
    return found


def fields():
    """Every Config field by its flag: (group, name)."""
    return {"--" + f.name.replace("_", "-"): (group, f.name)
            for group, klass in GROUPS.items() for f in dataclasses.fields(klass)}


def test_every_subcommand_is_listed_launch_too():
    proc = dist_lm("--help")
    assert proc.returncode == 0, proc.stderr
    choices = re.search(r"\{([a-z,-]+)\}", proc.stdout).group(1).split(",")
    assert set(choices) >= {"train", "eval", "generate", "report", "bench", "bench-profile",
                            "bench-ceiling", "bench-scale", "bench-net", "launch"}
    for name in choices:  # each with its one-line description
        assert re.search(rf"^    {re.escape(name)} +\S", proc.stdout, re.M), proc.stdout
    launch = dist_lm("launch", "--help")  # still the launcher supervisor's own usage
    assert launch.returncode == 0 and launch.stdout.startswith("usage: dist-lm launch")


def test_train_help_shows_each_real_default_once():
    proc = dist_lm("train", "--help")
    assert proc.returncode == 0, proc.stderr
    shown = options(proc.stdout)
    by_flag, cfg = fields(), parse_config()
    assert set(by_flag) <= set(shown)
    compared = []
    for flag, text in shown.items():
        assert text.count("(default:") <= 1, text
        assert "(default: None)" not in text, text
        if flag not in by_flag:
            continue
        group, name = by_flag[flag]
        value = getattr(getattr(cfg, group), name)
        default = re.search(r"\(default: ([^;)]*)", text)
        if flag in DESCRIBED:
            words, meaning = DESCRIBED[flag]
            assert default and default.group(1).startswith(words), text
            assert value == meaning(cfg), (flag, value)
            continue
        if value is None:  # nothing is used unless given (--data-dir, --download, ...)
            assert default is None, text
            continue
        assert default, f"{flag} does not show its default {value!r}: {text}"
        parse = {bool: lambda s: {"True": True, "False": False}[s]}.get(type(value),
                                                                        type(value))
        assert parse(default.group(1)) == value, (flag, default.group(1), value)
        compared.append(flag)
    assert len(compared) >= 40, compared
    assert "--lr" in compared and "--embed-size" in compared and "--resume" in compared


def test_defaults_set_by_the_model_preset_or_the_recipe_say_so():
    shown = options(dist_lm("train", "--help").stdout)
    assert "set by the --model preset" in shown["--hidden-size"]
    assert "awd recipe: 30.0" in shown["--lr"]
    awd = parse_config("--model", "awd_lstm_lm_600")
    assert f"awd recipe: {awd.run.bptt}" in shown["--bptt"]
    assert f"awd recipe: {awd.optim.lr_update_interval}" in shown["--lr-update-interval"]


def test_version():
    from dist_lm import __version__

    proc = dist_lm("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dist-lm {__version__}"


def test_the_other_subcommands_show_their_defaults_and_name_their_values():
    """Every option with a default says it; no value is shown as a bare type letter."""
    for command in ("eval", "generate", "report", "bench", "bench-profile", "bench-ceiling",
                    "bench-scale", "bench-net", "launch", "train"):
        args = (command, "--help") if command != "eval" else ("eval", "-h")
        proc = dist_lm(*args)
        assert proc.returncode == 0, proc.stderr
        assert not re.search(r"--[a-z-]+ S\b", proc.stdout), (command, proc.stdout)
        assert "(default: None)" not in proc.stdout and "(default: (" not in proc.stdout
    shown = options(dist_lm("generate", "--help").stdout)
    assert "(default: 50)" in shown["--words"] and "(default: auto)" in shown["--params"]
    assert shown["--run-dir"].startswith("--run-dir DIR")
    shown = options(dist_lm("eval", "--help").stdout)
    assert "which split" in shown["--split"] and "(default: test)" in shown["--split"]
    assert "(default: report.png)" in options(dist_lm("report", "--help").stdout)["--out"]
    assert "(default: 60.0 600.0)" in " ".join(dist_lm("launch", "--help").stdout.split())
    train = options(dist_lm("train", "--help").stdout)
    assert train["--run-dir"].startswith("--run-dir DIR")
    assert train["--train-file"].startswith("--train-file FILE")
    assert train["--model"].startswith("--model MODEL")
