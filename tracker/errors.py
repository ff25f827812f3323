"""User-facing errors and the exit codes of every tracker command (`tracker.run`, `tracker.export`, eval).

| code    | meaning                                                                         |
|---------|---------------------------------------------------------------------------------|
| 0       | success                                                                         |
| 1       | bad input: a file, flag or config value the command cannot use                  |
| 2       | usage error reported by argparse (unknown flag, missing argument)               |
| 3       | a required model or asset (FLAME, landmark embeddings, detector weights) missing |
| 4       | internal error (a bug): the message says which finished frames were written      |
| 128 + N | stopped by signal N (130: Ctrl-C / SIGINT, 143: SIGTERM, 129: SIGHUP)            |

The README's table is this one; a test keeps them equal.
"""

import os
import reprlib
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
"""argparse's own code for usage errors; nothing else uses it."""
EXIT_MISSING_ASSET = 3
EXIT_INTERNAL = 4
EXIT_SIGNAL_BASE = 128
"""Stopped by signal N: exit code 128 + N, as shells report it."""

QUOTE_LIMIT = 200
"""Most characters of a bad value that an error message repeats."""


class TrackerError(Exception):
    """An error caused by the user's input (files, flags, config); printed without a traceback."""

    exit_code = EXIT_BAD_INPUT


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


_pending_signal: list[int] = []
"""The stop signal received inside `interrupt_on_signals` whose exception may not have reached the run (empty: none)."""


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread (once: a second signal
    while finished frames are being written is ignored; SIGKILL still ends the process).

    Python drops an exception raised while a finaliser (`__del__`, a weakref callback) runs, so the handler's
    exception can be lost; the signal is also kept, and `stop_if_signalled` at each frame raises it again."""
    fired = []

    def handler(signum, _frame):
        if not fired:
            fired.append(signum)
            _pending_signal[:] = [signum]
            raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        _pending_signal.clear()
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_if_signalled() -> None:
    """A checkpoint for long loops: raise `Interrupted` for a stop signal whose exception was lost (once)."""
    if _pending_signal:
        raise Interrupted(_pending_signal.pop())


def signal_delivered() -> None:
    """The run saw the signal's exception: checkpoints need not raise it again (the finished work is being written)."""
    _pending_signal.clear()


def run_reporting_errors(action: Callable[[], None]) -> int:
    """Run a command's work: 0 when it finishes; a TrackerError becomes one line on stderr and its exit code."""
    try:
        action()
    except TrackerError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK


def report_failure(exc: BaseException, kept: str = "") -> int:
    """One line on stderr for what ended a command, and its exit code: a TrackerError its own, a signal 128 + N
    (Ctrl-C 130), a file the machine refused (a full disk, a permission) 1, any other exception (a bug) 4
    (TRACKER_DEBUG=1 also prints the traceback). `kept` says what is on disk ("no frames were written", ...)."""
    if isinstance(exc, TrackerError):
        print(f"error: {exc}" + (f" ({kept})" if kept and not kept.startswith("no ") else ""), file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        signal_delivered()
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        print(f"interrupted by {stop.name}" + (f": {kept}" if kept else ""), file=sys.stderr)
        return stop.exit_code
    if isinstance(exc, OSError):  # the machine, not the tracker: a full disk, a file removed or locked
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where} ({exc.strerror or exc})" + (f"; {kept}" if kept else ""),
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.environ.get("TRACKER_DEBUG"):
        traceback.print_exc()
    print(f"error: unexpected {type(exc).__name__} (a bug in the tracker): {str(exc)[:QUOTE_LIMIT]} "
          f"({kept + '; ' if kept else ''}set TRACKER_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL
