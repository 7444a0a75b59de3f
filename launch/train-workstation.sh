#!/usr/bin/env bash
# Runs `dist-lm train ARGS...` as NP Horovod ranks, on this machine or across machines:
#   launch/train-workstation.sh [-np N] [-H HOSTS] [--dry-run] [--] [dist-lm train ARGS...]
# -np and -H are horovodrun's and mpirun's flags, and set NP and HOSTS; --dry-run prints
# the command instead of running it. The environment variables:
#   NP          ranks (default: one per GPU, or 2 CPU ranks when there is no GPU; with
#               HOSTS, the sum of its slots); NP=1 runs one plain process without a launcher
#   CONTROLLER  mpi (default: `mpirun`) or gloo (`horovodrun --gloo`). mpi passes a stop
#               to the ranks with no deadline; horovodrun kills its workers 5 s after its
#               SIGTERM, so a longer stop checkpoint is lost (docs/reliability.md). Not
#               `horovodrun --mpi`, which does not pass SIGTERM on to the ranks
#   HOSTS       where the ranks run, host:slots,... (default localhost:NP). Other hosts
#               are reached over ssh without a password and need the same paths (this
#               checkout, its .venv, the data) and must resolve each other's names
#   IFACE       the network interface the ranks talk over (e.g. eth0), when the hosts
#               have several and the launcher's guess is wrong
#   VENV        the environment made by launch/setup-env.sh (default: .venv)
# The launcher runs under the project's wrapper (dist-lm launch, see
# docs/reliability.md): Ctrl-C or SIGTERM stops every rank with a checkpoint, a lost
# rank or node ends the whole job with one line that names it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$root/.venv}
export PATH="$VENV/bin:$PATH"
CONTROLLER=${CONTROLLER:-mpi}  # the Makefile's too: it passes CONTROLLER only when set
HOSTS=${HOSTS:-}
dry_run=
while [ $# -gt 0 ]; do
  case $1 in
    -np|--np) [ $# -ge 2 ] || { echo "train-workstation: $1 needs a rank count" >&2; exit 2; }
      NP=$2; shift 2 ;;
    -H|--hosts) [ $# -ge 2 ] || { echo "train-workstation: $1 needs host:slots,..." >&2; exit 2; }
      HOSTS=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
# --dry-run: the command, quoted, instead of running it.
run() {
  if [ -n "$dry_run" ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    exit 0
  fi
  exec "$@"
}

# Checked before its slots are summed, which bash arithmetic would do with any word.
if [ -n "$HOSTS" ] && ! [[ $HOSTS =~ ^[A-Za-z0-9._-]+(:[1-9][0-9]*)?(,[A-Za-z0-9._-]+(:[1-9][0-9]*)?)*$ ]]; then
  echo "train-workstation: HOSTS must be host:slots,host:slots,... not '$HOSTS'" >&2
  exit 2
fi
if [ -z "${NP:-}" ] && [ -n "$HOSTS" ]; then
  NP=0
  for slot in ${HOSTS//,/ }; do
    [[ $slot == *:* ]] && NP=$((NP + ${slot##*:})) || NP=$((NP + 1))
  done
fi
if [ -z "${NP:-}" ]; then
  NP=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NP:-0}" -gt 0 ] || NP=2
fi
if ! [[ $NP =~ ^[1-9][0-9]*$ ]]; then
  echo "train-workstation: NP must be a positive integer, not '$NP'" >&2
  exit 2
fi
HOSTS=${HOSTS:-localhost:$NP}

if [ "$NP" -eq 1 ] && [ "$HOSTS" = localhost:1 ]; then
  run dist-lm train "$@"
fi
supervise=(dist-lm launch)
case $CONTROLLER in
  gloo)
    # --disable-cache: horovodrun otherwise trusts for an hour an ssh check it cached in
    # ~/.horovod, and a node that went away since fails later and less clearly.
    extra=(--disable-cache)
    [ -z "${IFACE:-}" ] || extra+=(--network-interface "$IFACE")
    run "${supervise[@]}" horovodrun -np "$NP" -H "$HOSTS" --gloo "${extra[@]}" \
      dist-lm train "$@" ;;
  mpi)
    extra=(-x PATH -x PYTHONUNBUFFERED=1)
    [ "$(id -u)" -eq 0 ] && extra+=(--allow-run-as-root)
    # Forwarded only when set: mpirun warns about a variable it cannot find. Variables
    # that change numerics or threading: every rank takes rank 0's (launcher_env.py).
    [ -n "${LD_LIBRARY_PATH:-}" ] && extra+=(-x LD_LIBRARY_PATH)
    [ -z "${IFACE:-}" ] || extra+=(-mca oob_tcp_if_include "$IFACE" -mca btl_tcp_if_include "$IFACE")
    # Across nodes: Open MPI's ring allreduce (its default took 2-3x as long over
    # 1 Gbit/s links, docs/cluster.md), and keepalives on mpirun's own connections
    # so that a daemon on a lost node is noticed in ~25 s (docs/reliability.md).
    run "${supervise[@]}" mpirun "${extra[@]}" -np "$NP" -H "$HOSTS" -bind-to none -map-by slot \
      -mca coll_tuned_use_dynamic_rules 1 -mca coll_tuned_allreduce_algorithm 4 \
      -mca oob_tcp_keepalive_time 10 -mca oob_tcp_keepalive_intvl 5 \
      -mca oob_tcp_keepalive_probes 3 \
      dist-lm train "$@" ;;
  *)
    echo "train-workstation: CONTROLLER must be gloo or mpi, not '$CONTROLLER'" >&2
    exit 2 ;;
esac
