#!/usr/bin/env bash
# Runs `dist-lm train "$@"` on this machine as NP Horovod ranks.
#   NP          ranks (default: one per GPU, or 2 CPU ranks when there is no GPU);
#               NP=1 runs one plain process without a launcher
#   CONTROLLER  gloo (default: `horovodrun --gloo`) or mpi (`mpirun`; not
#               `horovodrun --mpi`, which does not pass SIGTERM on to the ranks)
#   VENV        the environment made by launch/setup-env.sh (default: .venv)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$root/.venv}
export PATH="$VENV/bin:$PATH"
CONTROLLER=${CONTROLLER:-gloo}

if [ -z "${NP:-}" ]; then
  NP=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NP:-0}" -gt 0 ] || NP=2
fi
if ! [[ $NP =~ ^[1-9][0-9]*$ ]]; then
  echo "train-workstation: NP must be a positive integer, not '$NP'" >&2
  exit 2
fi

if [ "$NP" -eq 1 ]; then
  exec dist-lm train "$@"
fi
case $CONTROLLER in
  gloo)
    exec horovodrun -np "$NP" -H "localhost:$NP" --gloo dist-lm train "$@" ;;
  mpi)
    extra=(-x PATH)
    [ "$(id -u)" -eq 0 ] && extra+=(--allow-run-as-root)
    # Forwarded only when set: mpirun warns about a variable it cannot find.
    [ -n "${LD_LIBRARY_PATH:-}" ] && extra+=(-x LD_LIBRARY_PATH)
    exec mpirun "${extra[@]}" -np "$NP" -H "localhost:$NP" -bind-to none -map-by slot \
      dist-lm train "$@" ;;
  *)
    echo "train-workstation: CONTROLLER must be gloo or mpi, not '$CONTROLLER'" >&2
    exit 2 ;;
esac
