#!/bin/sh
# The training image's default command (Dockerfile CMD, installed as
# /usr/local/bin/dist-lm-usage): `docker run IMAGE` with no command prints how to use the
# image and exits 0. Every pod of the MPIJob (k8s/base) and TensorBoard gives its own
# command, so none runs this.
cat <<'USAGE'
dist-lm's training image (dist-lm, Horovod, OpenMPI, TensorBoard; user mpiuser, uid 1000).
Give it a command:

  Train (one process; --context cpu on the CPU image):
    docker run --rm -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" IMAGE \
      dist-lm train --data-dir /data/wikitext-2 --run-dir /runs/wt2 --resume auto
  Fetch WikiText-2 (where the network allows):
    docker run --rm -v "$PWD/data:/data" IMAGE dist-lm data --data-dir /data/wikitext-2
  TensorBoard on a run directory:
    docker run --rm -p 6006:6006 -v "$PWD/runs:/runs:ro" IMAGE \
      tensorboard --logdir /runs/wt2 --host 0.0.0.0 --port 6006
  Every option:
    docker run --rm IMAGE dist-lm train --help

On Kubernetes the image runs as a Kubeflow MPI Operator MPIJob (k8s/, docs/cluster.md),
whose pods give their own commands:
  launcher  dist-lm launch mpirun ... dist-lm train ...
  worker    /usr/sbin/sshd -De -f /etc/ssh/sshd_config.nonroot
            (port 2222; the operator mounts the job's ssh keys in /home/mpiuser/.ssh)
USAGE
