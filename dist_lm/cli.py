"""The `dist-lm` command: one entry point, one subcommand per job.

    dist-lm train [options]           train (one process, or one rank under horovodrun/mpirun)
    dist-lm eval --run-dir DIR ...    loss and perplexity of a run's saved parameters
    dist-lm bench --train-file F      throughput of the reference loop and of dist-lm

`main(argv)` returns the exit code and is what tests call. Errors a user can cause print
one line, `dist-lm: error: ...`, and exit 2 on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .config import add_config_args, config_from_args
from .errors import RanksOutOfSync, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-lm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a language model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p)
    p.add_argument("--dist", choices=("auto", "local", "horovod"), default="auto",
                   help="'auto' uses Horovod when started by horovodrun or mpirun")

    p = sub.add_parser("eval", help="evaluate a run's saved parameters on a text")
    p.add_argument("--run-dir", required=True, help="the run directory of a training run")
    p.add_argument("--params", default="best",
                   help="'best', 'final', or a .params file of the same model")
    p.add_argument("--test-file", help="the text to evaluate on")
    p.add_argument("--data-dir", help="a dataset directory (with --split)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--columns", type=int,
                   help="global BPTT columns (default: the run's evaluation layout)")
    p.add_argument("--context", default="auto", help="cpu, gpu, gpu:N or auto")
    p.add_argument("--dist", choices=("auto", "local", "horovod"), default="auto")

    from .bench import add_args as add_bench_args
    p = sub.add_parser("bench", help="throughput of the reference loop and of dist-lm")
    add_bench_args(p)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from .dist import make_world
    from .train import train

    world = make_world(args.dist, cfg.dist.fusion_threshold_mb, cfg.dist.cycle_time_ms)
    try:
        train(cfg, world)
    finally:
        world.shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import Config
    from .data import vocab_from_json
    from .dist import make_world
    from .rundir import read_json
    from .train import evaluate_run

    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise UsageError(f"--run-dir {run_dir}: no such directory")
    cfg = Config.from_dict(read_json(os.path.join(run_dir, "config.json"), "run config"))
    run_info = read_json(os.path.join(run_dir, "run.json"), "run record")
    try:
        with open(os.path.join(run_dir, "vocab.json"), encoding="utf-8") as fh:
            vocab = vocab_from_json(fh.read())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the vocabulary of {run_dir}: {err}") from None
    params = args.params
    if params in ("best", "final"):
        params = os.path.join(run_dir, f"{params}.params")
    if not os.path.isfile(params):
        raise UsageError(f"parameters {params}: no such file")
    cfg.data.train_file = cfg.data.valid_file = cfg.data.test_file = None
    cfg.data.data_dir, cfg.data.download = args.data_dir, None
    if args.test_file:
        setattr(cfg.data, f"{args.split}_file", args.test_file)
    elif not args.data_dir:
        raise UsageError("give --test-file or --data-dir")
    cfg.run.context = args.context
    columns = args.columns or run_info["eval_columns"]
    if columns <= 0:
        raise UsageError(f"--columns must be a positive integer, got {columns}")
    world = make_world(args.dist)
    try:
        loss = evaluate_run(cfg, world, params, args.split, vocab, columns)
    finally:
        world.shutdown()
    if world.is_root:
        import math
        print(f"{args.split} loss {loss:.4f}, {args.split} ppl {math.exp(loss):.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def main(argv: Optional[List[str]] = None) -> int:
    from .launcher_env import configure_threads

    configure_threads()  # before MXNet loads
    try:
        args = build_parser().parse_args(argv)
        return {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
    except (UsageError, RanksOutOfSync) as err:
        rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
        where = f"[rank {rank}] " if rank is not None else ""
        print(f"dist-lm: error: {where}{err}", file=sys.stderr, flush=True)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
