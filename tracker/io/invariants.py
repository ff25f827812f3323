"""What every written result satisfies, enforced in one place: `flame_arrays` (tracker/io/export.py) applies
`enforce_frame_invariants` to the arrays of every flame_params.npz before it is written, and the run summary is
computed from those same arrays.

- A row is `valid` only if all its values (parameters, shared shape, camera, timestamp, landmark error) are
  finite; a row that is not gets `valid = False` and says why in `invalid_reason`.
- Invalid rows hold their nearest valid neighbour's parameters (never NaN), and lmk_error_px NaN.
"""

from __future__ import annotations

import numpy as np

NO_FACE = "no face found"
"""The reason of a frame that the tracker itself left unfitted."""
ROW_PARAMS = ("expr", "jaw_pose", "neck_pose", "rotation", "translation", "eyes_pose", "eyelids")
ROW_CHECKED = (*ROW_PARAMS, "K", "R", "t", "timestamp", "lmk_error_px")
SHARED_CHECKED = ("shape", "image_size", "fps")


def enforce_frame_invariants(arrays: dict[str, np.ndarray], reasons: np.ndarray | None = None) -> dict:
    """`arrays` (the npz arrays, T rows) with rows holding any non-finite value marked invalid with a reason,
    filled from their nearest valid row, and `invalid_reason` (T,) added ('' for valid rows). `reasons`: why
    the tracker left rows invalid (default: no face found)."""
    valid = np.asarray(arrays["valid"], bool).copy()
    T = len(valid)
    reason = np.full(T, "", dtype=object)
    reason[~valid] = NO_FACE if reasons is None else np.asarray(reasons, object)[~valid]
    problems: list[list[str]] = [[] for _ in range(T)]
    for key in ROW_CHECKED:
        finite = np.isfinite(np.asarray(arrays[key], np.float64).reshape(T, -1)).all(axis=1)
        for t in np.flatnonzero(valid & ~finite):
            problems[t].append(key)
    shared = [key for key in SHARED_CHECKED if not np.isfinite(np.asarray(arrays[key], np.float64)).all()]
    for t in np.flatnonzero(valid):
        problems[t] += shared
    for t, keys in enumerate(problems):
        if keys:
            valid[t] = False
            reason[t] = "non-finite " + ", ".join(keys)
    if "shape" in shared:
        arrays["shape"] = np.zeros_like(arrays["shape"])
    _fill_from_neighbours(arrays, valid)
    lmk_error = np.asarray(arrays["lmk_error_px"], np.float32).copy()
    lmk_error[~valid] = np.nan
    arrays.update(valid=valid, lmk_error_px=lmk_error, invalid_reason=reason.astype(str))
    return arrays


def _fill_from_neighbours(arrays: dict[str, np.ndarray], valid: np.ndarray) -> None:
    """Non-finite values of invalid rows replaced by the nearest valid row's (zeros when no row is valid)."""
    good = np.flatnonzero(valid)
    for key in ROW_PARAMS:
        values = np.asarray(arrays[key]).copy()
        rows = ~np.isfinite(values.reshape(len(valid), -1)).all(axis=1)
        for t in np.flatnonzero(rows):
            values[t] = values[good[np.abs(good - t).argmin()]] if len(good) else 0
        arrays[key] = values
