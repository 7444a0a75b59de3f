"""The errors dist-lm reports to users as one line and an exit code, never a traceback."""

import errno


class UsageError(Exception):
    """Bad input from the user (flags, files, checkpoints): exit code 2 on every rank."""

    exit_code = 2


class RunDirBusy(UsageError):
    """Another job holds the run directory's lock: exit code 5. Not bad input: the holder
    may be a rank of an earlier world of the same elastic job, cut off on a lost node,
    whose lock on shared storage lapses once that rank ends (runtime/elastic.py waits
    and starts again)."""

    exit_code = 5


class RunDirLost(UsageError):
    """The run directory's lock no longer names this job (another job took it, or its lock
    file was removed): exit code 6. Rank 0 stops before it renames, prunes or appends
    anything there, so that it cannot undo the new holder's work; another start would be
    refused (exit 5) while the new holder runs."""

    exit_code = 6


class RanksOutOfSync(Exception):
    """Ranks hold different parameters where they must be identical: exit code 4."""

    exit_code = 4


class NonFiniteError(Exception):
    """The loss or gradient became NaN/Inf under --nonfinite stop: exit code 3."""

    exit_code = 3


class BenchFailed(Exception):
    """A `dist-lm bench` measurement failed or timed out: exit code 1."""

    exit_code = 1


class Preempted(Exception):
    """SIGTERM/SIGINT: every rank stopped at the same step after rank 0 checkpointed.
    Exit code 143 (128 + SIGTERM), what Kubernetes and schedulers expect of a stop."""

    exit_code = 143


class StorageUnavailable(UsageError):
    """Storage failed in a way that passes (NFS's lock manager away, a stale handle after
    a server failover, an I/O error): exit code 7. Not bad input: an elastic job starts
    again after a back-off (runtime/elastic.py), a fixed-size one can be run again as is."""

    exit_code = 7


# The errno values of an OSError that storage may clear by itself.
# A full disk or quota (ENOSPC, EDQUOT) is one: another job's files or a clean-up free it,
# and an elastic job that ended on it would lose its run (found by `dist-lm chaos`).
TRANSIENT_ERRNOS = frozenset({errno.ENOLCK, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
                              errno.ENOSPC, errno.EDQUOT})


def exit_code_of(err: UsageError) -> int:
    """err's exit code, or StorageUnavailable's when a plain UsageError was raised while
    handling a transient OSError (`raise UsageError(...) from None` keeps it as the
    context): storage code says what failed, this says whether it may pass."""
    if type(err) is UsageError:
        seen = err.__cause__ or err.__context__
        while seen is not None:
            if isinstance(seen, OSError) and seen.errno in TRANSIENT_ERRNOS:
                return StorageUnavailable.exit_code
            seen = seen.__cause__ or seen.__context__
    return err.exit_code


def error_class(code: int) -> type:
    """The UsageError class of an exit code, for an error that travelled between ranks."""
    return next((c for c in (RunDirBusy, RunDirLost, StorageUnavailable)
                 if c.exit_code == code),
                UsageError)
