#!/usr/bin/env bash
# Builds the project's environment in $VENV (default .venv), idempotently:
#   1. OpenMPI, a C++ toolchain and the ssh client (mpirun and horovodrun reach other
#      hosts over ssh) from Debian packages, when missing; with FOR_TESTS=1 (`make test`)
#      also openssh-server and iproute2, for launch/sim-cluster's simulated nodes, and
#      podman, runc and mmdebstrap, for launch/build-image and tests/test_image.py;
#   2. the pinned Python stack from launch/constraints.txt and dist-lm itself (editable);
#   3. Horovod built from source with MXNet, Gloo and MPI (+ NCCL for VARIANT=gpu),
#      checked with `horovodrun --check-build`.
# Each of 2 and 3 leaves a stamp keyed on its inputs, so a re-run with nothing changed
# returns in about a second.
#
#   VARIANT=cpu (default)  mxnet==1.9.1, Horovod with CPU ops over Gloo/MPI
#   VARIANT=gpu            mxnet-cu112==1.9.1, Horovod with HOROVOD_GPU_OPERATIONS=NCCL
#                          (needs CUDA 11.2+ with nvcc and NCCL on the machine; see README)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
VENV=${VENV:-$root/.venv}
VARIANT=${VARIANT:-cpu}
FOR_TESTS=${FOR_TESTS:-0}
PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
constraints=$here/constraints.txt

log() { printf 'setup-env: %s\n' "$*" >&2; }
die() { printf 'setup-env: error: %s\n' "$*" >&2; exit 1; }

case $VARIANT in
  cpu) extras=cpu,test ;;
  gpu) extras=gpu,test ;;
  *) die "VARIANT must be cpu or gpu, not '$VARIANT'" ;;
esac

digest() { cat "$@" | sha256sum | cut -c1-16; }
python_key="$VARIANT-$(digest "$constraints" "$root/setup.cfg" "$root/pyproject.toml")"
horovod_key="$VARIANT-$HOROVOD_VERSION-$(grep -E '^(mxnet|mxnet-cu112|numpy)==' "$constraints" | digest)"
stamp_python=$VENV/.dist-lm-python.stamp
stamp_horovod=$VENV/.dist-lm-horovod.stamp

packages=(libopenmpi-dev openmpi-bin cmake g++ make openssh-client)
# openssh-server only for its sshd binary (launch/sim-cluster starts its own sshds in
# network namespaces); note that on a host booted with systemd the package also enables
# and starts the host's ssh service, which is why only the tests ask for it.
[ "$FOR_TESTS" = 1 ] && packages+=(openssh-server iproute2)
# podman to build and run the image (with runc: launch/containers.conf says why), and
# mmdebstrap for launch/build-image's stand-in base where no registry is reachable.
[ "$FOR_TESTS" = 1 ] && packages+=(podman runc mmdebstrap)
have_system_tools() {
  command -v mpirun >/dev/null && command -v mpicc >/dev/null &&
    command -v cmake >/dev/null && command -v g++ >/dev/null && command -v ssh >/dev/null &&
    { [ "$FOR_TESTS" != 1 ] ||
      { [ -x /usr/sbin/sshd ] && { command -v ip >/dev/null || [ -x /usr/sbin/ip ]; } &&
        command -v podman >/dev/null && [ -x /usr/sbin/runc ] &&
        command -v mmdebstrap >/dev/null; }; }
}

if have_system_tools && [ -x "$VENV/bin/python" ] &&
   [ "$(cat "$stamp_python" 2>/dev/null)" = "$python_key" ] &&
   [ "$(cat "$stamp_horovod" 2>/dev/null)" = "$horovod_key" ]; then
  exit 0
fi

# 1. System packages.
if ! have_system_tools; then
  log "installing ${packages[*]} (apt-get)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "system tools are missing and this user cannot run apt-get; install ${packages[*]}"
    sudo=sudo
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
  have_system_tools || die "apt-get finished but some of ${packages[*]} are still missing"
fi

# 2. Python stack.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ "$(cat "$stamp_python" 2>/dev/null)" != "$python_key" ]; then
  log "installing the pinned $VARIANT stack"
  "${pip[@]}" install -c "$constraints" wheel setuptools
  # numpy and Cython first: gluonnlp 0.10.0 builds from its sdist against them.
  "${pip[@]}" install -c "$constraints" numpy Cython
  "${pip[@]}" install -c "$constraints" -e "${root}[$extras]"
  echo "$python_key" >"$stamp_python"
fi

# 3. Horovod, built against this venv's MXNet.
if [ "$(cat "$stamp_horovod" 2>/dev/null)" != "$horovod_key" ]; then
  log "building horovod==$HOROVOD_VERSION ($VARIANT; takes a few minutes)"
  flags=(HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
         HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1)
  [ "$VARIANT" = gpu ] && flags+=(HOROVOD_GPU_OPERATIONS=NCCL)
  "${pip[@]}" uninstall -y horovod >/dev/null 2>&1 || true
  env "${flags[@]}" "${pip[@]}" install -c "$constraints" --no-build-isolation --no-cache-dir \
    "horovod==$HOROVOD_VERSION"
  report=$("$VENV/bin/horovodrun" --check-build)
  for want in MXNet Gloo MPI; do
    grep -qE "\[X\] $want" <<<"$report" || die "horovod was built without $want:
$report"
  done
  echo "$horovod_key" >"$stamp_horovod"
  log "horovod ready: $(tr '\n' ' ' <<<"$report" | tr -s ' ')"
fi
