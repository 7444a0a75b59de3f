"""`dist-lm bench-net`: the gradient allreduce across simulated nodes with shaped links.

It builds a simulated cluster on this machine with `launch/sim-cluster` (network
namespaces, one sshd per node; needs root), limits every node's egress with `tc tbf` to
each --rates value, and runs `dist-lm bench`'s worker (`standard_lstm_lm_200`, 10 columns
per rank, bptt 35) as N ranks on N nodes, launched from node1 the way users launch
across hosts: `mpirun -H node1:1,...` over ssh (with the launchers' ring allreduce),
and `horovodrun --gloo -H ...`. For each
(rate, N, controller, fp16 compression) it prints the step time, the allreduce alone
(the same gradient buffers reduced back to back with nothing else running), the
allreduce's share of the step (1 - step time without it / step time), and the ring
model's prediction for the allreduce:

    2 (N - 1) / N x bytes / bandwidth

(each rank sends and receives that much in a ring allreduce; latency is left out). All
nodes share this machine's cores, so the compute part of a step is slower than on real
nodes; the allreduce alone is what the model predicts. It is a benchmark, not a test.
The cluster is torn down at the end, also on an error or a signal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

from ..errors import UsageError
from ..runtime.procs import kill_session
from .simnodes import SIM, sim_cluster

# launch/sim-cluster of the checkout this package runs from (dist_lm/tools/ -> the root).
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-file", required=True, help="text to train on")
    p.add_argument("--rates", default="10gbit,1gbit",
                   help="comma-separated link rates (tc syntax: 10gbit, 1gbit, 100mbit)")
    p.add_argument("--nodes", default="2,3", help="comma-separated node (rank) counts")
    p.add_argument("--controllers", default="mpi,gloo")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cache-dir", help="the corpus cache (default: a new temporary one)")


def bits_per_s(rate: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
    if not m:
        raise UsageError(f"bench-net: a rate is a number and kbit, mbit or gbit, not "
                         f"'{rate}'")
    return float(m.group(1)) * UNITS[m.group(2)]


def ring_ms(nodes: int, megabytes: float, rate: str) -> float:
    """The ring allreduce's transfer time: 2 (N-1)/N x bytes over the link rate."""
    return 2 * (nodes - 1) / nodes * megabytes * 1e6 * 8 / bits_per_s(rate) * 1e3


class Cluster:
    """A sim-cluster of its own prefix and state directory, always torn down."""

    def __init__(self, nodes: int):
        self.state = tempfile.mkdtemp(prefix="dist-lm-bench-net-")
        self.env = dict(os.environ, SIM_PREFIX="dlbench", SIM_STATE_DIR=self.state)
        self.nodes = nodes

    def sim(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sim_cluster("bench-net", self.env, *args, check=check)

    def __enter__(self) -> "Cluster":
        if not SIM.is_file():
            raise UsageError(f"bench-net: no {SIM}: it runs from a checkout of the "
                             f"repository, which holds launch/sim-cluster")
        try:
            self.sim("up", str(self.nodes))
        except BaseException:  # a half-made cluster (or Ctrl-C during it) is torn down too
            self.sim("down", check=False)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.sim("down", check=False)


def worker_command(controller: str, nodes: int, args: argparse.Namespace,
                   fp16: bool) -> List[str]:
    bin_dir = os.path.dirname(sys.executable)
    hosts = ",".join(f"node{i}:1" for i in range(1, nodes + 1))
    inner = [sys.executable, "-m", "dist_lm.tools.bench", "--worker", "hvd2-mpi",
             "--train-file", args.train_file, "--cache-dir", args.cache_dir,
             "--global-batch-size", str(10 * nodes),
             "--steps", str(args.steps), "--warmup", str(args.warmup)]
    inner += ["--fp16-allreduce"] if fp16 else []
    if controller == "gloo":
        return [os.path.join(bin_dir, "horovodrun"), "--gloo", "-np", str(nodes), "-H", hosts,
                "--network-interface", "eth0", "--disable-cache", *inner]
    # The launchers' own mpirun settings (launch/train-workstation.sh, the MPIJob): the
    # ring allreduce, which Open MPI's default loses to by 2x on slow links.
    return ["mpirun", "--allow-run-as-root", "-np", str(nodes), "-H", hosts,
            "-bind-to", "none", "--mca", "btl_tcp_if_include", "eth0",
            "--mca", "oob_tcp_if_include", "eth0",
            "--mca", "coll_tuned_use_dynamic_rules", "1",
            "--mca", "coll_tuned_allreduce_algorithm", "4",
            "-x", "PATH", "-x", "OMP_NUM_THREADS", *inner]


def measure(cluster: Cluster, controller: str, nodes: int, args, fp16: bool) -> Dict:
    env = dict(cluster.env, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen([str(SIM), "exec", "node1",
                             *worker_command(controller, nodes, args, fp16)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)  # mpirun or horovodrun and every rank it started
        out, err = proc.communicate()
    lines = [x for x in out.splitlines() if "BENCH " in x]
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"bench-net: {controller} on {nodes} nodes failed: {last}")
    return json.loads(lines[-1].split("BENCH ", 1)[1])


def run(args: argparse.Namespace) -> int:
    rates = [r for r in args.rates.split(",") if r]
    for rate in rates:
        bits_per_s(rate)
    try:
        counts = sorted({int(n) for n in args.nodes.split(",") if n})
    except ValueError:
        raise UsageError("bench-net: --nodes is a comma-separated list of numbers") from None
    controllers = [c for c in args.controllers.split(",") if c]
    if not counts or counts[0] < 2 or set(controllers) - {"mpi", "gloo"} or not controllers:
        raise UsageError("bench-net: --nodes needs counts of at least 2 and --controllers "
                         "mpi and/or gloo")
    if not os.path.isfile(args.train_file):
        raise UsageError(f"bench-net: --train-file {args.train_file} does not exist")
    from ..data.cache import CorpusCache

    # The corpus cache, built here once: never beside the (possibly shared) data.
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="dist-lm-bench-net-cache-")
    cache = CorpusCache(args.cache_dir)
    cache.ids(args.train_file, cache.vocab(args.train_file, 1, None))
    results = []
    print(f"{'link':<7} {'nodes':>5} {'ctrl':<5} {'fp16':<4} {'grad MB':>7} {'step ms':>8} "
          f"{'AR ms':>7} {'ring model ms':>13} {'AR/model':>8} {'AR share':>8}", flush=True)
    with Cluster(counts[-1]) as cluster:
        for rate in rates:
            cluster.sim("shape", rate)
            for nodes in counts:
                for controller in controllers:
                    for fp16 in (False, True):
                        r = measure(cluster, controller, nodes, args, fp16)
                        model = ring_ms(nodes, r["grad_mb"], rate)
                        row = dict(rate=rate, nodes=nodes, controller=controller, fp16=fp16,
                                   grad_mb=r["grad_mb"], step_ms=r["step_ms"],
                                   allreduce_ms=r["allreduce_alone_ms"], model_ms=model,
                                   share=r["allreduce_share"])
                        results.append(row)
                        print(f"{rate:<7} {nodes:>5} {controller:<5} "
                              f"{'yes' if fp16 else 'no':<4} {r['grad_mb']:7.1f} "
                              f"{r['step_ms']:8.1f} {r['allreduce_alone_ms']:7.1f} "
                              f"{model:13.1f} {r['allreduce_alone_ms'] / model:8.2f} "
                              f"{r['allreduce_share'] * 100:7.1f}%", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    return 0
