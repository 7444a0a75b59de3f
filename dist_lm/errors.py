"""The errors dist-lm reports to users as one line and an exit code, never a traceback."""


class UsageError(Exception):
    """Bad input from the user (flags, files, checkpoints): exit code 2 on every rank."""

    exit_code = 2


class RanksOutOfSync(Exception):
    """Ranks hold different parameters where they must be identical: exit code 4."""

    exit_code = 4
