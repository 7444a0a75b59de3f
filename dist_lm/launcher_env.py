"""What the launcher (horovodrun, mpirun, or none) tells this process through its
environment. Imports nothing heavy: it runs before MXNet is loaded."""

from __future__ import annotations

import os

LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launched_by_horovod_or_mpi() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARS)


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
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // local_size_from_env()))
    return int(os.environ["OMP_NUM_THREADS"])
