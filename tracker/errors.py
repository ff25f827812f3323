"""User-facing errors and the exit codes of every tracker command (`tracker.run`, `tracker.export`, eval).

| code    | meaning                                                                         |
|---------|---------------------------------------------------------------------------------|
| 0       | success                                                                         |
| 1       | bad input: a file, flag or config value the command cannot use                  |
| 2       | usage error reported by argparse (unknown flag, missing argument)               |
| 3       | a required model or asset (FLAME, landmark embeddings, detector weights) missing |
| 4       | internal error (a bug): finished frames are still written                       |
| 128 + N | stopped by signal N (130: Ctrl-C / SIGINT, 143: SIGTERM)                        |

The README's table is this one; a test keeps them equal.
"""

import os
import signal
import sys
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
"""argparse's own code for usage errors; nothing else uses it."""
EXIT_MISSING_ASSET = 3
EXIT_INTERNAL = 4
EXIT_SIGNAL_BASE = 128
"""Stopped by signal N: exit code 128 + N, as shells report it."""


class TrackerError(Exception):
    """An error caused by the user's input (files, flags, config); printed without a traceback."""

    exit_code = EXIT_BAD_INPUT


class MissingAssetError(TrackerError):
    """A required model or asset file (FLAME, detector weights) is not where it was looked for."""

    exit_code = EXIT_MISSING_ASSET


def run_reporting_errors(action: Callable[[], None]) -> int:
    """Run a command's work: 0 when it finishes; a TrackerError becomes one line on stderr and its exit code."""
    try:
        action()
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK


def report_failure(exc: BaseException, kept: str = "") -> int:
    """One line on stderr for what ended a command, and its exit code: a TrackerError its own, Ctrl-C 130, any
    other exception (a bug) 4 (TRACKER_DEBUG=1 also prints the traceback). `kept` says what was saved."""
    if isinstance(exc, TrackerError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted" + (f": {kept}" if kept else ""), file=sys.stderr)
        return EXIT_SIGNAL_BASE + signal.SIGINT
    if os.environ.get("TRACKER_DEBUG"):
        traceback.print_exc()
    print(f"error: unexpected {type(exc).__name__}: {exc} ({kept + '; ' if kept else ''}"
          "set TRACKER_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL
