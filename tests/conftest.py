"""Shared test helpers: paths to the WikiText-2 splits, a bounded CLI runner, and
launch/sim-cluster's simulated clusters."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_lm.data.datasets import dataset_cache, find_dataset
from dist_lm.errors import UsageError
from dist_lm.runtime.procs import kill_session

REPO = Path(__file__).resolve().parents[1]
# Where a download would come from, for every dist-lm the tests start: a closed port on
# this machine (the discard port), so that a test never fetches anything.
os.environ["MXNET_GLUON_REPO"] = "http://127.0.0.1:9/"


def _wikitext2():
    """WikiText-2 as dist-lm's lookup finds it, never fetched: $DIST_LM_DATA_DIR (`make
    test DATA_DIR=...`), else $DIST_LM_DATA_MIRROR/wikitext-2, else
    ~/.mxnet/datasets/wikitext-2. Also the line that stops the run when it is nowhere."""
    try:
        found = find_dataset("wikitext-2", os.environ.get("DIST_LM_DATA_DIR") or None,
                             fetch=False)
        return Path(found), None
    except UsageError as err:
        return Path(dataset_cache("wikitext-2")), f"dist-lm tests: {err}"


WIKITEXT2, NO_WIKITEXT2 = _wikitext2()
VALID = WIKITEXT2 / "wiki.valid.tokens"
TEST = WIKITEXT2 / "wiki.test.tokens"
BIN = Path(sys.executable).parent


def data_args(train=VALID, valid=TEST, test=TEST):
    """The offline split: train on WikiText-2 valid, validate and test on its test split."""
    return ["--train-file", str(train), "--valid-file", str(valid), "--test-file", str(test)]


TINY = ["--model", "custom", "--embed-size", "32", "--hidden-size", "32", "--num-layers", "1",
        "--context", "cpu"]


def run(cmd, timeout=300, env=None, cwd=None):
    """Runs cmd in its own session; a timeout kills the whole session (ranks too) and fails."""
    full_env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    full_env.update(env or {})
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd or REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {cmd}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def dist_lm(*args, **kwargs):
    return run([BIN / "dist-lm", *args], **kwargs)


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """One corpus cache for the suite (every dist-lm the tests start inherits it), so that
    nothing is written beside the shared WikiText-2 files."""
    path = tmp_path_factory.mktemp("corpus-cache")
    os.environ["DIST_LM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def heldout(tmp_path_factory):
    """The first 400 lines (about 25k tokens) of the WikiText-2 test split: held-out text
    that keeps each evaluation pass of the suite to a second or two."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.tokens"
    with open(TEST, encoding="utf-8") as fh:
        path.write_text("".join(fh.readlines()[:400]), encoding="utf-8")
    return path


def pytest_configure(config):
    """Most tests read WikiText-2: without it the run stops here, with one line."""
    if NO_WIKITEXT2 and not config.option.help:
        raise pytest.UsageError(NO_WIKITEXT2)


@pytest.fixture(scope="session")
def session_environment(corpus_cache):
    """os.environ as the session set it up."""
    return dict(os.environ)


@pytest.fixture(autouse=True)
def environment_restored(session_environment):
    """Every test runs in, and leaves, the session's os.environ. `dist-lm`'s main(), run
    in-process by some tests and module fixtures, sets OMP_NUM_THREADS to the cores per
    rank (launcher_env.configure_threads) as a rank must; left in this process, every
    later `mpirun -x OMP_NUM_THREADS` gave each of its ranks all the cores, and 4 ranks on
    2 cores ran up to 8 times slower."""
    def restore():
        if os.environ != session_environment:
            os.environ.clear()
            os.environ.update(session_environment)

    restore()  # a module fixture's leak
    yield
    restore()  # the test's own


@pytest.fixture(scope="session")
def shared_data():
    """The directory of the WikiText-2 splits the tests read."""
    return WIKITEXT2


def launcher(controller: str, np: int, *cmd):
    """The command that runs cmd as np Horovod ranks on this machine."""
    if controller == "gloo":
        return [BIN / "horovodrun", "-np", np, "-H", f"localhost:{np}", "--gloo", *cmd]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return ["mpirun", *root, "-np", np, "-H", f"localhost:{np}", "-bind-to", "none",
            "-x", "PATH", "-x", "OMP_NUM_THREADS", *cmd]


def params_of(path):
    import mxnet as mx

    return {k: v.asnumpy() for k, v in mx.nd.load(str(path)).items()}


def max_param_diff(a, b):
    import numpy as np

    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    return max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)


def parse_config(*argv):
    """The Config `dist-lm train ARGV` would train with."""
    from dist_lm.cli import build_parser
    from dist_lm.config import config_from_args

    return config_from_args(build_parser().parse_args(["train", *map(str, argv)]))


def records(run_dir, kind):
    """A run's metrics.jsonl records of one kind ('train', 'valid', ...)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
            .splitlines()]
    return [r for r in rows if r["kind"] == kind]


def start(cmd, log):
    """cmd in its own session, output to the file log (for tests that signal it)."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    return subprocess.Popen([str(c) for c in cmd], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until_asleep_in_c(proc, timeout=60):
    """Until proc's main thread sleeps in C (a signal that comes while it still runs
    Python is handled there at once: no stop grace is needed, nothing is tested)."""
    wchan = Path(f"/proc/{proc.pid}/task/{proc.pid}/wchan")
    deadline = time.monotonic() + timeout
    while "sleep" not in wchan.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def wait_for(log, pattern, proc, timeout=240):
    """Until the log of a process from `start` matches pattern; fails (ending its whole
    session) if the process exits first or the pattern does not come within timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, Path(log).read_text()):
            return
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {pattern!r}:\n{Path(log).read_text()}")
        time.sleep(0.1)
    kill_session(proc.pid)
    pytest.fail(f"no {pattern!r} within {timeout}s")


# --- launch/sim-cluster -------------------------------------------------------------------------

SIM = REPO / "launch" / "sim-cluster"
NO_NETNS = 77  # the script's exit code when this machine cannot create network namespaces


def alive(pid: int) -> bool:
    """Running: a zombie (its parent, init here, reaps it in a while) counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+[ZX]", status, re.M)


class Sim:
    """One cluster: launch/sim-cluster with this prefix and state directory."""

    def __init__(self, prefix: str, state: Path):
        self.prefix, self.state = prefix, state
        self.env = {"SIM_PREFIX": prefix, "SIM_STATE_DIR": str(state)}
        self.ssh_config = state / "ssh_config"

    def __call__(self, *args, timeout=120):
        return run([SIM, *args], env=self.env, timeout=timeout)

    def ok(self, *args, timeout=120):
        done = self(*args, timeout=timeout)
        assert done.returncode == 0, f"sim-cluster {args} exited {done.returncode}\n" \
                                     f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        return done

    def on(self, node, *cmd, timeout=120):
        return self.ok("exec", node, *cmd, timeout=timeout)

    def up(self, n: int):
        done = self("up", n)
        if done.returncode == NO_NETNS:
            pytest.skip(done.stderr.strip().splitlines()[-1])
        assert done.returncode == 0, f"up {n}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done

    def namespaces(self):
        listed = run(["ip", "netns", "list"]).stdout.split("\n")
        return [line.split()[0] for line in listed
                if re.match(rf"{self.prefix}-(br|node\d+)\b", line)]

    def etc_dirs(self):
        return sorted(Path("/etc/netns").glob(f"{self.prefix}-*"))

    def sshd_pids(self):
        return {p.parent.name: int(p.read_text()) for p in self.state.glob("node*/sshd.pid")}

    def assert_gone(self, pids):
        assert self.namespaces() == []
        assert self.etc_dirs() == []
        assert not self.state.exists()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids.values() if alive(p)], pids


@contextlib.contextmanager
def sim_cluster(prefix: str, tmp_path_factory, nodes: int):
    """A cluster of `nodes` nodes for a module's tests, torn down whatever happens."""
    sim = Sim(prefix, tmp_path_factory.mktemp(prefix) / "state")
    try:
        sim.up(nodes)
        yield sim
    finally:
        sim("down")
