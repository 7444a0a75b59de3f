"""The `dist-lm` command: one entry point, one subcommand per job.

    dist-lm train [options]           train (one process, or one rank under horovodrun/mpirun)
    dist-lm eval --run-dir DIR ...    loss and perplexity of a run's saved parameters
    dist-lm generate --run-dir DIR    sample text from a trained run
    dist-lm report RUN_DIR...         curves of runs as a PNG, and a summary
    dist-lm bench --train-file F      throughput of the reference loop and of dist-lm
    dist-lm bench-profile --train-file F
                                      where a training step's time goes, by operator class
    dist-lm bench-ceiling --train-file F
                                      the decoder's GEMM rate here, and the job's share of it
    dist-lm bench-scale --dir D       start-up and memory at WikiText-103 size
    dist-lm bench-net --train-file F  the allreduce across simulated nodes, shaped links
    dist-lm chaos [--seed S]          an elastic job on simulated nodes under random faults
    dist-lm data [--data-dir D]       where WikiText-2 is, fetched (sha1-verified) if missing
    dist-lm launch LAUNCHER ARGS...   run mpirun/horovodrun so that the job ends whole

`main(argv)` returns the exit code and is what tests call. Errors a user can cause print
one line and exit 2 on every rank: `dist-lm train: error: ...` for the command line
(named by its subcommand, with "did you mean" for a near miss), `dist-lm: error: ...` for
what the run found (files, data, checkpoints). `dist-lm train` also reads GluonNLP's
word_language_model.py spellings and the underscore spellings of its own options
(gluon_flags.py). A rank whose peer failed or
stopped answering (Horovod shut down, a Gloo timeout or reset connection) prints one line
and exits 4 at once, without the tracebacks MXNet's exit handlers would add.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import difflib
from typing import List, Optional

from . import __version__
from .config import add_config_args, config_from_args
from .errors import (BenchFailed, NonFiniteError, Preempted, RanksOutOfSync, UsageError,
                     exit_code_of)
from .runtime.lifecycle import STOP, exit_now, say
from .runtime.selfreport import exit_record, started

# Horovod's and Gloo's words for "a peer rank failed or stopped answering".
PEER_FAILURE = ("Horovod has been shut down", "HorovodInternalError", "Timed out waiting",
                "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                "gloo::", "Gloo")


class CommandLineError(UsageError):
    """A bad command line: printed as `PROG: error: MESSAGE`, PROG naming the subcommand."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        raise CommandLineError(self.prog, message)


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Appends `(default: X)` to each option's help that has a default and does not
    name it already (the train options name theirs, config.default_help)."""
    for action in parser._actions:
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            continue
        text = action.help or ""
        if "default" not in text:
            action.help = (text + " " if text else "") + "(default: %(default)s)"
    return parser


def unrecognized(parser: argparse.ArgumentParser, extras: List[str]) -> str:
    """argparse's "unrecognized arguments" with the option each unknown one is near."""
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for token in extras:
        name = token.split("=")[0]
        if not name.startswith("--"):
            continue
        dashed = name.replace("_", "-")
        near = [dashed] if dashed in options else \
            difflib.get_close_matches(name, options, n=1, cutoff=0.75)
        hints += [f"{name} -> {near[0]}"] if near else []
    message = "unrecognized arguments: " + " ".join(extras)
    if len(hints) == 1:
        return message + f" (did you mean {hints[0].split(' -> ')[1]}?)"
    return message + (f" (did you mean: {', '.join(hints)}?)" if hints else "")


# Subcommand, module in dist_lm/tools, help: the measurement tools (`add_args` each).
TOOLS = [
    ("bench", "bench", "throughput of the reference loop and of dist-lm"),
    ("bench-profile", "stepprofile",
     "where a training step's time goes, by operator class (MXNet's profiler)"),
    ("bench-ceiling", "ceiling",
     "the decoder's GEMM rate on this machine (MXNet and numpy), and the job's share of it"),
    ("bench-scale", "scale", "start-up and memory on a WikiText-103-size synthetic corpus"),
    ("bench-net", "netbench",
     "the gradient allreduce across simulated nodes with shaped links (root)"),
    ("chaos", "chaos", "an elastic job on simulated nodes under random faults, checked "
                       "against an uninterrupted run (root)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dist-lm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # Each option's help names its default itself (config.default_help): argparse's
    # would be the None that tells an explicit flag apart.
    p = sub.add_parser("train", help="train a language model")
    add_config_args(p)
    p.add_argument("--dist", choices=("auto", "local", "horovod"), default="auto",
                   help="'auto' uses Horovod when started by horovodrun or mpirun "
                        "(default: auto)")

    p = sub.add_parser("eval", help="evaluate a run's saved parameters on a text")
    p.add_argument("--run-dir", required=True, metavar="DIR",
                   help="the run directory of a training run")
    p.add_argument("--params", default="auto", metavar="{best,final,auto,FILE}",
                   help="'best', 'final', 'auto' (best when the run has one, else final), "
                        "or a .params file of the same model")
    p.add_argument("--test-file", metavar="FILE", help="the text to evaluate on")
    p.add_argument("--data-dir", metavar="DIR", help="a dataset directory (with --split)")
    p.add_argument("--split", choices=("valid", "test"), default="test",
                   help="which split of --data-dir to evaluate on, and whose evaluation "
                        "layout (--columns) to use")
    p.add_argument("--columns", type=int, metavar="N",
                   help="global BPTT columns (default: the run's layout for the split, "
                        "--eval-batch-size or --test-batch-size)")
    p.add_argument("--context", default="auto", metavar="DEVICE",
                   help="cpu, gpu, gpu:N or auto")
    p.add_argument("--dist", choices=("auto", "local", "horovod"), default="auto",
                   help="'auto' uses Horovod when started by horovodrun or mpirun")

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run-dir", required=True, metavar="DIR",
                   help="the run directory of a training run")
    p.add_argument("--params", default="auto", metavar="{best,final,auto,FILE}",
                   help="'best', 'final', 'auto' (best when the run has one, else final), "
                        "or a .params file")
    p.add_argument("--words", type=int, default=50, metavar="N",
                   help="how many words to sample")
    p.add_argument("--temperature", type=float, default=1.0, metavar="X",
                   help="below 1 sharpens the distribution, above 1 flattens it")
    p.add_argument("--prompt", metavar="TEXT",
                   help="text to condition on, printed first (words outside the "
                        "vocabulary read as <unk>)")
    p.add_argument("--seed", type=int, default=1, metavar="N", help="sampling seed")
    p.add_argument("--context", default="auto", metavar="DEVICE",
                   help="cpu, gpu, gpu:N or auto")

    p = sub.add_parser("report", help="plot and summarize one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="report.png", metavar="FILE", help="the PNG to write")

    # The measurement tools: each module's add_args fills its subcommand's options.
    for name, module, text in TOOLS:
        p = sub.add_parser(name, help=text)
        importlib.import_module(f".tools.{module}", __package__).add_args(p)

    p = sub.add_parser("data", help="print where a dataset's splits are, fetched "
                                    "(sha1-verified) when missing",
                       description="Prints the directory of a dataset's splits: --data-dir, "
                       "else $DIST_LM_DATA_MIRROR/NAME, else $MXNET_HOME/datasets/NAME "
                       "(MXNET_HOME: ~/.mxnet); fetches them there, sha1-verified, when "
                       "missing.")
    p.add_argument("--dataset", choices=("wikitext-2", "wikitext-103"), default="wikitext-2",
                   help="NAME (default: wikitext-2)")
    p.add_argument("--data-dir", metavar="D", help="fetch into this directory instead")

    # Listed here for --help only: `main` hands `dist-lm launch ...` to cmd_launch first.
    p = sub.add_parser("launch", add_help=False,
                       help="run mpirun or horovodrun so that the job ends whole: a signal "
                            "stops every rank with a checkpoint, a failure ends in one line "
                            "naming the lost rank")
    p.add_argument("launcher", nargs=argparse.REMAINDER, metavar="LAUNCHER ARGS...")
    for name, p in sub.choices.items():
        if name != "launch":
            show_defaults(p)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from .runtime.dist import make_world
    from .training.train import train

    world = make_world(args.dist, cfg.dist.fusion_threshold_mb, cfg.dist.cycle_time_ms)
    try:
        train(cfg, world)
    finally:
        world.shutdown()
    return 0


def load_run(run_dir: str, params: str):
    """A run directory's config, run record, vocabulary and the path of its parameters."""
    from .config import Config
    from .data.text import vocab_from_json
    from .training.rundir import read_json

    if not os.path.isdir(run_dir):
        raise UsageError(f"--run-dir {run_dir}: no such directory")
    cfg = Config.from_dict(read_json(os.path.join(run_dir, "config.json"), "run config"))
    run_info = read_json(os.path.join(run_dir, "run.json"), "run record")
    try:
        with open(os.path.join(run_dir, "vocab.json"), encoding="utf-8") as fh:
            vocab = vocab_from_json(fh.read())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the vocabulary of {run_dir}: {err}") from None
    if params == "auto":  # a run cut short by --max-steps has no best.params yet
        params = "best" if os.path.isfile(os.path.join(run_dir, "best.params")) else "final"
    if params in ("best", "final"):
        params = os.path.join(run_dir, f"{params}.params")
    if not os.path.isfile(params):
        raise UsageError(f"parameters {params}: no such file")
    return cfg, run_info, vocab, params


def cmd_eval(args: argparse.Namespace) -> int:
    from .data.corpus import eval_columns
    from .runtime.dist import make_world
    from .training.evaluate import evaluate_run

    cfg, _, vocab, params = load_run(args.run_dir, args.params)
    cfg.data.train_file = cfg.data.valid_file = cfg.data.test_file = None
    cfg.data.data_dir, cfg.data.download = args.data_dir, None
    if args.test_file:
        setattr(cfg.data, f"{args.split}_file", args.test_file)
    elif not args.data_dir:
        raise UsageError("give --test-file or --data-dir")
    cfg.run.context = args.context
    columns = args.columns or eval_columns(cfg)[args.split]
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


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.dist import LocalWorld
    from .tools.generate import format_text, prompt_as_read, sample_words
    from .training.checkpoint import load_params
    from .model import build_model

    cfg, _, vocab, params = load_run(args.run_dir, args.params)
    ctx = LocalWorld().context(args.context)
    model = build_model(cfg.model, len(vocab))
    load_params(model, params, ctx)
    words = sample_words(model, vocab, ctx, args.words, args.temperature, args.prompt,
                         args.seed)
    print(format_text(prompt_as_read(vocab, args.prompt) + words))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .tools.report import plot, read_metrics, summarize

    runs = {d: read_metrics(d) for d in args.run_dirs}
    try:
        plot(runs, args.out)
    except OSError as err:
        raise UsageError(f"cannot write {args.out}: {err.strerror}") from None
    from .tools.report import fmt

    print(f"{'run':<40} {'steps':>7} {'best val ppl':>13} {'test ppl':>9} "
          f"{'last val ppl':>13} {'tokens/s':>9} {'train loop s':>13}")
    for d, rows in runs.items():
        s = summarize(d, rows)
        last = fmt(s["last_val_ppl"]) + ("*" if s["paused_val_ppl"] is not None else "")
        print(f"{d:<40} {s['steps']:>7} {fmt(s['best_val_ppl']):>13} "
              f"{fmt(s['test_ppl']):>9} {last:>13} {fmt(s['tokens_per_s'], '.0f'):>9} "
              f"{fmt(s['loop_s'], '.1f'):>13}")
    if any(summarize(d, rows)["paused_val_ppl"] is not None for d, rows in runs.items()):
        print("* validated where --max-steps paused the run: information only (the best "
              "and test perplexities come from epoch ends)")
    print(f"wrote {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.bench import run

    return run(args)


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from .tools.stepprofile import run

    return run(args)


def cmd_bench_ceiling(args: argparse.Namespace) -> int:
    from .tools.ceiling import run

    return run(args)


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from .tools.scale import run

    return run(args)


def cmd_bench_net(args: argparse.Namespace) -> int:
    from .tools.netbench import run

    return run(args)


def cmd_chaos(args: argparse.Namespace) -> int:
    from .tools.chaos import run

    return run(args)


def cmd_data(args: argparse.Namespace) -> int:
    from .data.datasets import find_dataset

    print(find_dataset(args.dataset, args.data_dir))
    return 0


def cmd_launch(argv: List[str]) -> int:
    """`dist-lm launch [OPTIONS] LAUNCHER ARGS...`: a fixed-size job under the supervisor
    (runtime/launch.py), or with --host-discovery-script an elastic one
    (runtime/elastic.py). Imports nothing of MXNet or Horovod."""
    from .config import launch_config_from_args, launch_parser

    parser = launch_parser()

    def one_line(message: str) -> None:  # one line, not usage + line
        raise UsageError(message)

    parser.error = one_line
    try:
        args = parser.parse_args(argv)
        cfg = launch_config_from_args(args)
        launcher = args.launcher[1:] if args.launcher[:1] == ["--"] else args.launcher
        if not launcher:
            raise UsageError("no launcher given: dist-lm launch [OPTIONS] mpirun ...")
    except UsageError as err:
        print(f"dist-lm launch: error: {err}", file=sys.stderr)
        return 2
    if cfg.elastic:
        from .runtime.elastic import run_elastic

        return run_elastic(launcher, cfg)
    from .runtime.launch import supervise

    return supervise(launcher, grace_s=cfg.grace)


def main(argv: Optional[List[str]] = None) -> int:
    from .runtime.launcher_env import configure_process

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        # The supervisor of a launcher, not a rank: it must not set this process's
        # threads (the ranks inherit this environment) nor start MPI, and it handles
        # signals itself. Its own arguments are the launcher's.
        return cmd_launch(argv[1:])
    # SIGTERM/SIGINT: a clean stop within two steps while training, else an
    # exit that still unwinds the stack (so open files are flushed and closed).
    STOP.install()
    # Under `dist-lm launch`: this rank's host and pid now, how it ended at the end
    # (runtime/selfreport.py).
    started()
    with exit_record() as outcome:
        try:
            configure_process()  # threads, allocator, MPI waiting: before MXNet and MPI
            args = parse(argv)
            commands = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                        "report": cmd_report, "bench": cmd_bench,
                        "bench-profile": cmd_bench_profile, "bench-ceiling": cmd_bench_ceiling,
                        "bench-scale": cmd_bench_scale, "bench-net": cmd_bench_net,
                        "chaos": cmd_chaos, "data": cmd_data}
            outcome.set(commands[args.command](args))
        except (UsageError, RanksOutOfSync, NonFiniteError, Preempted, BenchFailed) as err:
            rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK"))
            where = f"[rank {rank}] " if rank is not None else ""
            kind = "stopped" if isinstance(err, Preempted) else "error"
            prog = getattr(err, "prog", "dist-lm")
            say(f"{prog}: {kind}: {where}{err}")  # one write: see lifecycle.say
            code = exit_code_of(err) if isinstance(err, UsageError) else err.exit_code
            outcome.set(code, str(err), kind)
        except RuntimeError as err:  # MXNetError, HorovodInternalError: RuntimeErrors
            reason = peer_failure(err)
            if reason is None:
                raise
            exit_now(f"lost a peer rank: {reason}")
            raise  # not reached
    return outcome.code


def parse(argv: List[str]) -> argparse.Namespace:
    """The command line, with `train`'s other spellings read (gluon_flags.py) and each
    unknown option named with the one it is near."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "train" and "-h" not in argv and "--help" not in argv:
        from .gluon_flags import translate

        train = sub.choices["train"]
        at = argv.index("train")
        own = [s for a in train._actions for s in a.option_strings]
        try:
            rest, notes = translate(argv[at + 1:], own)
        except UsageError as err:
            raise CommandLineError(train.prog, str(err)) from None
        argv = argv[:at + 1] + rest
        rank = os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        for note in notes if rank == "0" else ():
            print(f"dist-lm train: word_language_model.py's model options read as {note}",
                  flush=True)
    args, extras = parser.parse_known_args(argv)
    if extras:
        which = sub.choices.get(args.command, parser)
        raise CommandLineError(which.prog, unrecognized(which, extras))
    return args


def peer_failure(err: BaseException):
    """What a Horovod error says about a lost peer, in a line; None for other errors."""
    text = f"{type(err).__name__}: {err}"
    if not any(word in text for word in PEER_FAILURE):
        return None
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), text)
    first = first.removeprefix("MXNetError: ")
    if "Horovod has been shut down" in first:
        return "Horovod shut down after a peer rank failed or stopped answering " \
               "(Horovod's line above names the peer's address)"
    return first[:300]


if __name__ == "__main__":
    sys.exit(main())
