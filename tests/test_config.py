import json
import subprocess
import sys

import pytest

from conftest import REPO, parse_config
from dist_lm.cli import build_parser
from dist_lm.config import Config
from dist_lm.errors import UsageError
from dist_lm.presets import PRESETS


def test_defaults_are_the_reference_recipe():
    cfg = parse_config()
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.wd) == \
        ("sgd", 20.0, 0.0, 0.0)
    assert (cfg.optim.clip, cfg.optim.lr_decay) == (0.25, 0.25)
    assert (cfg.run.batch_size, cfg.run.bptt, cfg.run.eval_batch_size) == (20, 35, 20)
    assert cfg.model.model == "standard_lstm_lm_200" and cfg.run.run_dir == \
        "runs/standard_lstm_lm_200"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_fill_the_model_section(name):
    cfg = parse_config("--model", name)
    for key, value in PRESETS[name].items():
        assert getattr(cfg.model, key) == value


def test_precedence_flags_over_file_over_preset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"model": "standard_lstm_lm_650", "dropout": 0.1},
                                "run": {"bptt": 70, "batch_size": 8}}))
    cfg = parse_config("--config", str(path), "--bptt", "10")
    assert cfg.model.hidden_size == 650          # preset of the file's model
    assert cfg.model.dropout == 0.1              # file over preset
    assert cfg.run.bptt == 10                    # flag over file
    assert cfg.run.batch_size == 8


def test_a_runs_config_json_round_trips():
    cfg = parse_config("--model", "awd_lstm_lm_600", "--lr", "5")
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_boolean_flags():
    assert parse_config("--no-tie-weights", "--model", "custom", "--embed-size",
                        "8").model.tie_weights is False


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--bptt", "-3"], "--bptt must be a positive integer"),
    (["--model", "gpt9"], "unknown model 'gpt9'"),
    (["--dropout", "1.5"], r"--dropout must be in \[0, 1\)"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--clip", "-1"], "--clip must be a non-negative number"),
    (["--batch-size", "ten"], "invalid int value"),
    (["--optimizer", "lamb"], "invalid choice"),
    (["--model", "custom", "--embed-size", "8", "--hidden-size", "16"], "--tie-weights needs"),
])
def test_bad_values_are_refused_with_one_line(argv, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_config(*argv)
    assert "\n" not in str(err.value)


def test_unknown_keys_in_a_config_file_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"batch": 3}}))
    with pytest.raises(UsageError, match=r"unknown key\(s\) \['batch'\] in 'run'"):
        parse_config("--config", str(path))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ["--train-file", "--valid-file", "--test-file", "--data-dir", "--model",
                 "--batch-size", "--bptt", "--epochs", "--max-steps", "--dropout", "--lr",
                 "--clip", "--seed", "--log-interval", "--run-dir"]:
        assert flag in text


def test_the_configuration_does_not_load_mxnet():
    """Parsing and checking a configuration, presets included, leaves MXNet unloaded."""
    code = ("import argparse, sys\n"
            "from dist_lm.config import Config, config_from_args\n"
            "Config().validate()\n"
            "config_from_args(argparse.Namespace(**{'model.model': 'awd_lstm_lm_600'}))\n"
            "assert 'mxnet' not in sys.modules, 'mxnet was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
