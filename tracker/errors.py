"""User-facing errors and the process exit codes: the CLI prints an error's message as one line and exits with
its code. Every exit code of the tracker's commands is defined here."""

import reprlib
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_USER_ERROR = 1
"""Bad input (files, flags, config), an incomplete result (truncated video), or a bug."""
EXIT_MISSING_ASSET = 2
"""A required model or asset file was not found."""
EXIT_SIGNAL_BASE = 128
"""Killed by signal N: exit code 128 + N (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), as shells do."""

QUOTE_LIMIT = 200
"""Most characters of a bad value that an error message repeats."""


class TrackerError(Exception):
    """An error caused by the user's input (files, flags, config); printed without a traceback."""

    exit_code = EXIT_USER_ERROR


class MissingAssetError(TrackerError):
    """A required model or asset file (FLAME, detector weights) is not where it was looked for."""

    exit_code = EXIT_MISSING_ASSET


_BOUNDED_REPR = reprlib.Repr()
_BOUNDED_REPR.maxlevel, _BOUNDED_REPR.maxstring, _BOUNDED_REPR.maxother = 3, QUOTE_LIMIT, QUOTE_LIMIT


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A bounded repr of `value` (at most about `limit` characters, however large or deeply shared the value
    is), for error messages."""
    text = _BOUNDED_REPR.repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def warn(message: str) -> None:
    """One warning line on stderr: something went wrong that the run works around (results stay correct)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT, SIGTERM, SIGHUP): finished work is written on the way out, as for
    Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL_BASE + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""Signals that stop a run like Ctrl-C: what a terminal, `timeout`, Docker and Slurm send."""


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread (once: a second signal
    while finished frames are being written is ignored; SIGKILL still ends the process)."""
    fired = []

    def handler(signum, _frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_reporting_errors(action: Callable[[], None]) -> int:
    """Run a command's work: 0 when it finishes; a TrackerError becomes one line on stderr and its exit code."""
    try:
        action()
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK
