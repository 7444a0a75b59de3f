"""What the launcher (horovodrun, mpirun, or none) tells this process through its
environment, and the process-wide settings made before MXNet loads. Imports nothing
heavy: it runs before MXNet is loaded.

The measurements behind every setting are in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import os

LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")

# The environment variables that change what a rank computes (which kernels, in which
# order floats are summed) or with how many threads: read by OpenMP, the BLAS libraries,
# oneDNN, MXNet, Horovod's and NCCL's reduction choices, and dist-lm's allocator. All ranks
# of a job must see the same values: `mpirun` passes a rank started over ssh only what
# `-x` names, so a value set on the launcher's node would reach that node's ranks alone
# (horovodrun forwards the whole environment). `configure_process` therefore makes every
# rank's values rank 0's under mpirun: the one mechanism, which works whoever started
# mpirun (`dist-lm launch` or a user by hand). Where no rank runs beside mpirun (the
# MPIJob's launcher pod), a value meant for every rank is given as `-x NAME=VALUE`.
NUMERICS_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "GOTO_", "BLIS_",
                     "DNNL_", "ONEDNN_", "MKLDNN_", "MXNET_")
NUMERICS_NAMES = ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CYCLE_TIME", "HOROVOD_CPU_OPERATIONS",
                  "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_HIERARCHICAL_ALLGATHER",
                  "HOROVOD_AUTOTUNE", "HOROVOD_CACHE_CAPACITY", "HOROVOD_DISABLE_GROUP_FUSION",
                  "HOROVOD_BATCH_D2D_MEMCOPIES", "NCCL_ALGO", "NCCL_PROTO", "DIST_LM_MALLOC")

# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def launched_by_horovod_or_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS)


# The process that started this rank (mpirun's daemon, the sshd session horovodrun's ssh
# opened, a launcher's shell), noted by configure_process when a launcher started it.
_LAUNCHER_PARENT = None


def note_launcher_parent() -> None:
    global _LAUNCHER_PARENT
    if launched_by_horovod_or_mpi():
        _LAUNCHER_PARENT = os.getppid()


def launcher_gone() -> bool:
    """The process that started this rank has ended (this one was handed to init or a
    subreaper). A rank horovodrun started over ssh outlives its launcher: when the ssh
    client is killed its sshd session ends, and the rank, no child of it any more, runs on
    with nobody to read its output or end it. A single process (a shell's child, which
    `nohup` may rightly outlive) is never read as orphaned."""
    return _LAUNCHER_PARENT is not None and os.getppid() != _LAUNCHER_PARENT


def local_size_from_env() -> int:
    for var in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return max(1, int(os.environ[var]))
    return 1


def configure_threads() -> int:
    """Sets OMP_NUM_THREADS to cores / ranks on this node unless the user set it.

    Must run before MXNet is imported: its OpenMP pool reads the variable once at load.
    Oversubscribing (2 ranks x all cores each) costs more than it gains on CPU.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:  # unset, or set empty (`OMP_NUM_THREADS= cmd`), as OpenMP reads it
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        value = os.environ["OMP_NUM_THREADS"] = str(max(1, cores // local_size_from_env()))
    if not value.isdigit() or int(value) < 1:
        from ..errors import UsageError
        raise UsageError(f"OMP_NUM_THREADS must be a positive integer, not '{value}'")
    return int(value)


def configure_allocator() -> bool:
    """Keeps large buffers inside the process instead of mapping them afresh each step.

    glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh
    mmap and returns it with munmap on free, so the next step touches every page again
    (a minor page fault and a page of zeroing per 4 KiB). A training step frees and
    reallocates buffers of T x B x V floats (38.6 MB for bptt 35 x 20 columns x 13,777
    words; more at larger vocabularies), which cost ~9,600 faults and ~10% of the step
    on CPU. With mmap off, one arena, and no trimming, freed memory is reused; the price
    is that it stays in the process (peak RSS ~40 MB higher here) until the process ends.

    `DIST_LM_MALLOC=system` leaves glibc's defaults alone. Returns whether it applied
    (False off glibc, where mallopt does not exist).
    """
    if os.environ.get("DIST_LM_MALLOC", "tuned") == "system":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = [mallopt(param, value) for param, value in
               ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 2 ** 31 - 1))]
    return all(ok == 1 for ok in applied)


def configure_mpi_waiting() -> None:
    """Makes Open MPI yield the core while it waits, unless the user chose otherwise.

    Horovod's background thread negotiates with the other ranks every cycle (1 ms) and
    Open MPI busy-polls while it waits, so on a node whose cores all run compute threads
    the poller takes turns with them: 2 ranks on 2 cores ran 233 ms steps polling and
    169 ms yielding. Where cores are spare, yielding costs nothing (sched_yield returns at
    once). Read by MPI_Init, which runs after this.
    """
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def numerics_env(environ=os.environ) -> dict:
    """The variables of NUMERICS_PREFIXES / NUMERICS_NAMES that are set in environ."""
    return {k: v for k, v in environ.items()
            if k.startswith(NUMERICS_PREFIXES) or k in NUMERICS_NAMES}


def adopt_root_numerics() -> list:
    """Under mpirun, makes this rank's numerics variables exactly rank 0's (set what rank 0
    sets, unset what it does not) before MXNet loads; returns the names it changed.

    Rank 0 runs beside mpirun in the usual `mpirun -H here:k,there:k` and inherits its
    whole environment; ranks on other nodes see only what -x names, and their node's own
    defaults. Initialises MPI (mpi4py, MPI_THREAD_MULTIPLE, as Horovod is later handed
    it); Gloo jobs (horovodrun forwards everything) and single processes are left alone.
    """
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1)
    if size < 2 or "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
        return []
    try:
        from mpi4py import MPI
    except ImportError:
        return []
    mine = numerics_env()
    root = MPI.COMM_WORLD.bcast(mine, root=0)
    changed = sorted(k for k in set(mine) | set(root) if mine.get(k) != root.get(k))
    for name in changed:
        if name in root:
            os.environ[name] = root[name]
        else:
            del os.environ[name]
    return changed


def configure_process() -> int:
    """Everything this process sets before MXNet and MPI load: the launcher's process it
    answers to, how MPI waits, the allocator, rank 0's numerics variables (under mpirun),
    and OpenMP threads. Returns the number of OpenMP threads."""
    note_launcher_parent()
    configure_mpi_waiting()  # read by MPI_Init, which adopt_root_numerics runs
    configure_allocator()
    adopt_root_numerics()
    return configure_threads()
