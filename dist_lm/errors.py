"""The errors dist-lm reports to users as one line and an exit code, never a traceback."""


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
