"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

import sys
from collections.abc import Callable


class TrackerError(Exception):
    """An error caused by the user's input (files, flags, config); printed without a traceback."""

    exit_code = 1


class MissingAssetError(TrackerError):
    """A required model or asset file (FLAME, detector weights) is not where it was looked for."""

    exit_code = 2


def run_reporting_errors(action: Callable[[], None]) -> int:
    """Run a command's work: 0 when it finishes; a TrackerError becomes one line on stderr and its exit code."""
    try:
        action()
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
