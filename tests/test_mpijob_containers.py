"""The MPIJob's launcher and workers as containers of the real image, across simulated nodes.

launch/sim-cluster makes 4 nodes (network namespaces with their own address; one module
fixture). Each pod of the MPIJob rendered from k8s/base becomes one podman container of
dist-lm:cpu joined to a node's namespace (`--network ns:/run/netns/dlmctr-nodeN`, no
podman network: the only addresses are those sim-cluster made): the workers on
node1..node3, the launcher on node4, so that no rank runs beside mpirun. Each is named
nodeN (--hostname) and finds the others by name (--add-host), as the job's headless
Service lets the pods find each other. Every container gets what the Kubeflow MPI
Operator v0.8.2 gives its pod (kubeflow/mpi-operator, pkg/controller/mpi_job_controller.go)
and what the manifest gives it:

- the operator: the job's fresh ssh key pair at sshAuthMountPath (newSSHAuthSecret,
  sshVolumeItems, setupSSHOnPod); in the launcher /etc/mpi/hostfile and
  discover_hosts.sh (newConfigMap, updateDiscoverHostsInConfigMap, configVolumeItems) and
  the Open MPI environment (ompiEnvVars, newLauncherPodTemplate); K_MPI_JOB_ROLE; the
  launcher starts once every worker is ready (launcherCreationPolicy WaitForWorkersReady);
- the manifest: user, group and fsGroup, no capabilities, no privilege escalation, the
  CPU and memory limits, the volumes (the data read-only, the runs volume owned by the
  image's user as fsGroup makes the PVC, /dev/shm; the launcher has none, as there); the
  workers run the manifest's command (sshd as mpiuser on 2222), the launcher the rendered
  command and args ($(NAME) expanded) with only what must differ here rewritten.

Tests: the job trains across the three worker containers and ends where one process with
the global batch does (< 1e-5); a worker container stopped as Kubernetes stops it, the
worker's preStop hook run as the kubelet runs it, and the launcher container stopped and
started again, each ending within a bound with nothing left running, one last line from
`dist-lm launch`, the newest checkpoint intact, and (the launcher's restart) the run
ending where an uninterrupted one does (< 1e-6).

The module skips, with one line, only where this machine cannot run containers (no podman,
or podman failing its own check: test_image's fixture) or network namespaces
(sim-cluster exits 77).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, TINY, VALID, max_param_diff, sim_cluster
import test_image
import test_multinode
from test_image import BUILD_TIMEOUT, ENV, podman
from test_mpijob_local import drop_option, launcher_argv, operator_discovery, operator_env, tool
from test_multinode import RECIPE, Job, assert_same_run, newest_checkpoint
from test_worker_eviction import STOPPED

# The image fixture may build the image (when this module runs without test_image.py).
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 600)]

PREFIX = "dlmctr"
LABEL = f"dist-lm.test={PREFIX}"
LAUNCHER_NODE = "node4"
WORKERS = ("node1", "node2", "node3")
# Every fault ends the job within this, from the moment it is done.
END_BOUND_S = 60
# The operator's mount of its ConfigMap in the launcher (configMountPath).
MPI_CONFIG = "/etc/mpi"
# Where kubelet's AtomicWriter keeps a Secret's or ConfigMap's files, `..data` pointing
# at it; any name of that form.
PAYLOAD = "..2025_01_01_00_00_00.000000000"


# --- the rendered MPIJob ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rendered() -> dict:
    done = subprocess.run([tool("kubectl"), "kustomize", REPO / "k8s" / "base"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (job,) = [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "MPIJob"]
    return job


def mpijob() -> dict:
    """The MPIJob of k8s/base, rendered with kustomize."""
    return copy.deepcopy(_rendered())


def pod_spec(role: str) -> dict:
    """The pod template's spec of 'Launcher' or 'Worker'."""
    return mpijob()["spec"]["mpiReplicaSpecs"][role]["template"]["spec"]


def container_args(argv: list[str]) -> list[str]:
    """The launcher's command and args (launcher_argv()) with only what must differ here
    rewritten: -np for the 3 workers; one OpenMP thread per rank (the nodes share this
    machine's two cores; given with -x, as the MPIJob gives any threading setting); the
    tiny model and tests/test_multinode.py's recipe (40 steps of 12 columns, a checkpoint
    every 10) in place of the job's model, epochs and global batch. The paths stay as rendered
    (/data/wikitext-2, /runs/...): the volumes are mounted there, and dist-lm is on the
    image's PATH."""
    split = argv.index("train") - 1  # the ranks' command: dist-lm train ...
    mpirun, train = list(argv[:split]), argv[split:]
    assert mpirun[:3] == ["dist-lm", "launch", "mpirun"] and train[:2] == ["dist-lm", "train"]
    mpirun[mpirun.index("-np") + 1] = str(len(WORKERS))
    mpirun[3:3] = ["-x", "OMP_NUM_THREADS=1"]
    for flag in ("--model", "--epochs", "--global-batch-size"):
        train = drop_option(train, flag)
    return mpirun + train + [*TINY[:-2], *RECIPE]  # TINY without --context: 'auto' stays


def option_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- what the operator gives the pods -----------------------------------------------------

def ssh_auth(work: Path) -> dict:
    """A fresh key pair as the operator makes one per job (newSSHAuthSecret: ECDSA P-521,
    the private key as PEM "EC PRIVATE KEY", the public key in authorized_keys form),
    as its Secret volume's items (sshVolumeItems: id_rsa, id_rsa.pub, and the public key
    again as authorized_keys). setupSSHOnPod sets a defaultMode (0600) only for
    /root/.ssh: elsewhere the files have the Secret volume's default, 0644."""
    work.mkdir()
    done = subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "521", "-m", "PEM",
                           "-N", "", "-C", "", "-f", work / "key"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    private, public = (work / "key").read_bytes(), (work / "key.pub").read_bytes()
    return {"id_rsa": (private, 0o644), "id_rsa.pub": (public, 0o644),
            "authorized_keys": (public, 0o644)}


def mpi_config(work: Path, slots: int) -> dict:
    """The launcher's ConfigMap items (configVolumeItems): the hostfile as newConfigMap
    writes it for OpenMPI (`HOST slots=N`, one line per worker, mode 0444) and
    discover_hosts.sh as updateDiscoverHostsInConfigMap does (mode 0555)."""
    work.mkdir()
    hostfile = "".join(f"{node} slots={slots}\n" for node in WORKERS)
    discover = operator_discovery(work / "discover_hosts.sh", list(WORKERS)).read_bytes()
    return {"hostfile": (hostfile.encode(), 0o444), "discover_hosts.sh": (discover, 0o555)}


def atomic_volume(directory: Path, items: dict, gid: int = 0) -> Path:
    """A Secret or ConfigMap volume laid out as kubelet's AtomicWriter writes one: the
    files in a payload directory, `..data` linking to it, each name a link through
    `..data`; owned by root, by the pod's fsGroup (gid) when it has one, which also makes
    the files group-readable. The volume is a tmpfs (mode 1777) and mounted read-only."""
    payload = directory / PAYLOAD
    payload.mkdir(parents=True)
    for name, (content, mode) in items.items():
        path = payload / name
        path.write_bytes(content)
        os.chown(path, 0, gid)
        path.chmod(mode | (0o440 if gid else 0))
        (directory / name).symlink_to(f"..data/{name}")
    (directory / "..data").symlink_to(PAYLOAD)
    os.chown(directory, 0, gid)
    directory.chmod(0o1777)
    return directory


def launcher_env(slots: int) -> dict:
    """What newLauncherPodTemplate adds to the launcher's environment for OpenMPI."""
    env = operator_env(Path(MPI_CONFIG) / "hostfile", slots)
    del env["LD_LIBRARY_PATH"]  # not the operator's: the image's ENV sets it
    # nvidiaDisableEnvVars: the launcher holds no rank, so it sees no GPU.
    return {**env, "K_MPI_JOB_ROLE": "launcher", "NVIDIA_VISIBLE_DEVICES": "",
            "NVIDIA_DRIVER_CAPABILITIES": ""}


def node_addresses(prefix: str) -> dict:
    """Each node's address, from the hosts file sim-cluster writes for its nodes."""
    hosts = Path(f"/etc/netns/{prefix}-node1/hosts").read_text()
    return {name: addr for addr, name in re.findall(r"^(\S+)\s+(node\d+)$", hosts, re.M)}


# --- the pods as containers ---------------------------------------------------------------

def security_options(spec: dict) -> list[str]:
    """podman's options for the pod's and its container's securityContext."""
    pod, (container,) = spec["securityContext"], spec["containers"]
    confined = container["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] != 0
    options = ["--user", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    if "fsGroup" in pod:  # a supplementary group of every process in the pod
        options += ["--group-add", str(pod["fsGroup"])]
    if confined.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    # seccompProfile RuntimeDefault: podman's default profile.
    return options + [f"--cap-drop={cap}" for cap in confined["capabilities"]["drop"]]


def volume_options(spec: dict, claims: dict) -> list[str]:
    """podman's options for the container's volumeMounts: each claim's stand-in directory
    (claims: claimName -> host path), an emptyDir in memory at /dev/shm as its size."""
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    options = []
    for mount in container.get("volumeMounts", []):
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            ro = mount.get("readOnly") or claim.get("readOnly")
            options += ["--volume", f"{claims[claim['claimName']]}:{path}{':ro' if ro else ''}"]
        elif volume.get("emptyDir", {}).get("medium") == "Memory" and path == "/dev/shm":
            options += ["--shm-size", binary_size(volume["emptyDir"]["sizeLimit"])]
        else:
            pytest.fail(f"no stand-in here for volume {volume}")
    return options


def resource_options(spec: dict) -> list[str]:
    """podman's limits for the container's resources.limits: CPU and memory. (The GPUs
    the workers ask for have no stand-in: the CPU image's ranks train on the CPU.)"""
    (container,) = spec["containers"]
    limits = container["resources"]["limits"]
    cpu = str(limits["cpu"])
    cpus = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return ["--cpus", f"{cpus:g}", "--memory", binary_size(limits["memory"])]


def binary_size(quantity: str) -> str:
    """A Kubernetes quantity in binary units (16Gi) as podman writes it (16g)."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()
    return number + unit[0].lower()


class LauncherPod(Job):
    """The launcher's container, attached: its output in files (as the kubelet keeps a
    container's log), its exit code the container's."""

    def __init__(self, name: str, argv: list, log_dir: Path):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out, self.err = log_dir / "stdout", log_dir / "stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(["podman", *map(str, argv)], stdout=out, stderr=err,
                                         env=ENV, start_new_session=True)

    def last_line(self) -> str:
        lines = [x for x in self.err.read_text().splitlines() if x.strip()]
        return lines[-1] if lines else ""


class Pods:
    """One MPIJob's pods as containers on the cluster's nodes: workers node1..node3 and
    launchers on node4, named dlmctr-..., their volumes under `work`. `remove` removes
    every container it started."""

    def __init__(self, cluster, image_tag: str, heldout: Path, work: Path):
        self.cluster, self.image, self.work = cluster, image_tag, work
        self.names: list[str] = []
        job = mpijob()["spec"]
        self.slots = job["slotsPerWorker"]
        self.ssh_path = job["sshAuthMountPath"]
        assert self.ssh_path != "/root/.ssh"  # there the operator's mode is 0600
        self.hosts = node_addresses(cluster.prefix)
        self.claims = {"dist-lm-data": self._data(heldout), "dist-lm-runs": self._runs()}
        self.keys = ssh_auth(work / "keygen")
        self.args = container_args(launcher_argv())
        runs = Path(option_value(self.args, "--run-dir"))
        assert runs.parts[:2] == ("/", "runs"), runs
        self.run_dir = self.claims["dist-lm-runs"].joinpath(*runs.parts[2:])

    def _data(self, heldout: Path) -> Path:
        """The data volume: the splits where --data-dir /data/wikitext-2 finds them, the
        same text as the one-process run's (data_args(VALID, heldout, heldout))."""
        data = self.work / "data"
        (data / "wikitext-2").mkdir(parents=True)
        for split, text in (("train", VALID), ("valid", heldout), ("test", heldout)):
            (data / "wikitext-2" / f"wiki.{split}.tokens").write_bytes(text.read_bytes())
        return data

    def _runs(self) -> Path:
        """The runs volume as fsGroup leaves the PVC: the image's user's, setgid."""
        runs = self.work / "runs"
        runs.mkdir()
        os.chown(runs, 1000, 1000)
        runs.chmod(0o2775)
        return runs

    def _options(self, role: str, node: str, name: str) -> list[str]:
        spec = pod_spec(role)
        gid = spec["securityContext"].get("fsGroup", 0)
        keys = atomic_volume(self.work / f"ssh-{name}", self.keys, gid)
        options = ["--name", name, "--label", LABEL,
                   "--network", f"ns:/run/netns/{self.cluster.prefix}-{node}",
                   "--hostname", node,
                   *[f"--add-host={host}:{addr}" for host, addr in sorted(self.hosts.items())],
                   *security_options(spec), *resource_options(spec),
                   *volume_options(spec, self.claims),
                   "--volume", f"{keys}:{self.ssh_path}:ro",
                   "--env", f"K_MPI_JOB_ROLE={role.lower()}"]
        self.names.append(name)
        return options

    def start_workers(self) -> None:
        """The workers, running the manifest's command (the entrypoint) and args (the
        image's CMD only prints its usage), and the wait for their readiness."""
        (container,) = pod_spec("Worker")["containers"]
        for i, node in enumerate(WORKERS):
            name = f"{PREFIX}-worker-{i}"
            done = podman("run", "--detach", *self._options("Worker", node, name),
                          "--entrypoint", json.dumps(container["command"]), self.image,
                          *container["args"])
            assert done.returncode == 0, done.stderr
        if mpijob()["spec"].get("launcherCreationPolicy") == "WaitForWorkersReady":
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        """Every worker's readinessProbe (a TCP connect to its ssh port) passes, as
        launcherCreationPolicy WaitForWorkersReady waits for before the launcher starts."""
        spec = pod_spec("Worker")
        (container,) = spec["containers"]
        probe = container["readinessProbe"]["tcpSocket"]["port"]
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == probe]
        connect = "import socket, sys; socket.create_connection((sys.argv[1], sys.argv[2]), 2)"
        deadline = time.monotonic() + timeout
        for node in WORKERS:
            while self.cluster("exec", LAUNCHER_NODE, BIN / "python", "-c", connect, node,
                               port, timeout=30).returncode != 0:
                assert time.monotonic() < deadline, \
                    f"{node}'s sshd not ready:\n{self.logs(node)}"
                time.sleep(0.5)

    def launch(self, attempt: int = 1) -> LauncherPod:
        """A launcher container (a new one for each attempt, as the launcher's Job makes a
        new pod for each), with the operator's ConfigMap and environment."""
        spec = pod_spec("Launcher")
        (container,) = spec["containers"]
        name = f"{PREFIX}-launcher-{attempt}"
        options = self._options("Launcher", LAUNCHER_NODE, name)
        config = self.work / f"mpi-{name}"
        atomic_volume(config, mpi_config(self.work / f"config-{name}", self.slots))
        options += ["--volume", f"{config}:{MPI_CONFIG}:ro"]
        options += [f"--env={k}={v}" for k, v in launcher_env(self.slots).items()]
        # The command (expanded, as in self.args) is the ENTRYPOINT; the args the CMD.
        command = self.args[:len(container["command"])]
        assert command[:3] == container["command"][:3]
        return LauncherPod(name, ["run", *options, "--entrypoint", json.dumps(command),
                                  self.image, *self.args[len(command):]],
                           self.work / name)

    def worker(self, node: str) -> str:
        return f"{PREFIX}-worker-{WORKERS.index(node)}"

    def logs(self, node: str) -> str:
        """A worker's log: its sshd's."""
        done = podman("logs", self.worker(node))
        return done.stdout + done.stderr

    def job_processes(self) -> dict:
        """The job's processes left in each running worker (orted, ranks)."""
        left = {}
        for node in WORKERS:
            done = podman("top", self.worker(node), "pid", "args")
            rows = [r for r in done.stdout.splitlines()[1:]
                    if re.search(r"\borted\b|dist-lm train", r)]
            if done.returncode == 0 and rows:
                left[node] = rows
        return left

    def running(self) -> list[str]:
        """Containers of this module still running."""
        done = podman("ps", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    def remove(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "0", name)
        left = podman("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
        assert left.stdout.split() == [], left.stdout


def assert_nothing_left(pods: Pods, since: float, *stopped: str) -> float:
    """Within the bound: no launcher container running, none of the `stopped` workers,
    and no process of the job in the others; the time that took from `since`."""
    deadline = since + END_BOUND_S
    while True:
        running, left = pods.running(), pods.job_processes()
        if not left and not [n for n in running if "launcher" in n or
                             any(n == pods.worker(s) for s in stopped)]:
            return time.monotonic() - since
        assert time.monotonic() < deadline, (running, left)
        time.sleep(0.5)


# --- fixtures -------------------------------------------------------------------------

# dist-lm:cpu, built or found up to date by launch/build-image (skips, with one line, where
# podman cannot run containers).
image = test_image.image
# One process with all 12 columns on this machine: what the job must reproduce.
single = test_multinode.single


@pytest.fixture(scope="module")
def cluster(image, tmp_path_factory):
    with sim_cluster(PREFIX, tmp_path_factory, 4) as sim:
        yield sim


@pytest.fixture
def pods(image, cluster, heldout, tmp_path):
    """This test's job: the workers up and ready, every container removed at the end."""
    job = Pods(cluster, image, heldout, tmp_path)
    try:
        job.start_workers()
        yield job
    finally:
        job.remove()


@pytest.fixture(scope="module")
def uninterrupted(image, cluster, heldout, tmp_path_factory):
    """The job run once to its end: its run dir and each worker's sshd log."""
    job = Pods(cluster, image, heldout, tmp_path_factory.mktemp("uninterrupted"))
    try:
        job.start_workers()
        started = time.monotonic()
        launcher = job.launch()
        assert launcher.wait(300) == 0, launcher.text()[-6000:]
        print(f"\nthe job across 3 worker containers: {time.monotonic() - started:.1f}s "
              f"from the launcher's start")
        return job.run_dir, {node: job.logs(node) for node in WORKERS}
    finally:
        job.remove()


# --- the job ----------------------------------------------------------------------------

def test_the_job_trains_across_the_worker_containers_as_one_process(uninterrupted, single):
    run_dir, sshd_logs = uninterrupted
    assert json.loads((run_dir / "run.json").read_text())["ranks"] == 3
    # Rank 0 writes the TensorBoard events, whose file name holds its host's name.
    assert [p.name.split(".")[4] for p in run_dir.glob("events.out.tfevents.*")] == ["node1"]
    # The launcher (node4) reached every worker's sshd as mpiuser with the job's key.
    launcher_addr = node_addresses(PREFIX)[LAUNCHER_NODE]
    for node, log in sshd_logs.items():
        assert re.search(rf"Accepted publickey for mpiuser from {re.escape(launcher_addr)} ",
                         log), f"{node}:\n{log}"
    for path in (run_dir / "final.params", *run_dir.glob("checkpoints/step-*")):
        assert path.stat().st_uid == 1000, path
    diff = max_param_diff(single / "final.params", run_dir / "final.params")
    print(f"\n3 worker containers x 4 columns vs 1 process x 12, 40 steps: max |diff| {diff:.2e}")
    assert diff < 1e-5


# --- faults -----------------------------------------------------------------------------

def test_a_worker_container_stopped_ends_the_job_naming_it(pods):
    launcher = pods.launch()
    launcher.wait_for_checkpoint(pods.run_dir, 10)
    # As the kubelet stops a container: SIGTERM to its PID 1 (sshd), SIGKILL after 10 s.
    stop = time.monotonic()
    done = podman("stop", "--time", "10", pods.worker("node3"), timeout=60)
    assert done.returncode == 0, done.stderr
    code = launcher.wait(END_BOUND_S)
    ended = time.monotonic() - stop
    gone = assert_nothing_left(pods, stop, "node3")
    assert code != 0
    line = launcher.summary("node3")
    print(f"\nworker container on node3 stopped: the launcher ended {ended:.1f}s, nothing "
          f"of the job ran {gone:.1f}s after\n{line}")
    _, step = newest_checkpoint(pods.run_dir)
    assert step >= 10


def test_the_workers_prestop_hook_stops_every_rank_with_a_checkpoint(pods):
    (container,) = pod_spec("Worker")["containers"]
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    launcher = pods.launch()
    launcher.wait_for_checkpoint(pods.run_dir, 10)
    # As the kubelet deletes the pod: the hook in the container, then its stop.
    evicted = time.monotonic()
    hook = podman("exec", pods.worker("node3"), *prestop, timeout=END_BOUND_S)
    hook_s = time.monotonic() - evicted
    assert hook.returncode == 0, hook.stdout + hook.stderr
    done = podman("stop", "--time", "10", pods.worker("node3"), timeout=60)
    assert done.returncode == 0, done.stderr
    code = launcher.wait(END_BOUND_S)
    ended = time.monotonic() - evicted
    gone = assert_nothing_left(pods, evicted, "node3")
    assert code == 143, launcher.text()[-4000:]
    steps = STOPPED.findall(launcher.err.read_text())
    assert sorted(r for r, _ in steps) == ["0", "1", "2"] and len({s for _, s in steps}) == 1, \
        launcher.text()[-4000:]
    _, step = newest_checkpoint(pods.run_dir)
    assert 10 < step == int(steps[0][1]) < 40
    line = launcher.last_line()
    assert line == f"dist-lm: stopped: job stopped: [rank 2 on node3] stopped by a signal " \
                   f"at step {step}, checkpoint written", line
    print(f"\npreStop of the worker on node3: every rank stopped at step {step} with a "
          f"checkpoint; the hook returned {hook_s:.1f}s, the launcher ended {ended:.1f}s "
          f"(exit {code}), nothing of the job ran {gone:.1f}s after\n{line}")


def test_the_launcher_container_stopped_and_started_again_ends_where_the_run_ends(
        uninterrupted, pods):
    first = pods.launch()
    first.wait_for_checkpoint(pods.run_dir, 10)
    # The launcher pod's terminationGracePeriodSeconds, as `podman stop --time`.
    grace = pod_spec("Launcher")["terminationGracePeriodSeconds"]
    stop = time.monotonic()
    done = podman("stop", "--time", str(grace), first.name, timeout=grace + 30)
    assert done.returncode == 0, done.stderr
    code = first.wait(END_BOUND_S)
    ended = time.monotonic() - stop
    gone = assert_nothing_left(pods, stop)
    assert code == 143, first.text()[-4000:]
    steps = STOPPED.findall(first.err.read_text())
    assert sorted(r for r, _ in steps) == ["0", "1", "2"] and len({s for _, s in steps}) == 1, \
        first.text()[-4000:]
    _, step = newest_checkpoint(pods.run_dir)
    assert 10 < step == int(steps[0][1]) < 40
    line = first.last_line()
    assert re.fullmatch(rf"dist-lm: stopped: job stopped: \[rank \d on node[123]\] stopped "
                        rf"by a signal at step {step}, checkpoint written", line), line
    print(f"\nlauncher container stopped: every rank stopped at step {step} with a "
          f"checkpoint, the launcher ended {ended:.1f}s, nothing of the job ran {gone:.1f}s "
          f"after\n{line}")

    again = pods.launch(attempt=2)  # the same command: --resume auto
    assert again.wait(300) == 0, again.text()[-6000:]
    run_dir, _ = uninterrupted
    print(f"the second launcher resumed from step {step}: max |diff| to the uninterrupted "
          f"run {assert_same_run(run_dir, pods.run_dir):.1e}")
