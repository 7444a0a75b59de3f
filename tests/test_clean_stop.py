"""A clean stop under horovodrun --gloo ends with each rank's one stop line: nothing
after it, no traceback from MXNet's exit handler."""

import re
import signal

import pytest

from conftest import BIN, TINY, WIKITEXT2, data_args, launcher, start, wait_for
from test_reliability import STOP_BOUND_S, finish

pytestmark = [pytest.mark.dist, pytest.mark.medium]


def rank_lines(text: str) -> dict:
    """Each rank's own output lines, in order, without horovodrun's `[R]<stderr>:`."""
    lines: dict = {}
    for rank, line in re.findall(r"^\[(\d+)\]<std(?:out|err)>:(.*)$", text, re.M):
        lines.setdefault(rank, []).append(line)
    return lines


def test_a_stop_during_validation_leaves_no_operation_for_the_exit_handlers(
        heldout, tmp_path):
    """--max-steps 20 pauses inside the 37-step epoch with a checkpoint, then validates on
    the whole WikiText-2 training split in batches of 400 columns (about half a second
    each): the signal comes during that validation. No checkpoint follows the agreed
    stop, so the stop agreement's last allreduce is still queued in MXNet's engine behind
    an evaluation batch when the rank shuts Horovod down."""
    args = [BIN / "dist-lm", "train", *data_args(heldout, WIKITEXT2 / "wiki.train.tokens",
                                                 heldout), *TINY,
            "--global-batch-size", "20", "--max-steps", "20", "--log-interval", "10",
            "--eval-batch-size", "400", "--test-batch-size", "20", "--lr", "1",
            "--run-dir", tmp_path / "run"]
    log = tmp_path / "log"
    proc = start(launcher("gloo", 2, *args), log)
    wait_for(log, r"Batch 20/", proc)
    proc.send_signal(signal.SIGTERM)
    finish(proc, STOP_BOUND_S)
    text = log.read_text()
    assert "Stopping at step 20 during evaluation on a signal" in text, text
    ranks = rank_lines(text)
    assert sorted(ranks) == ["0", "1"], text
    for rank, lines in ranks.items():
        stop = next(i for i, line in enumerate(lines) if line.startswith("dist-lm: stopped:"))
        assert lines[stop] == f"dist-lm: stopped: [rank {rank}] stopped by a signal at step " \
                              f"20 during evaluation, checkpoint written", text
        assert not [line for line in lines[stop + 1:] if "Traceback" in line
                    or "Exception ignored" in line], text
        assert stop == len(lines) - 1, text  # the stop line is the rank's last word
