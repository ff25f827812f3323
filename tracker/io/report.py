"""report.png: one picture per run to judge a track at a glance.

Four panels over the frame index: landmark reprojection error, head pose angles (yaw, pitch, roll of the
global rotation composed with the neck), expression magnitude and jaw opening, and the landmark + prior
energy after each stage that ran. Frames without a face are shaded red in every panel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

NO_FACE_COLOUR = "tab:red"


def head_pose_degrees(rotation: np.ndarray, neck_pose: np.ndarray) -> np.ndarray:
    """(T, 3) yaw, pitch, roll in degrees of the head (root rotation then neck), from axis-angle (T, 3) each.

    FLAME's world is y up with the face towards +z (the camera): yaw turns about y, pitch about x, roll
    about z (intrinsic Y-X-Z), so (0, 0, 0) faces the camera.
    """
    head = Rotation.from_rotvec(rotation) * Rotation.from_rotvec(neck_pose)
    return head.as_euler("YXZ", degrees=True)


def invalid_runs(frame_index: np.ndarray, valid: np.ndarray) -> list[tuple[float, float]]:
    """(first, last) frame index of each run of consecutive invalid rows, widened by half a frame."""
    runs, start = [], None
    for row, ok in enumerate(valid):
        if not ok and start is None:
            start = row
        if (ok or row == len(valid) - 1) and start is not None:
            end = row if not ok else row - 1
            runs.append((frame_index[start] - 0.5, frame_index[end] + 0.5))
            start = None
    return runs


def write_report(path: Path, arrays: dict[str, np.ndarray], title: str = "") -> Path:
    """Draw the report of one run from its flame_params arrays (see README, 'Outputs') into `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    x = arrays["frame_index"]
    valid = arrays["valid"].astype(bool)
    error = arrays["lmk_error_px"]
    pose = head_pose_degrees(arrays["rotation"], arrays["neck_pose"])
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True, constrained_layout=True)

    ax = axes[0]
    ax.plot(x, error, color="tab:blue", lw=1)
    if valid.any():
        ax.axhline(np.nanmean(error[valid]), color="tab:blue", ls="--", lw=0.8,
                   label=f"mean {np.nanmean(error[valid]):.2f} px")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("landmark error (px)")

    ax = axes[1]
    for k, name in enumerate(("yaw", "pitch", "roll")):
        ax.plot(x, pose[:, k], lw=1, label=name)
    ax.set_ylabel("head pose (deg)")
    ax.legend(loc="upper right", fontsize=8, ncol=3)

    ax = axes[2]
    ax.plot(x, np.linalg.norm(arrays["expr"], axis=1), color="tab:purple", lw=1, label="|expression|")
    ax.set_ylabel("|expression|")
    jaw = ax.twinx()
    jaw.plot(x, np.degrees(np.linalg.norm(arrays["jaw_pose"], axis=1)), color="tab:orange", lw=1)
    jaw.set_ylabel("jaw rotation (deg)", color="tab:orange")

    ax = axes[3]
    names = [str(n) for n in arrays.get("stage_names", [])]
    for name, energy in zip(names, arrays.get("stage_energy", [])):
        ax.plot(x, energy, lw=1, label=f"after {name}")
    if names:
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8, ncol=len(names))
    ax.set_ylabel("landmark + prior energy")
    ax.set_xlabel("frame")

    for ax in axes:
        for k, (lo, hi) in enumerate(invalid_runs(x, valid)):
            ax.axvspan(lo, hi, color=NO_FACE_COLOUR, alpha=0.15, lw=0, label="no face" if k == 0 else None)
    if not valid.all():
        axes[0].legend(loc="upper right", fontsize=8)
    n_valid = int(valid.sum())
    fig.suptitle(f"{title}: {n_valid}/{len(valid)} frames tracked (no face: red)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.png")  # never a half-written report under the real name
    fig.savefig(partial, dpi=80, format="png")
    plt.close(fig)
    os.replace(partial, path)
    return path
