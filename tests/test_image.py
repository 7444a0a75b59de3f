"""The CPU image itself (dist-lm:cpu), built from the Dockerfile by launch/build-image and
run with podman: training, Horovod's build, TensorBoard as the manifests start it, what
the image must not hold, and the worker's sshd.

The module's fixture runs launch/build-image, whose layer cache makes it seconds when the
image is up to date (the first build takes a long time). Every container runs with
`--network none` (loopback only) and, like the pods (k8s/), as the image's user with no
capabilities and no privilege escalation. Podman's options come from
launch/containers.conf, as for the build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, data_args, records

TAG = "dist-lm:cpu"
UID = 1000
BUILD_TIMEOUT = 3600  # the first build: a stand-in base, apt, the Python stack, Horovod
# The first test's limit includes the build (setup.cfg's 600 s would cut it short).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 600)]
ENV = dict(os.environ, CONTAINERS_CONF=str(REPO / "launch" / "containers.conf"))
# What the pods' securityContext gives their containers (k8s/base).
CONFINED = ["--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def podman(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def in_image(*cmd, opts=(), timeout=300) -> subprocess.CompletedProcess:
    """cmd in a fresh container of the image, removed afterwards."""
    return podman("run", "--rm", *CONFINED, *opts, TAG, *cmd, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}\n" \
                                 f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """dist-lm:cpu, built (or found up to date) by launch/build-image."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (make setup-tests installs it)")
    info = podman("info", timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {info.stderr.strip()[-300:]}")
    log = tmp_path_factory.mktemp("build") / "build-image.log"
    with open(log, "w") as out:
        done = subprocess.run([REPO / "launch" / "build-image"], stdout=out,
                              stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, env=ENV)
    assert done.returncode == 0, log.read_text()[-5000:]
    return TAG


@pytest.fixture
def container(image):
    """Starts detached containers of the image; removes them at the end of the test."""
    names = []

    def start(*args, opts=()):
        name = f"dist-lm-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        ok(podman("run", "--detach", "--name", name, *CONFINED, *opts, image, *args))
        return name

    yield start
    for name in names:
        podman("rm", "--force", "--time", "0", name)


def poll(cmd, done_when, timeout=90) -> subprocess.CompletedProcess:
    """Runs podman cmd (an exec into a starting container) every second until done_when
    accepts its result or timeout passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        done = podman(*cmd)
        if done_when(done) or time.monotonic() > deadline:
            return done
        time.sleep(1)


def test_build_without_podman_says_what_to_install(tmp_path):
    # A PATH with the script's other tools but no podman.
    for name in ("dirname", "realpath"):
        (tmp_path / name).symlink_to(shutil.which(name))
    done = subprocess.run(["/bin/bash", REPO / "launch" / "build-image"], capture_output=True,
                          text=True, timeout=60, env=dict(ENV, PATH=str(tmp_path)))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "build-image: error: podman is not installed: run 'make setup-tests' "
        "(or apt-get install podman runc mmdebstrap)"]


# --- training ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(image, heldout, tmp_path_factory):
    """A tiny model trained in a container on a read-only copy of the data; the run
    directory lands in a volume owned by the image's user (as fsGroup makes the PVC).
    Returns the host's runs directory and the run's name in it."""
    data = tmp_path_factory.mktemp("data")
    shutil.copy(heldout, data / "heldout.tokens")
    data.chmod(0o755)  # readable by others, as the data volume; pytest makes it 0700
    (data / "heldout.tokens").chmod(0o644)
    runs = tmp_path_factory.mktemp("runs")
    os.chown(runs, UID, UID)
    split = "/data/heldout.tokens"
    done = in_image("dist-lm", "train", *data_args(split, split, split), *TINY,
                    "--epochs", "1", "--max-steps", "12", "--log-interval", "4",
                    "--checkpoint-steps", "5", "--run-dir", "/runs/dist-lm",
                    opts=["--env", "OMP_NUM_THREADS=1", "--volume", f"{data}:/data:ro",
                          "--volume", f"{runs}:/runs"], timeout=600)
    ok(done)
    return runs, "dist-lm"


def test_trains_as_the_image_user_into_a_mounted_run_dir(trained):
    runs, name = trained
    run_dir = runs / name
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints, sorted(p.name for p in run_dir.iterdir())
    assert [r["step"] for r in records(run_dir, "train")] == [4, 8, 12]
    for path in (run_dir / "final.params", run_dir / "metrics.jsonl", checkpoints[0]):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (UID, UID), path


def test_horovod_is_built_with_mxnet_mpi_and_gloo(image):
    report = ok(in_image("horovodrun", "--check-build"))
    for framework in ("MXNet", "MPI", "Gloo"):
        assert re.search(rf"\[X\] {framework}\b", report), report


# --- TensorBoard as the manifests run it ----------------------------------------------

def tensorboard_container() -> dict:
    docs = yaml.safe_load_all((REPO / "k8s" / "base" / "tensorboard.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    return spec


def test_tensorboard_as_deployed_serves_the_runs_loss(trained, container):
    runs, name = trained
    spec = tensorboard_container()
    args = spec["args"]
    (logdir,) = [a.split("=", 1)[1] for a in args if a.startswith("--logdir=")]
    port = next(a.split("=", 1)[1] for a in args if a.startswith("--port="))
    # The run directory mounted where the Deployment's --logdir points, read-only, with a
    # read-only root file system and a /tmp of its own, as the Deployment has them.
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    tb = container(*spec["args"], opts=["--read-only", "--tmpfs", "/tmp",
                                        "--volume", f"{runs / name}:{logdir}:ro",
                                        "--entrypoint", json.dumps(spec["command"])])
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
    fetch = ("import sys, urllib.request; "
             "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    # {run: {tag: ...}}; the first scan of the log dir starts with the server.
    done = poll(["exec", tb, "python", "-c", fetch, url],
                lambda d: d.returncode == 0 and "train/loss" in tags_of(d.stdout))
    assert done.returncode == 0 and "train/loss" in tags_of(done.stdout), \
        (done.stdout, done.stderr, podman("logs", tb).stderr[-3000:])


def tags_of(answer: str) -> set:
    try:
        return {tag for run in json.loads(answer).values() for tag in run}
    except ValueError:
        return set()


# --- what the image holds ----------------------------------------------------------------

FACTS = """
import glob, hashlib, json, os
bundle = open('/etc/ssl/certs/ca-certificates.crt', 'rb').read()
print(json.dumps({
    'pip_conf': [p for p in ('/etc/pip.conf', '/etc/xdg/pip/pip.conf') if os.path.lexists(p)],
    'ssh_keys': glob.glob('/etc/ssh/ssh_host_*') + glob.glob('/home/*/.ssh/*')
                + glob.glob('/root/.ssh/*'),
    'local_cas': os.listdir('/usr/local/share/ca-certificates'),
    'bundle': hashlib.sha256(bundle).hexdigest(),
}))
"""


def pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text,
                          re.S))


def test_image_holds_no_build_configuration_and_no_keys(image):
    facts = json.loads(ok(in_image("python", "-c", FACTS)))
    assert facts["pip_conf"] == [] and facts["ssh_keys"] == [] and facts["local_cas"] == []
    # The CA bundle is the one Debian's ca-certificates makes from the image's own
    # certificates (regenerated here, as root, in a throwaway container) ...
    regenerated = ok(podman("run", "--rm", "--network", "none", "--user", "0", image,
                            "bash", "-c", "update-ca-certificates --fresh >/dev/null && "
                            "sha256sum /etc/ssl/certs/ca-certificates.crt"))
    assert regenerated.split()[0] == facts["bundle"]
    # ... and holds none of the certificates only this machine adds to its own.
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    if extra:
        image_certs = pem_blocks(ok(in_image("cat", "/etc/ssl/certs/ca-certificates.crt")))
        for cert in extra:
            assert not pem_blocks(cert.read_text()) & image_certs, cert


def dockerfile_cmd() -> list[str]:
    (line,) = re.findall(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    return json.loads(line)


def worker_command() -> list[str]:
    """The MPIJob worker's command and args (k8s/base/mpijob.yaml): sshd."""
    docs = yaml.safe_load_all((REPO / "k8s" / "base" / "mpijob.yaml").read_text())
    (job,) = [d for d in docs if d and d["kind"] == "MPIJob"]
    (worker,) = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return worker["command"] + worker["args"]


def test_the_default_command_prints_the_usage(image):
    """`podman run IMAGE` prints launch/image-usage.sh's text and exits 0, where the
    worker's sshd (the MPIJob gives its command) would fail without the job's keys."""
    cmd = json.loads(ok(podman("image", "inspect", "--format", "{{json .Config.Cmd}}", image)))
    assert cmd == dockerfile_cmd()
    usage = subprocess.run(["sh", REPO / "launch" / "image-usage.sh"], capture_output=True,
                           text=True, timeout=30)
    assert ok(in_image()) == usage.stdout and " ".join(worker_command()) in usage.stdout


@pytest.fixture
def ssh_dir(tmp_path):
    """A fresh key pair as the operator mounts it: id_rsa, id_rsa.pub, authorized_keys,
    owned by root and readable by the pod's group (fsGroup 1000)."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    done = subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "",
                           "-C", "dist-lm-test", "-f", keys / "id_rsa"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shutil.copy(keys / "id_rsa.pub", keys / "authorized_keys")
    for path in (keys, *keys.iterdir()):
        os.chown(path, 0, UID)
        path.chmod(0o750 if path.is_dir() else 0o640)
    return keys


def test_worker_sshd_serves_the_mounted_key_on_2222(image, ssh_dir, container):
    mount = ["--volume", f"{ssh_dir}:/home/mpiuser/.ssh:ro"]
    ok(in_image("/usr/sbin/sshd", "-t", "-f", "/etc/ssh/sshd_config.nonroot", opts=mount))
    command = worker_command()  # the worker's sshd, as the MPIJob gives it
    worker = container(*command[1:], opts=[*mount, "--entrypoint", command[0]])
    # The image's ssh client settings give port 2222 and no known_hosts; BatchMode: a key
    # or nothing.
    done = poll(["exec", worker, "ssh", "-o", "BatchMode=yes", "localhost",
                 "id -u && echo $SSH_CONNECTION"], lambda d: d.returncode == 0, timeout=60)
    assert done.returncode == 0, (done.stderr, podman("logs", worker).stderr[-3000:])
    uid, connection = done.stdout.split("\n")[:2]
    assert uid == str(UID) and connection.split()[-1] == "2222", done.stdout
