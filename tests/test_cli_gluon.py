"""`dist-lm train` reads a command line pasted from GluonNLP v0.x's
scripts/language_model/word_language_model.py (its README's lines): the options that mean
the same become dist-lm's, the model is the one the script would build, and the options
that mean something else are refused in one line that names each replacement."""

import pytest

from conftest import dist_lm
from dist_lm.cli import CommandLineError, parse
from dist_lm.config import config_from_args

# From GluonNLP v0.x scripts/language_model/index.rst (`python word_language_model.py`).
AWD_1150 = ("--gpu 0 --tied --ntasgd --lr_update_interval 30 --lr_update_factor 0.1 "
            "--save awd_lstm_lm_1150_wikitext-2")
AWD_600 = ("--gpu 0 --emsize 200 --nhid 600 --epochs 750 --dropout 0.2 --dropout_h 0.1 "
           "--dropout_i 0.3 --dropout_e 0.05 --weight_drop 0.2 --tied --ntasgd "
           "--lr_update_interval 30 --lr_update_factor 0.1 --save awd_lstm_lm_600_wikitext-2")
STANDARD_200 = ("--gpu 0 --emsize 200 --nhid 200 --nlayers 2 --lr 20 --epochs 750 "
                "--batch_size 20 --bptt 35 --dropout 0.2 --dropout_h 0 --dropout_i 0 "
                "--dropout_e 0 --weight_drop 0 --tied --wd 0 --alpha 0 --beta 0 --ntasgd "
                "--lr_update_interval 30 --lr_update_factor 0.1 "
                "--save standard_lstm_lm_200_wikitext-2")


def config(line: str):
    return config_from_args(parse(["train", *line.split()]))


def refusal(line: str) -> str:
    with pytest.raises(CommandLineError) as err:
        parse(["train", *line.split()])
    assert err.value.prog == "dist-lm train"
    return str(err.value)


@pytest.mark.parametrize("line", [AWD_1150, AWD_600, STANDARD_200])
def test_pasted_readme_lines_name_the_exact_replacements(line):
    message = refusal(line)
    assert "--gpu 0: use --context gpu:0" in message
    stem = line.split("--save ")[1]
    assert f"--save {stem}: use --run-dir {stem}" in message
    assert ("--batch_size 20: use --global-batch-size 20" in message) == \
        ("--batch_size" in line)


def replaced(line: str) -> str:
    """The line with each refused option replaced as the refusal says."""
    words = line.split()
    out = []
    while words:
        w = words.pop(0)
        if w == "--gpu":
            out += ["--context", "cpu"]  # gpu:0 on a machine with one
            words.pop(0)
        elif w == "--save":
            out += ["--run-dir", words.pop(0)]
        elif w == "--batch_size":
            out += ["--global-batch-size", words.pop(0)]
        else:
            out.append(w)
    return " ".join(out)


@pytest.mark.parametrize("line, model", [(AWD_1150, "awd_lstm_lm_1150"),
                                         (AWD_600, "awd_lstm_lm_600"),
                                         (STANDARD_200, "standard_lstm_lm_200")])
def test_pasted_readme_lines_with_the_replacements_train_the_scripts_model(line, model):
    cfg = config(replaced(line))
    assert cfg.model.model == model and cfg.model.tie_weights
    assert cfg.optim.ntasgd and cfg.optim.lr_update_interval == 30
    assert cfg.optim.lr_update_factor == 0.1
    assert cfg.run.run_dir == line.split("--save ")[1]
    if model.startswith("awd"):  # the script's defaults: dist-lm's AWD recipe
        assert (cfg.optim.lr, cfg.run.bptt, cfg.run.global_batch_size) == (30.0, 70, 80)
        assert (cfg.optim.wd, cfg.optim.alpha, cfg.optim.beta) == (1.2e-6, 2.0, 1.0)
        assert cfg.run.variable_bptt
    else:
        assert (cfg.optim.lr, cfg.run.bptt, cfg.run.global_batch_size) == (20.0, 35, 20)
        assert (cfg.optim.wd, cfg.optim.alpha, cfg.optim.beta) == (0.0, 0.0, 0.0)
    if "--epochs" in line:
        assert cfg.run.epochs == 750


def test_a_model_of_no_preset_is_custom_with_the_scripts_defaults_for_the_rest():
    cfg = config("--emsize 64 --nhid 96 --weight_dropout=0.3")
    m = cfg.model
    assert (m.model, m.family, m.embed_size, m.hidden_size, m.num_layers) == \
        ("custom", "awd", 64, 96, 3)
    assert (m.dropout, m.weight_drop, m.drop_h, m.drop_i, m.drop_e, m.tie_weights) == \
        (0.4, 0.3, 0.2, 0.65, 0.1, False)


def test_dist_lm_model_options_decide_and_the_scripts_sizes_override_them():
    cfg = config("--model awd_lstm_lm_600 --nhid 300 --tied")
    assert (cfg.model.model, cfg.model.hidden_size, cfg.model.embed_size) == \
        ("awd_lstm_lm_600", 300, 200)


def test_cells_other_than_lstm_and_script_only_modes_are_refused():
    assert "--model gru: dist-lm trains LSTMs only" in refusal("--model gru")
    assert config("--model lstm").model.model == "standard_lstm_lm_200"
    assert "--eval_only: use dist-lm eval --run-dir DIR" in refusal("--eval_only")
    assert "--test_mode: use make smoke" in refusal("--test_mode")
    assert "launch/train-workstation.sh -np 3" in refusal("--gpus 0,2,5")


def test_underscore_spellings_of_dist_lm_options_work():
    cfg = config("--max_steps 7 --log_interval 3 --eval_batch_size 4 --run_dir=/tmp/x")
    assert (cfg.run.max_steps, cfg.run.log_interval, cfg.run.eval_batch_size,
            cfg.run.run_dir) == (7, 3, 4, "/tmp/x")


def test_a_near_miss_names_the_option_one_line_with_the_subcommand():
    proc = dist_lm("train", "--bacth-size", "20")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-lm train: error: unrecognized arguments: --bacth-size 20 "
        "(did you mean --batch-size?)"]
    proc = dist_lm("train", "--batch_size", "20")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dist-lm train: error: GluonNLP word_language_model.py options that mean something "
        "else here: --batch_size 20: use --global-batch-size 20 (the script's batch is over "
        "all its devices; dist-lm's --batch-size is per rank)"]
    proc = dist_lm("eval", "--run-dir", "x", "--splitt", "test")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "dist-lm eval: error: unrecognized arguments: --splitt test (did you mean --split?)"]
