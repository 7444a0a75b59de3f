"""`dist-lm report` of a paused run and of a finished one: the summary says what each
perplexity is, and the image carries the runs' settings and results."""

import json

import pytest

from conftest import dist_lm


def write_run(path, rows, model="awd_lstm_lm_600", ranks=2):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text(json.dumps({
        "model": {"model": model, "family": "awd", "embed_size": 200, "hidden_size": 600,
                  "num_layers": 3}, "run": {"recipe": "auto", "epochs": 3}}))
    (path / "run.json").write_text(json.dumps({"ranks": ranks}))
    return path


def train(step, loss):
    return {"kind": "train", "step": step, "tokens": step * 700, "train/loss": loss,
            "throughput/tokens_per_s": 1000.0 + step}


PAUSED = [{"kind": "world", "step": 0, "tokens": 0, "world/ranks": 2}, train(5, 6.0),
          train(10, 5.5), {"kind": "checkpoint", "step": 10, "tokens": 7000},
          {"kind": "valid", "step": 10, "tokens": 7000, "epoch": 0, "val/ppl": 300.0,
           "paused": True},
          {"kind": "done", "step": 10, "tokens": 7000, "time/total_s": 3.0}]
FINISHED = [{"kind": "world", "step": 0, "tokens": 0, "world/ranks": 1}, train(10, 6.0),
            {"kind": "epoch", "step": 20, "tokens": 14000}, train(20, 5.0),
            {"kind": "valid", "step": 20, "tokens": 14000, "epoch": 0, "val/ppl": 200.0},
            {"kind": "test", "step": 20, "tokens": 14000, "test/ppl": 190.0},
            {"kind": "epoch", "step": 40, "tokens": 28000}, train(40, 4.8),
            {"kind": "valid", "step": 40, "tokens": 28000, "epoch": 1, "val/ppl": 210.0},
            {"kind": "done", "step": 40, "tokens": 28000, "time/total_s": 9.5}]


def test_summary_of_a_paused_and_a_finished_run(tmp_path):
    from dist_lm.tools.report import describe, summarize

    paused = summarize(str(write_run(tmp_path / "p", PAUSED)), PAUSED)
    assert paused["best_val_ppl"] is None and paused["test_ppl"] is None
    assert paused["paused_val_ppl"] == 300.0 and paused["ranks"] == 2
    text = describe(paused)
    assert "best validation -, test -, last validation 300.00 (where it paused" in text
    assert "awd_lstm_lm_600" in text and "recipe auto (awd)" in text
    assert "2 rank(s); 10 steps, 7,000 tokens, paused by --max-steps" in text
    done = summarize(str(write_run(tmp_path / "f", FINISHED, ranks=1)), FINISHED)
    assert (done["best_val_ppl"], done["test_ppl"], done["last_val_ppl"]) == \
        (200.0, 190.0, 210.0)
    assert done["paused_val_ppl"] is None and "finished" in describe(done)


@pytest.mark.medium
def test_the_report_command_and_its_image(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / "paused", PAUSED), write_run(tmp_path / "done", FINISHED)]
    out = tmp_path / "r.png"
    proc = dist_lm("report", *runs, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "nan" not in proc.stdout
    header, paused, done, note, wrote = proc.stdout.splitlines()
    assert header.split()[-4:] == ["ppl", "tokens/s", "train", "loop"] or \
        "train loop s" in header
    assert paused.split()[1:5] == ["10", "-", "-", "300.00*"]
    assert done.split()[1:5] == ["40", "200.00", "190.00", "210.00"]
    assert note.startswith("* validated where --max-steps paused")
    import matplotlib.image
    assert matplotlib.image.imread(str(out)).shape[:2] == (520, 1500)
