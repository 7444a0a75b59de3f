"""`dist-lm chaos`: an elastic job on simulated nodes, faults drawn at random while it
trains, and checks that it came through whole.

It builds a cluster with `launch/sim-cluster` (N nodes, default 4; its own SIM_PREFIX,
SIM_NET and SIM_STATE_DIR when set; needs root), puts the run directory on a small file
system of its own (ext4 on a loop device, so that it can be filled and its writes
throttled; a tmpfs where loop devices are missing), and runs the elastic job from node1
as the elastic MPIJob's launcher runs it (`dist-lm launch --host-discovery-script ...
mpirun ... dist-lm train ... --resume auto --global-batch-size 12`; or `horovodrun
--gloo`), a tiny model on WikiText-2's valid split, the steps slowed to --step-s by a
sitecustomize the ranks load (from outside the product), so that the run outlasts the
faults. The discovery script lists the nodes whose sshd accepts a connection.

Faults, drawn from --seed (the sequence is printed and written to the work directory's
schedule.json; `--replay FILE` runs a written sequence again), one every --duration /
--faults seconds on average, each once training is seen going again:

  partition NODE           its switch port down (sim-cluster partition)
  heal NODE                a partitioned node back
  kill-rank NODE           SIGKILL to the rank there
  prestop NODE             the worker pod's preStop hook (k8s/base/mpijob.yaml), run in
                           the node as the kubelet runs it: its ranks stop with a
                           checkpoint and the hook waits for them to be gone
  sshd-stop NODE           the node's sshd stopped (running sessions stay)
  sshd-start NODE          and started again
  kill-launcher            SIGKILL to mpirun / horovodrun
  kill-supervisor          SIGKILL to `dist-lm launch`, started again with its command
  disk-full                the run directory's file system filled from a step or two
                           before a checkpoint until --hold-s later
  slow-storage             rank 0's writes to it throttled (blkio, --slow-bps) for
                           --slow-hold-s, over a checkpoint write
  return-during-restart    a node partitioned, and healed as soon as the supervisor is
                           seen restarting the world

At most N - --min-np - 1 nodes are down at once (partitioned or without sshd), so that
a node sitting out its cooldown leaves --min-np; node1, which holds the supervisor (the
launcher pod), is never cut off nor given the worker's preStop hook. After the last
fault every node is healed and the job runs to its end. Then it checks, prints and exits
non-zero if any check fails:

- the job finished (exit 0, final.params);
- its final parameters are within --tolerance of one uninterrupted process with the same
  global batch (run first, without faults; with dropout this needs dropout masks that do
  not depend on the rank count);
- every checkpoint left verifies (training/checkpoint.verify: every digest);
- metrics.jsonl logs no step twice and misses none of the uninterrupted run's;
- no process is left on any node;
and per fault the restarts, the steps lost and the seconds to training again
(tools/chaos_checks.py), in a table by kind. Everything is torn down at the end, also on
an error or a signal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import UsageError
from ..runtime import launcher_env
from ..runtime.procs import kill_session
from .chaos_checks import (Check, Fault, Line, Summary, attribute, metrics_gaps,
                           read_metrics, table, train_steps)
from .simnodes import NO_NETNS, SIM, sim_cluster

ROOT = Path(__file__).resolve().parents[2]   # the checkout: launch/, k8s/
MPIJOB = ROOT / "k8s" / "base" / "mpijob.yaml"
KINDS = ("partition", "heal", "kill-rank", "prestop", "sshd-stop", "sshd-start",
         "kill-launcher", "kill-supervisor", "disk-full", "slow-storage",
         "return-during-restart")
GLOBAL_BATCH = 12
LOG_INTERVAL = 5
SLOW_STEPS = """
import os, time
if os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("HOROVOD_RANK"):
    import dist_lm.training.train as train
    _step = train.train_step
    _delay = float(os.environ.get("DIST_LM_CHAOS_STEP_S", "0.2"))

    def train_step(run, states):  # slowed: the run outlasts the faults
        time.sleep(_delay)
        return _step(run, states)

    train.train_step = train_step
"""
DISCOVERY = """#!/bin/bash
# The nodes whose sshd accepts a connection now: the operator's list of running workers.
for n in {nodes}; do
  timeout 1 bash -c "exec 3<>/dev/tcp/$n/22" 2>/dev/null && echo "$n"
done
true
"""


class NoCluster(UsageError):
    """This machine cannot make simulated nodes (sim-cluster's exit 77)."""

    exit_code = NO_NETNS


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default: 4)")
    p.add_argument("--duration", type=float, default=300.0,
                   help="seconds of faults; the run trains about that long (default: 300)")
    p.add_argument("--faults", type=int, default=5, help="faults to draw (default: 5)")
    p.add_argument("--seed", type=int, help="draws the faults (default: from the clock; "
                                            "printed)")
    p.add_argument("--replay", metavar="FILE",
                   help="run the faults of a schedule.json written by an earlier campaign")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated fault kinds to draw from (default: all)")
    p.add_argument("--controller", choices=("mpi", "gloo"), default="mpi",
                   help="mpirun (the elastic MPIJob's) or horovodrun --gloo (default: mpi)")
    p.add_argument("--dropout", type=float,
                   help="the model's dropout (default: the recipe's)")
    p.add_argument("--step-s", type=float, default=0.2,
                   help="seconds each step is slowed by (default: 0.2)")
    p.add_argument("--checkpoint-steps", type=int, default=25, help="(default: 25)")
    p.add_argument("--min-np", type=int, help="(default: half the nodes)")
    p.add_argument("--hold-s", type=float, default=6.0,
                   help="how long disk-full keeps the file system full (default: 6)")
    p.add_argument("--slow-bps", type=int, default=512 * 1024,
                   help="slow-storage's write rate, bytes/s (default: 524288)")
    p.add_argument("--slow-hold-s", type=float, default=15.0, help="(default: 15)")
    p.add_argument("--tolerance", type=float, default=1e-5,
                   help="final parameters against the uninterrupted run (default: 1e-5)")
    p.add_argument("--train-file", help="default: WikiText-2's valid split, as the tests "
                                        "find it ($DIST_LM_DATA_MIRROR, never fetched)")
    p.add_argument("--work-dir", help="logs, run directory, reference run (default: a new "
                                      "temporary directory, kept)")


# --- the schedule ---------------------------------------------------------------------

def draw(seed: int, count: int, nodes: int, min_np: int, kinds: List[str]) -> List[dict]:
    """count faults from seed: a kind among those that apply (heal needs a partitioned
    node, sshd-start a stopped sshd, cutting a node off room under the down limit), a
    node, and the wait after it as a fraction of the mean gap."""
    rng = random.Random(seed)
    names = [f"node{i}" for i in range(1, nodes + 1)]
    max_down = max(0, nodes - min_np - 1)
    down: Dict[str, str] = {}   # node -> "partition" or "sshd"
    out = []
    for _ in range(count):
        up = [n for n in names if n not in down]
        cuttable = [n for n in up if n != "node1"] if len(down) < max_down else []
        applies = {
            "partition": cuttable, "return-during-restart": cuttable, "sshd-stop": cuttable,
            "heal": sorted(n for n, how in down.items() if how == "partition"),
            "sshd-start": sorted(n for n, how in down.items() if how == "sshd"),
            # Not node1's: the hook signals every `dist-lm train` command line in its
            # node, and node1's hold the supervisor's and mpirun's (the launcher pod,
            # which has no such hook).
            "kill-rank": up, "prestop": [n for n in up if n != "node1"],
        }
        options = [k for k in kinds if applies.get(k, [None])]
        if not options:
            break
        kind = rng.choice(options)
        node = rng.choice(applies[kind]) if kind in applies else None
        if kind == "partition":
            down[node] = "partition"
        elif kind == "sshd-stop":
            down[node] = "sshd"
        elif kind in ("heal", "sshd-start"):
            del down[node]
        out.append({"kind": kind, "node": node, "gap": round(rng.uniform(0.5, 1.5), 3)})
    return out


def schedule_from(args: argparse.Namespace, min_np: int) -> dict:
    if args.replay:
        try:
            with open(args.replay, encoding="utf-8") as fh:
                sched = json.load(fh)
            faults = sched["faults"]
            assert all(f["kind"] in KINDS and isinstance(f["gap"], (int, float))
                       for f in faults)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
            raise UsageError(f"chaos: --replay {args.replay}: not a schedule.json of a "
                             f"campaign ({type(err).__name__}: {err})") from None
        if sched.get("nodes") != args.nodes:
            raise UsageError(f"chaos: --replay {args.replay} is for --nodes "
                             f"{sched.get('nodes')}, not {args.nodes}")
        return sched
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise UsageError(f"chaos: --kinds takes {', '.join(KINDS)}; not "
                         f"{', '.join(sorted(unknown)) or 'nothing'}")
    return {"seed": seed, "nodes": args.nodes, "min_np": min_np, "kinds": kinds,
            "faults": draw(seed, args.faults, args.nodes, min_np, kinds)}


# --- the cluster and the run directory's storage ------------------------------------------

class Cluster:
    """launch/sim-cluster with the caller's SIM_* settings (else prefix dlchaos)."""

    def __init__(self, nodes: int):
        self.nodes = nodes
        self.prefix = os.environ.get("SIM_PREFIX", "dlchaos")
        self.state = Path(os.environ.get("SIM_STATE_DIR",
                                         f"/tmp/dist-lm-sim/{self.prefix}"))
        self.env = dict(os.environ, SIM_PREFIX=self.prefix, SIM_STATE_DIR=str(self.state))

    def sim(self, *args: str, check: bool = True, timeout: float = 300) -> \
            subprocess.CompletedProcess:
        return sim_cluster("chaos", self.env, *args, check=check, timeout=timeout,
                           no_netns=NoCluster)

    def up(self) -> None:
        if not SIM.is_file():
            raise UsageError(f"chaos: no {SIM}: it runs from a checkout of the repository")
        try:
            self.sim("up", str(self.nodes))
        except BaseException:
            self.sim("down", check=False)
            raise

    def down(self) -> None:
        self.sim("down", check=False)

    def namespace(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def sshd_pid(self, node: str) -> Optional[int]:
        try:
            return int((self.state / node / "sshd.pid").read_text())
        except (OSError, ValueError):
            return None

    def processes(self) -> List[Tuple[str, int, str]]:
        """(node, pid, command line) of every live process on the nodes but their sshd."""
        daemons = {self.sshd_pid(f"node{i}") for i in range(1, self.nodes + 1)}
        found = []
        for i in range(1, self.nodes + 1):
            node = f"node{i}"
            pids = subprocess.run(["ip", "netns", "pids", self.namespace(node)],
                                  capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                if pid in daemons:
                    continue
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                if not re.search(r"^State:\s+[ZX]", status, re.M):
                    found.append((node, pid, cmd.decode(errors="replace").strip()))
        return found

    def stop_sshd(self, node: str) -> None:
        pid = self.sshd_pid(node)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def start_sshd(self, node: str) -> None:
        """As sim-cluster's up starts it: inside the node, its config and log."""
        self.sim("exec", node, "/usr/sbin/sshd", "-f", str(self.state / node / "sshd_config"),
                 "-E", str(self.state / node / "sshd.log"))


class Storage:
    """The run directory's own file system: ext4 on a loop device (fillable, and its
    writes throttled through a blkio cgroup), else a tmpfs (fillable only). Mounted
    before the nodes exist: each node's mount namespace is a copy made at `up`."""

    SIZE_MB = 128

    def __init__(self, work: Path):
        self.mount = work / "runfs"
        self.image = work / "runfs.img"
        self.loop: Optional[str] = None
        self.kind = "a plain directory"
        self.no_fill: Optional[str] = None
        self.no_throttle: Optional[str] = None
        self.cgroup: Optional[Path] = None
        self.filler = self.mount / "chaos-filler"

    def __enter__(self) -> "Storage":
        self.mount.mkdir(parents=True, exist_ok=True)
        why = self._loop()
        if why:
            self.no_throttle = f"no loop device file system ({why})"
            if self._run("mount", "-t", "tmpfs", "-o", f"size={self.SIZE_MB}m", "tmpfs",
                         str(self.mount)):
                self.kind = f"tmpfs of {self.SIZE_MB} MB"
            else:
                self.no_fill = "cannot mount a file system of its own here"
        else:
            self.no_throttle = self._cgroup()
        return self

    def _run(self, *cmd: str) -> Optional[str]:
        """cmd's stdout, or None when it failed."""
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    def _loop(self) -> Optional[str]:
        """Mounts ext4 on a loop device; why not, else None."""
        with open(self.image, "wb") as fh:
            fh.truncate(self.SIZE_MB << 20)
        loop = self._run("losetup", "-f", "--show", str(self.image))
        if not loop:
            return "losetup failed"
        self.loop = loop.strip()
        # -m 0: no blocks reserved for root (the ranks run as root and would use them).
        if self._run("mkfs.ext4", "-q", "-m", "0", self.loop) is None or \
                self._run("mount", self.loop, str(self.mount)) is None:
            return "mkfs.ext4 or mount failed"
        self.kind = f"ext4 of {self.SIZE_MB} MB on {self.loop}"
        return None

    def _cgroup(self) -> Optional[str]:
        """A blkio cgroup (cgroup v1) that limits writes to the loop device; why not."""
        base = Path("/sys/fs/cgroup/blkio")
        if not (base / "blkio.throttle.write_bps_device").exists():
            return "no cgroup v1 blkio controller (tmpfs and cgroup v2 without the io " \
                   "controller cannot throttle a file system's writes)"
        majmin = self._run("lsblk", "-dno", "MAJ:MIN", self.loop or "")
        if not majmin:
            return "lsblk cannot name the loop device"
        cgroup = base / f"dist-lm-chaos-{os.getpid()}"
        try:
            cgroup.mkdir()
            self.cgroup = cgroup
            self.majmin = majmin.strip()
        except OSError as err:
            return f"cannot make a blkio cgroup: {err.strerror}"
        return None

    def fill(self) -> int:
        """Fills the file system to its last block; the bytes taken."""
        taken = 0
        with open(self.filler, "wb") as fh:
            chunk = 64 << 20
            while chunk >= 4096:
                try:
                    os.posix_fallocate(fh.fileno(), taken, chunk)
                    taken += chunk
                except OSError:
                    chunk //= 2
        return taken

    def free(self) -> None:
        try:
            self.filler.unlink()
        except FileNotFoundError:
            pass

    def throttle(self, pid: int, bps: int) -> None:
        (self.cgroup / "blkio.throttle.write_bps_device").write_text(f"{self.majmin} {bps}")
        (self.cgroup / "cgroup.procs").write_text(str(pid))

    def unthrottle(self, pid: int) -> None:
        try:
            (self.cgroup.parent / "cgroup.procs").write_text(str(pid))
        except OSError:   # gone meanwhile
            pass

    def __exit__(self, *exc) -> None:
        self.free()
        if self.cgroup is not None:
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                self.unthrottle(int(pid))
            try:
                self.cgroup.rmdir()
            except OSError:
                pass
        if self.kind != "a plain directory":
            if self._run("umount", str(self.mount)) is None:
                self._run("umount", "-l", str(self.mount))
        if self.loop:
            self._run("losetup", "-d", self.loop)
        try:
            self.image.unlink()
        except FileNotFoundError:
            pass


# --- the job ----------------------------------------------------------------------------

class Job:
    """The supervisor on node1, its output stamped line by line as it arrives; started
    again (`restart`) with the same command, its output appended."""

    def __init__(self, cluster: Cluster, argv: List[str], env: Dict[str, str], logs: Path):
        self.cluster, self.argv, self.env, self.logs = cluster, argv, env, logs
        self.lines: List[Line] = []
        self.lock = threading.Lock()
        self.incarnations = 0
        self.start()

    def start(self) -> None:
        self.incarnations += 1
        self.proc = subprocess.Popen([str(SIM), "exec", "node1", *self.argv], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                        for stream, name in ((self.proc.stdout, "out"),
                                             (self.proc.stderr, "err"))]
        for t in self.readers:
            t.start()

    def _read(self, stream, name: str) -> None:
        with open(self.logs / f"std{name}", "ab") as sink:
            for raw in iter(stream.readline, b""):
                sink.write(raw)
                sink.flush()
                with self.lock:
                    self.lines.append(Line(time.time(), name, raw.decode("utf-8", "replace")
                                           .rstrip("\n")))
        stream.close()

    def since(self, t: float) -> List[Line]:
        with self.lock:
            return [x for x in self.lines if x.time > t]

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the supervisor alone (its launcher runs in a session of its own)."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for t in self.readers:
            t.join(timeout=10)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self.readers:
            t.join(timeout=10)
        return code


def launch_argv(args, discovery: Path, min_np: int, train: List[str]) -> List[str]:
    """The elastic launcher's command: k8s/overlays/elastic's wrapper options and mpirun
    flags, with short cooldowns and change windows so that a node's return shows within
    the campaign."""
    bin_dir = os.path.dirname(sys.executable)
    wrapper = [os.path.join(bin_dir, "dist-lm"), "launch", "--min-np", str(min_np),
               "--max-np", str(args.nodes), "--slots-per-host", "1",
               "--host-discovery-script", str(discovery),
               "--blacklist-cooldown-range", "5", "10", "--elastic-timeout", "120",
               "--grow-interval", "10", "--discovery-interval", "1", "--reset-limit", "100"]
    ranks = ["dist-lm", "train", *train, "--resume", "auto"]
    if args.controller == "gloo":
        return [*wrapper, os.path.join(bin_dir, "horovodrun"), "--gloo", "--disable-cache",
                "--network-interface", "eth0", *ranks]
    # No rank runs beside mpirun here (every rank is on a node, started over ssh), so the
    # ranks see only what -x names: the numerics variables the uninterrupted run had go
    # with them. Without them the nodes' OpenBLAS picked other kernels than the reference
    # (OPENBLAS_CORETYPE), 1e-7 apart per step, grown to 1.6e-3 over 9,000 steps.
    numerics = sorted(k for k in launcher_env.numerics_env() if k != "OMP_NUM_THREADS")
    mpirun = ["mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
              "-bind-to", "none", "-map-by", "slot", "-x", "OMP_NUM_THREADS=1",
              *[a for name in numerics for a in ("-x", name)],
              *(["-x", "LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else []),
              "-x", "PATH", "-x", "PYTHONUNBUFFERED=1", "-x", "PYTHONPATH",
              "-x", "DIST_LM_CHAOS_STEP_S",
              "-mca", "pml", "ob1", "-mca", "btl", "^openib",
              "-mca", "coll_tuned_use_dynamic_rules", "1",
              "-mca", "coll_tuned_allreduce_algorithm", "4",
              "-mca", "oob_tcp_keepalive_time", "10", "-mca", "oob_tcp_keepalive_intvl", "5",
              "-mca", "oob_tcp_keepalive_probes", "3", "-mca", "orte_default_hostfile", "none"]
    return [*wrapper, *mpirun, *ranks]


def train_argv(args, data: Dict[str, str], run_dir: Path, cache: Path,
               max_steps: int) -> List[str]:
    """The tests' recipe (lr 1, the clip active at every step: float noise is not
    amplified), the tiny model, G = 12 columns."""
    return ["--train-file", data["train"], "--valid-file", data["heldout"],
            "--test-file", data["heldout"], "--cache-dir", str(cache),
            "--model", "custom", "--embed-size", "32", "--hidden-size", "32",
            "--num-layers", "1", "--context", "cpu",
            *(["--dropout", f"{args.dropout:g}"] if args.dropout is not None else []),
            "--lr", "1", "--clip", "0.1", "--max-steps", str(max_steps),
            "--log-interval", str(LOG_INTERVAL), "--epochs", "1000",
            "--global-batch-size", str(GLOBAL_BATCH),
            "--checkpoint-steps", str(args.checkpoint_steps), "--run-dir", str(run_dir)]


def prestop_script() -> str:
    """The worker container's preStop command (k8s/base/mpijob.yaml), `sh -c SCRIPT`."""
    import yaml

    docs = list(yaml.safe_load_all(MPIJOB.read_text()))
    (job,) = [d for d in docs if d and d.get("kind") == "MPIJob"]
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    command = worker["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"], command
    return command[2]


# --- the faults ---------------------------------------------------------------------------

class Campaign:
    def __init__(self, args, cluster: Cluster, storage: Storage, job: Job, run_dir: Path,
                 say):
        self.args, self.cluster, self.storage, self.job = args, cluster, storage, job
        self.run_dir, self.say = run_dir, say
        self.down: Dict[str, str] = {}

    def ranks(self) -> List[Tuple[str, int, int]]:
        """(node, pid, rank) of the job's training processes that run now."""
        out = []
        for node, pid, cmd in self.cluster.processes():
            if "dist-lm train" not in cmd or str(self.run_dir) not in cmd:
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(e.split(b"=", 1)[1]) for e in env
                         if e.startswith((b"OMPI_COMM_WORLD_RANK=", b"HOROVOD_RANK="))), None)
            if rank is not None:
                out.append((node, pid, rank))
        return sorted(out, key=lambda r: r[2])

    def wait_for_ranks(self, timeout: float = 60) -> List[Tuple[str, int, int]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job.running():
            ranks = self.ranks()
            if ranks:
                return ranks
            time.sleep(0.2)
        return []

    def latest_step(self) -> Optional[int]:
        steps = train_steps(self.job.since(0), {})
        return steps[-1][1] if steps else None

    def inject(self, kind: str, node: Optional[str]) -> Tuple[Optional[str], str]:
        """Runs one fault; (the node it hit, what was seen)."""
        c = self.cluster
        if kind == "partition":
            c.sim("partition", node)
            self.down[node] = "partition"
            return node, ""
        if kind == "heal":
            c.sim("heal", node)
            self.down.pop(node, None)
            return node, ""
        if kind == "sshd-stop":
            c.stop_sshd(node)
            self.down[node] = "sshd"
            return node, ""
        if kind == "sshd-start":
            c.start_sshd(node)
            self.down.pop(node, None)
            return node, ""
        if kind in ("kill-rank", "prestop"):
            ranks = self.wait_for_ranks()
            if not ranks:
                return node, "no rank running: not injected"
            nodes = [n for n, _, _ in ranks]
            hit = node if node in nodes else nodes[0]
            if kind == "kill-rank":
                pid, rank = next((p, r) for n, p, r in ranks if n == hit)
                os.kill(pid, signal.SIGKILL)
                return hit, f"rank {rank}"
            started = time.monotonic()
            done = c.sim("exec", hit, "/bin/sh", "-c", prestop_script(), check=False,
                         timeout=90)
            return hit, f"hook returned {time.monotonic() - started:.1f}s (exit " \
                        f"{done.returncode})"
        if kind == "kill-launcher":
            ranks = self.wait_for_ranks()
            launchers = [(pid, cmd) for n, pid, cmd in c.processes()
                         if n == "node1" and parent(pid) == self.job.proc.pid]
            if not ranks or not launchers:
                return "node1", "no launcher running: not injected"
            for pid, _ in launchers:
                os.kill(pid, signal.SIGKILL)
            return "node1", os.path.basename(launchers[0][1].split()[0])
        if kind == "kill-supervisor":
            self.job.kill()
            self.job.start()
            return "node1", f"started again (incarnation {self.job.incarnations})"
        if kind == "disk-full":
            return None, self.disk_full()
        if kind == "slow-storage":
            return None, self.slow_storage()
        if kind == "return-during-restart":
            c.sim("partition", node)
            cut = time.time()
            restarting = re.compile(r"dist-lm: (elastic: (restart \d+|waiting for hosts|the "
                                    r"world failed)|\S+ did not end within)")
            deadline = time.monotonic() + 120
            seen = None
            while time.monotonic() < deadline and self.job.running() and seen is None:
                seen = next((x for x in self.job.since(cut)
                             if x.stream == "err" and restarting.search(x.text)), None)
                time.sleep(0.05)
            c.sim("heal", node)
            return node, (f"healed {time.time() - cut:.1f}s after the cut, at "
                          f"'{seen.text[:60]}...'" if seen else "no restart seen in 120s; "
                          "healed")
        raise AssertionError(kind)

    def disk_full(self) -> str:
        if self.storage.no_fill:
            return f"skipped: {self.storage.no_fill}"
        k = self.args.checkpoint_steps
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.job.running():
            step = self.latest_step()
            if step is not None and (step // k + 1) * k - step <= 2 * LOG_INTERVAL:
                break
            time.sleep(0.05)
        step = self.latest_step()
        taken = self.storage.fill()
        time.sleep(self.args.hold_s)
        self.storage.free()
        return f"full from step ~{step} for {self.args.hold_s:g}s ({taken >> 20} MB filler)"

    def slow_storage(self) -> str:
        if self.storage.no_throttle:
            return f"skipped: {self.storage.no_throttle}"
        ranks = self.wait_for_ranks()
        if not ranks or ranks[0][2] != 0:
            return "no rank 0 running: not injected"
        node, pid, _ = ranks[0]
        self.storage.throttle(pid, self.args.slow_bps)
        time.sleep(self.args.slow_hold_s)
        self.storage.unthrottle(pid)
        return f"rank 0 on {node} at {self.args.slow_bps} B/s for {self.args.slow_hold_s:g}s"

    def heal_all(self) -> None:
        for node, how in sorted(self.down.items()):
            if how == "partition":
                self.cluster.sim("heal", node)
            else:
                self.cluster.start_sshd(node)
            what = "healed" if how == "partition" else "sshd started"
            self.say(f"chaos: end of faults: {node} {what}")
        self.down.clear()

    def training_after(self, t: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job.running():
            if train_steps(self.job.since(t), {}):
                return True
            time.sleep(0.2)
        return False


def parent(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- the run ------------------------------------------------------------------------------

def find_data(args, work: Path) -> Dict[str, str]:
    from ..data.datasets import find_dataset

    train = args.train_file
    if train is None:
        train = os.path.join(find_dataset("wikitext-2", None, fetch=False), "wiki.valid.tokens")
        test = os.path.join(os.path.dirname(train), "wiki.test.tokens")
    else:
        test = train
    for path in (train, test):
        if not os.path.isfile(path):
            raise UsageError(f"chaos: {path}: no such file")
    # 400 lines (~25k tokens) held out: each evaluation takes a second or two.
    heldout = work / "heldout.tokens"
    with open(test, encoding="utf-8") as fh:
        heldout.write_text("".join(fh.readlines()[:400]), encoding="utf-8")
    return {"train": train, "heldout": str(heldout)}


def run_reference(train: List[str], env: Dict[str, str], say) -> None:
    """One process, the same command, no faults, no slowed steps."""
    bin_dir = os.path.dirname(sys.executable)
    started = time.monotonic()
    proc = subprocess.Popen([os.path.join(bin_dir, "dist-lm"), "train", *train], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        raise UsageError("chaos: the uninterrupted run took over an hour") from None
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        raise UsageError(f"chaos: the uninterrupted run failed (exit {proc.returncode}): "
                         f"{last}")
    say(f"chaos: uninterrupted run (1 process) done in {time.monotonic() - started:.0f}s")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 2 or args.nodes > GLOBAL_BATCH:
        raise UsageError(f"chaos: --nodes takes 2 to {GLOBAL_BATCH}, not {args.nodes}")
    min_np = args.min_np or max(1, args.nodes // 2)
    if not 1 <= min_np <= args.nodes:
        raise UsageError(f"chaos: --min-np takes 1 to --nodes {args.nodes}")
    if args.duration <= 0 or args.faults < 0 or args.step_s < 0:
        raise UsageError("chaos: --duration, --faults and --step-s take positive values")
    if os.geteuid() != 0:
        raise NoCluster("chaos: simulated nodes need root (network namespaces, mounts)")
    sched = schedule_from(args, min_np)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dist-lm-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "schedule.json").write_text(json.dumps(sched, indent=1) + "\n")

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"chaos: seed {sched.get('seed')}, {len(sched['faults'])} faults over "
        f"~{args.duration:g}s on {args.nodes} nodes; replay: --replay "
        f"{work / 'schedule.json'}")
    for i, f in enumerate(sched["faults"], 1):
        say(f"chaos:   {i:>2}. {f['kind']}{' ' + f['node'] if f['node'] else ''} "
            f"(then {f['gap']:g} x the mean gap)")
    data = find_data(args, work)
    max_steps = max(2 * args.checkpoint_steps, int(args.duration / max(args.step_s, 0.01)))
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    run_reference(train_argv(args, data, reference, work / "cache", max_steps), env, say)

    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_STEPS)
    discovery = work / "discover.sh"
    discovery.write_text(DISCOVERY.format(nodes=" ".join(f"node{i}"
                                                         for i in range(1, args.nodes + 1))))
    discovery.chmod(0o755)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for name in ("stdout", "stderr"):
        (logs / name).write_bytes(b"")
    cluster = Cluster(args.nodes)
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    storage = Storage(work)
    job = None
    try:
        with storage:
            run_dir = storage.mount / "run"
            say(f"chaos: run directory on {storage.kind}"
                + (f"; slow-storage skipped: {storage.no_throttle}" if storage.no_throttle
                   else "") + (f"; disk-full skipped: {storage.no_fill}" if storage.no_fill
                               else ""))
            cluster.up()
            say(f"chaos: {args.nodes} nodes up ({cluster.prefix}); logs in {logs}")
            job_env = dict(env, SIM_PREFIX=cluster.prefix, SIM_STATE_DIR=str(cluster.state),
                           DIST_LM_CHAOS_STEP_S=f"{args.step_s:g}",
                           PYTHONPATH=os.pathsep.join([str(site), *filter(None, [
                               os.environ.get("PYTHONPATH")])]))
            argv = launch_argv(args, discovery, min_np,
                               train_argv(args, data, run_dir, work / "cache", max_steps))
            (work / "command").write_text(shlex.join(argv) + "\n")
            job = Job(cluster, argv, job_env, logs)
            campaign = Campaign(args, cluster, storage, job, run_dir, say)
            faults = campaign_loop(args, sched, campaign, job, say)
            end = time.time()   # the last fault's window ends here: then all is healed
            campaign.heal_all()
            code = job.wait(args.duration + 900)
            if code is None:
                say("chaos: the job did not end in time; ending it")
                job.kill()
                code = -9
            summary = check(args, cluster, job, code, run_dir, reference, faults, end)
            copy_run(run_dir, work / "run")
        say(table(summary, faults[0].time if faults else end))
        say(f"chaos: {'all checks passed' if summary.ok else 'FAILED'}; seed "
            f"{sched.get('seed')}; schedule {work / 'schedule.json'}; work directory {work}")
        return 0 if summary.ok else 1
    except KeyboardInterrupt:
        say(f"chaos: stopped by a signal; schedule {work / 'schedule.json'}")
        return 128 + (stop[0] if stop else signal.SIGINT)
    finally:
        if job is not None and job.running():
            job.kill()
        cluster.down()
        for s, handler in previous.items():
            signal.signal(s, handler)


def campaign_loop(args, sched: dict, campaign: Campaign, job: Job, say) -> List[Fault]:
    faults: List[Fault] = []
    mean_gap = args.duration / max(1, len(sched["faults"]))
    if not campaign.training_after(0, 600):
        say("chaos: the job never trained; no fault injected")
        return faults
    for i, f in enumerate(sched["faults"], 1):
        if not job.running():
            say(f"chaos: the job ended (exit {job.proc.returncode}) before fault {i}")
            break
        t = time.time()
        node, note = campaign.inject(f["kind"], f["node"])
        fault = Fault(f["kind"], node, t, note)
        faults.append(fault)
        say(f"chaos: {time.strftime('%H:%M:%S')} fault {i}: {f['kind']}"
            f"{' ' + node if node else ''}{'; ' + note if note else ''}")
        # The gap, then until rank 0 trains again: the next fault hits a training job.
        deadline = time.monotonic() + f["gap"] * mean_gap
        while time.monotonic() < deadline and job.running():
            time.sleep(0.2)
        trains = campaign.training_after(time.time(), 300)
        fault.survived = job.running() or job.proc.returncode == 0
        if not trains:
            say(f"chaos: no training within 300s after fault {i}"
                f"{'' if job.running() else f'; the job ended (exit {job.proc.returncode})'}")
    return faults


def check(args, cluster: Cluster, job: Job, code: int, run_dir: Path, reference: Path,
          faults: List[Fault], end: float) -> Summary:
    from ..training.checkpoint import list_checkpoints, verify

    summary = Summary(faults)
    add = summary.checks.append
    final = run_dir / "final.params"
    add(Check("job finished", code == 0 and final.is_file(),
              f"exit {code} after {job.incarnations} supervisor start(s)"
              + ("" if final.is_file() else "; no final.params")))
    if final.is_file():
        diff = max_param_diff(reference / "final.params", final)
        add(Check("parameters", diff <= args.tolerance,
                  f"max |diff| to the uninterrupted run {diff:.2e} (bound "
                  f"{args.tolerance:g})"))
    else:
        add(Check("parameters", False, "no final.params to compare"))
    bad, checkpoints = [], list_checkpoints(str(run_dir / "checkpoints"))
    for path in checkpoints:
        try:
            verify(path)
        except UsageError as err:
            bad.append(str(err))
    add(Check("checkpoints", not bad and bool(checkpoints),
              f"{len(checkpoints)} present, {len(checkpoints) - len(bad)} verify"
              + "".join(f"; {b}" for b in bad)))
    ref_rows = read_metrics(str(reference / "metrics.jsonl"))
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    twice, missing = metrics_gaps(rows, [int(r["step"]) for r in ref_rows
                                         if r.get("kind") == "train"])
    add(Check("metrics.jsonl", not twice and not missing,
              f"{sum(r.get('kind') == 'train' for r in rows)} train rows; logged twice: "
              f"{twice[:10] or 'none'}; missing: {missing[:10] or 'none'}"
              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")))
    deadline = time.monotonic() + 60
    while (left := cluster.processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    add(Check("no process left", not left,
              "none on any node" if not left else
              "; ".join(f"{n} pid {p}: {c[:80]}" for n, p, c in left[:5])))
    for _, pid, _ in left:   # on our own nodes: the next campaign starts clean
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    step_of = {(int(r["epoch"]), int(r["batch"])): int(r["step"])
               for r in ref_rows if r.get("kind") == "train"}
    attribute(faults, job.since(0), [r for r in rows if r.get("kind") == "world"], step_of,
              end)
    if faults and code != 0 and all(f.survived for f in faults):
        faults[-1].survived = False   # the job failed after the last one
    return summary


def max_param_diff(a: Path, b: Path) -> float:
    import mxnet as mx
    import numpy as np

    pa, pb = mx.nd.load(str(a)), mx.nd.load(str(b))
    if pa.keys() != pb.keys():
        return float("inf")
    return max(float(np.abs(pa[k].asnumpy() - pb[k].asnumpy()).max()) for k in pa)


def copy_run(run_dir: Path, to: Path) -> None:
    """The run directory off the campaign's file system before it goes."""
    shutil.rmtree(to, ignore_errors=True)
    if run_dir.is_dir():
        shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".lock"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dist-lm chaos", description=__doc__.split("\n\n")[0])
    add_args(p)
    try:
        return run(p.parse_args(argv))
    except UsageError as err:
        print(f"dist-lm: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
