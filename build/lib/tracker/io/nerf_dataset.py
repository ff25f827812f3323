"""A tracked video as a NeRF-style head-avatar dataset, the layout VHAP's export_as_nerf_dataset writes and
GaussianAvatars trains on:

    images/00000_00.png            frames with a fitted face, renumbered 0.. (timestep _ camera)
    flame_param/00000.npz          translation, rotation, neck_pose, jaw_pose (1, 3), eyes_pose (1, 6),
                                   shape (300,), expr (1, 100), static_offset (1, V + 120, 3)
                                   [+ dynamic_offset (1, V + 120, 3): eyelids]
    canonical_flame_param.npz      the same keys, zero pose and expression, jaw opened 0.3 rad
    transforms.json                every frame; transforms_{train,val,test}.json: VHAP's split by timestep
    export_info.json               model, source run, conventions, notes and warnings

Cameras: `transform_matrix` is camera-to-world with OpenGL/Blender axes (x right, y up, z back), as NeRF
data sets store it; GaussianAvatars flips its y and z columns to get OpenCV axes. Our camera stays at the
origin (world-to-camera R = diag(1, -1, -1) in OpenCV axes, i.e. identity in OpenGL axes); the export moves the
world so the mean head translation is at the origin (the camera then sits at minus that mean), as VHAP does.
Intrinsics `fl_x`, `fl_y`, `cx`, `cy` are in pixels with the image spanning [0, w] (pixel centres at +0.5),
which is where VHAP's projection puts them; GaussianAvatars reads only `camera_angle_x` and assumes the
principal point at the image centre, which ours is.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tracker.errors import TrackerError
from tracker.io.avatar import ConsumerFrames
from tracker.io.export import write_json
from tracker.io.video import FrameSelection, probe_video, read_frames
from tracker.result import TrackingResult

CANONICAL_JAW = 0.3
"""Jaw opening (rad) of canonical_flame_param.npz, as VHAP writes it (the mouth interior is seen)."""
TRAIN_RATIO = 0.7
"""Share of timesteps in the training split (VHAP's default); the rest is the test split."""
FRAME_KEYS = ("translation", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "expr")


def camera_entry(K: np.ndarray, height: int, width: int, camera_to_world: np.ndarray) -> dict:
    """The intrinsics/extrinsics fields of a transforms.json frame (K in the tracker's internal convention)."""
    fl_x, fl_y, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    return {"fl_x": fl_x, "fl_y": fl_y, "cx": cx, "cy": cy, "w": width, "h": height,
            "camera_angle_x": 2 * math.atan(width / (2 * fl_x)), "camera_angle_y": 2 * math.atan(height / (2 * fl_y)),
            "transform_matrix": camera_to_world.tolist()}


def frame_params(frames: ConsumerFrames, i: int) -> dict[str, np.ndarray]:
    """flame_param/NNNNN.npz of one timestep: per-frame arrays keep a leading axis of 1."""
    params = {key: getattr(frames, key)[i:i + 1] for key in FRAME_KEYS}
    params.update(shape=frames.shape, static_offset=frames.static_offset)
    if frames.dynamic_offset is not None:
        params["dynamic_offset"] = frames.dynamic_offset[i:i + 1]
    return params


def canonical_params(frames: ConsumerFrames) -> dict[str, np.ndarray]:
    zeros = lambda n: np.zeros((1, n), np.float32)  # noqa: E731
    jaw = zeros(3)
    jaw[0, 0] = CANONICAL_JAW
    return {"translation": zeros(3), "rotation": zeros(3), "neck_pose": zeros(3), "jaw_pose": jaw,
            "eyes_pose": zeros(6), "shape": frames.shape, "expr": zeros(frames.expr.shape[1]),
            "static_offset": frames.static_offset}


def split(transforms: dict, train_ratio: float) -> dict[str, dict]:
    """VHAP's split of a one-camera dataset: the first ceil(ratio * T) timesteps train, the rest test; the
    validation split (held-out cameras) is empty."""
    timesteps = transforms["timestep_indices"]
    n_train = math.ceil(len(timesteps) * train_ratio)
    shared = {k: v for k, v in transforms.items() if k not in ("frames", "timestep_indices", "camera_indices")}
    train_t, test_t = set(timesteps[:n_train]), set(timesteps[n_train:])
    pick = lambda ts: [f for f in transforms["frames"] if f["timestep_index"] in ts]  # noqa: E731
    return {
        "train": {**shared, "timestep_indices": sorted(train_t), "camera_indices": transforms["camera_indices"],
                  "frames": pick(train_t)},
        "val": {**shared, "timestep_indices": sorted(train_t), "camera_indices": [], "frames": []},
        "test": {**shared, "timestep_indices": sorted(test_t), "camera_indices": transforms["camera_indices"],
                 "frames": pick(test_t)},
    }


def selected_frames(video: Path, frame_indices: np.ndarray):
    """(index, rgb) of the given video frames, in order."""
    wanted = set(int(i) for i in frame_indices)
    last = max(wanted)
    for frame in read_frames(video, FrameSelection(start=int(min(wanted)))):
        if frame.index in wanted:
            yield frame.index, frame.rgb
        if frame.index >= last:
            return


def write_nerf_dataset(result: TrackingResult, frames: ConsumerFrames, rows: np.ndarray, world_shift: np.ndarray,
                       video: Path, out: Path, train_ratio: float = TRAIN_RATIO,
                       show_progress: bool = True) -> dict:
    """Write the dataset of the given rows (frames already converted, shifted by world_shift); returns the
    transforms.json content."""
    height, width = (int(v) for v in result["image_size"])
    info = probe_video(video)
    if (info.height, info.width) != (height, width):
        raise TrackerError(f"{video} is {info.width}x{info.height}, the run tracked {width}x{height} frames: "
                           "pass the tracked video with --video")
    camera_to_world = np.eye(4)
    camera_to_world[:3, 3] = world_shift  # our camera at the origin, moved with the world; OpenGL axes
    K_internal = result.K.astype(np.float64).copy()
    K_internal[:, :2, 2] += 0.5  # the npz stores OpenCV's integer-centred K; the export's image spans [0, w]
    transforms = {"frames": []}
    row_of_frame = {int(result.frame_index[r]): (t, r) for t, r in enumerate(rows)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "flame_param").mkdir(exist_ok=True)
    with tqdm(total=len(rows), desc="export", unit="frame", disable=not show_progress) as bar:
        for frame_index, rgb in selected_frames(video, result.frame_index[rows]):
            t, r = row_of_frame[frame_index]
            entry = {"timestep_index": t, "timestep_index_original": int(r), "timestep_id": f"{frame_index:05d}",
                     "camera_index": 0, "camera_id": "0", **camera_entry(K_internal[r], height, width,
                                                                           camera_to_world),
                     "file_path": f"images/{t:05d}_00.png", "flame_param_path": f"flame_param/{t:05d}.npz"}
            if not cv2.imwrite(str(out / entry["file_path"]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise TrackerError(f"cannot write {out / entry['file_path']}")
            np.savez(out / entry["flame_param_path"], **frame_params(frames, t))
            transforms["frames"].append(entry)
            bar.update(1)
    if len(transforms["frames"]) != len(rows):
        raise TrackerError(f"{video} ended before frame {int(result.frame_index[rows[-1]])}: is it the tracked video?")
    np.savez(out / "canonical_flame_param.npz", **canonical_params(frames))
    shared = {k: v for k, v in transforms["frames"][0].items()
              if k in ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")}
    transforms.update(shared, timestep_indices=list(range(len(rows))), camera_indices=[0])
    write_json(out / "transforms.json", transforms)
    for name, part in split(transforms, train_ratio).items():
        write_json(out / f"transforms_{name}.json", part)
    return transforms
