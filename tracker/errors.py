"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class TrackerError(Exception):
    """An error caused by the user's input (files, flags, config); printed without a traceback."""

    exit_code = 1


class MissingAssetError(TrackerError):
    """A required model or asset file (FLAME, detector weights) is not where it was looked for."""

    exit_code = 2
