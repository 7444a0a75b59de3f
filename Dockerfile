# syntax=docker/dockerfile:1
# dist-lm's training image, for the launcher and the workers of a Kubeflow MPI Operator
# MPIJob (kubeflow.org/v2beta1), and for the job's TensorBoard (k8s/, docs/cluster.md).
#
#   docker build -t REGISTRY/dist-lm:TAG-gpu .                         # CUDA 11.2, NCCL
#   docker build --build-arg VARIANT=cpu -t REGISTRY/dist-lm:TAG-cpu .  # CPU only
#
# Both variants: Python 3.11 in /opt/venv with the pinned stack (launch/constraints.txt),
# Horovod 0.28.1 built from source with MXNet, MPI and Gloo (+ NCCL on GPU) and checked
# with `horovodrun --check-build`, OpenMPI, and sshd set up to run as the non-root user
# mpiuser (uid 1000), as the MPI Operator expects for non-root jobs: port 2222, PidFile
# and host key in the user's reach, StrictModes off. The image holds no keys: the
# operator mounts a fresh key pair per job into /home/mpiuser/.ssh (sshAuthMountPath).
# Run without a command, it prints how to use it (launch/image-usage.sh).
#
# GPU generations: the stock mxnet-cu112==1.9.1 wheel carries kernels for sm_50..sm_86
# and no PTX, so it runs on Maxwell through Ampere (V100, T4, A100, A10, A40; Ada's
# sm_89 can run the sm_86 kernels, untested) but cannot run on Hopper (H100/H200,
# sm_90): there is no kernel for it and no PTX to compile one from. For Hopper, build
# MXNet 1.9.1 from source with a toolkit that knows sm_90 (CUDA 11.8 or newer; 12.x is
# untested with MXNet 1.9.1) and `cmake -DUSE_CUDA=ON -DUSE_CUDNN=ON -DUSE_NCCL=ON
# -DMXNET_CUDA_ARCH="8.0;9.0" ..`, install its python/ package instead of mxnet-cu112,
# and build Horovod against it; or schedule on A100/A10/V100/T4-class nodes.
ARG VARIANT=gpu
# The GPU base: CUDA 11.2 + cuDNN 8, what mxnet-cu112 is built for; the devel flavour
# brings nvcc and NCCL's headers, which Horovod's NCCL build needs. Override it to use a
# mirror of the same image.
ARG CUDA_IMAGE=nvidia/cuda:11.2.2-cudnn8-devel-ubuntu20.04

# --- GPU base, with Python 3.11 from the deadsnakes PPA (Ubuntu 20.04 ships 3.8; the
# pinned stack needs 3.10+).
FROM ${CUDA_IMAGE} AS base-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Everything CUDA is in the image already, so the CUDA apt repositories are dropped: they
# are not needed, and an old image's repository key may have been rotated since.
# Distribution packages follow the base image's release; pinning each one's version
# would break the build whenever the archive moves on.
# hadolint ignore=DL3008
RUN rm -f /etc/apt/sources.list.d/cuda*.list /etc/apt/sources.list.d/nvidia-ml*.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv python3.11-distutils \
        openmpi-bin libopenmpi-dev openssh-server openssh-client \
        g++ make cmake procps \
    && rm -rf /var/lib/apt/lists/*

# --- CPU base: Debian's Python 3.11 image.
FROM python:3.11-slim-bookworm AS base-cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# mpirun exports it (-x LD_LIBRARY_PATH), so it must exist; the CUDA image sets its own.
ENV LD_LIBRARY_PATH=/usr/local/lib
# Unpinned distribution packages, as in the GPU stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        openmpi-bin libopenmpi-dev openssh-server openssh-client \
        g++ make cmake procps \
    && rm -rf /var/lib/apt/lists/*

# --- The image: the chosen base + the Python stack + Horovod + dist-lm + sshd.
# The base is one of the stages above, not an image to pin.
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# (Inherited from the base stages already; repeated after ENV so that hadolint lints the
# RUN lines below as bash.)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3.11 -m venv /opt/venv
WORKDIR /opt/dist-lm

# Dependencies first, from the project's metadata and lock file only, so that editing
# dist_lm/ does not rebuild them. An empty dist_lm package stands in for the source; the
# editable install picks up the real one copied at the end.
COPY launch/constraints.txt launch/constraints.txt
COPY setup.cfg pyproject.toml README.md ./
# Every package is pinned by launch/constraints.txt (-c).
# hadolint ignore=DL3013
RUN mkdir dist_lm && touch dist_lm/__init__.py \
    && pip install --no-cache-dir -c launch/constraints.txt wheel setuptools \
    && pip install --no-cache-dir -c launch/constraints.txt numpy Cython \
    && pip install --no-cache-dir -c launch/constraints.txt -e ".[${VARIANT}]" tensorboard

# Horovod against this MXNet. On GPU, importing mxnet-cu112 needs libcuda.so.1, which
# only the node's driver provides: the CUDA stubs stand in for it during the build and
# are dropped from the linker cache afterwards.
RUN flags=(HOROVOD_WITH_MXNET=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1) \
    && want=(MXNet MPI Gloo) \
    && if [ "$VARIANT" = gpu ]; then \
           flags+=(HOROVOD_GPU_OPERATIONS=NCCL) && want+=(NCCL) \
           && ldconfig /usr/local/cuda/lib64/stubs; \
       fi \
    && env "${flags[@]}" pip install --no-build-isolation --no-cache-dir \
        -c launch/constraints.txt horovod==0.28.1 \
    && report=$(horovodrun --check-build) && echo "$report" \
    && for w in "${want[@]}"; do \
           grep -q "\[X\] $w" <<<"$report" || { echo "horovod was built without $w"; exit 1; }; \
       done \
    && ldconfig

# sshd as mpiuser: an unprivileged port, a PID file in the home directory, the key the
# operator mounts as host key, and no ownership checks on the mounted key files
# (StrictModes). The ssh client side: the same port, and no known_hosts (pods are new
# each run, and the mounted .ssh is read-only).
# Keepalives on both sides (docs/reliability.md): without them a TCP connection to a node
# that dropped off the network stays open for many minutes, and so does everything
# waiting on it. The launcher's ssh to a lost worker ends after 3 x 5 s without an answer
# (ServerAlive), which ends mpirun's job; a worker's sshd ends the session of a launcher
# it lost after as long (ClientAlive).
RUN groupadd --gid 1000 mpiuser \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash mpiuser \
    && printf '%s\n' \
        'Port 2222' \
        'PidFile /home/mpiuser/sshd.pid' \
        'HostKey /home/mpiuser/.ssh/id_rsa' \
        'AuthorizedKeysFile .ssh/authorized_keys' \
        'StrictModes no' \
        'PasswordAuthentication no' \
        'PermitRootLogin no' \
        'UsePAM no' \
        'ClientAliveInterval 5' \
        'ClientAliveCountMax 3' \
        >/etc/ssh/sshd_config.nonroot \
    && printf '%s\n' \
        'Host *' \
        '    Port 2222' \
        '    StrictHostKeyChecking no' \
        '    UserKnownHostsFile /dev/null' \
        '    LogLevel ERROR' \
        '    ServerAliveInterval 5' \
        '    ServerAliveCountMax 3' \
        '    ConnectTimeout 10' \
        >/etc/ssh/ssh_config.d/mpi-operator.conf \
    && rm -f /etc/ssh/ssh_host_*

COPY dist_lm/ dist_lm/
# The default command's text (below).
COPY launch/image-usage.sh /usr/local/bin/dist-lm-usage
# The entry point answers (with the CUDA stubs on the path, should the CLI load MXNet).
RUN LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    dist-lm train --help >/dev/null

USER 1000:1000
WORKDIR /home/mpiuser
EXPOSE 2222 6006
# Without a command the image prints how to use it: training, TensorBoard, or a worker of
# an MPIJob, whose launcher and workers give their own commands (k8s/base/mpijob.yaml).
# (sh reads the script, which needs no execute bit.)
CMD ["/bin/sh", "/usr/local/bin/dist-lm-usage"]
