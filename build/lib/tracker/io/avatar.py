"""Our FLAME parameters in the layout that head-avatar tools read (GaussianAvatars, VHAP): what is converted,
what the consumer's model must be, and what cannot travel.

Their FLAME layer is smplx's: vertices = LBS(template + shapedirs[:, :, :300] shape + shapedirs[:, :, 300:400]
expr + static_offset + dynamic_offset, pose = [rotation, neck, jaw, eyes]) + translation, with `rotation` about
the root joint, exactly our convention, so rotations and joint poses pass through unchanged and only sizes,
offsets and the world origin change:
- `shape` is zero-padded to (300,) and `expr` to (T, 100): the padded directions get coefficient 0;
- our eyelid blendshapes have no FLAME parameter: they become a per-frame `dynamic_offset` (rest-pose vertex
  offsets, which the consumers add before skinning as we add the eyelid directions);
- `static_offset` (zeros) is written because GaussianAvatars reads it, with the consumers' vertex count
  (FLAME's + the 120 teeth vertices their FlameHead appends), which both pad or add to their template.
The consumer must build its FLAME from the same model file, or the parameters describe another mesh: the
export records the model and warns when the consumers' default (official FLAME 2023) cannot reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracker.errors import TrackerError
from tracker.flame.model import FlameModel

CONSUMER_N_SHAPE = 300
CONSUMER_N_EXPR = 100
CONSUMER_EXPR_SLOT = 300
"""Consumers read expression directions from shapedirs[:, :, 300:] (official FLAME files' layout)."""
CONSUMER_TEETH_VERTICES = 120
"""Vertices GaussianAvatars' and VHAP's FlameHead(add_teeth=True) append to FLAME's 5023."""
OFFICIAL_FLAME_VERTICES = 5023


@dataclass
class ConsumerFrames:
    """Per-frame parameters of the selected rows in the consumers' layout (T' rows)."""

    translation: np.ndarray
    """(T', 3) translation in the export's world (ours shifted by `world_shift`)."""
    rotation: np.ndarray
    """(T', 3) axis-angle about FLAME's root joint."""
    neck_pose: np.ndarray
    jaw_pose: np.ndarray
    eyes_pose: np.ndarray
    """(T', 6) left then right eye."""
    expr: np.ndarray
    """(T', 100) zero-padded expression coefficients."""
    shape: np.ndarray
    """(300,) zero-padded identity coefficients."""
    static_offset: np.ndarray
    """(1, V + 120, 3) zeros."""
    dynamic_offset: np.ndarray | None
    """(T', V + 120, 3) eyelid offsets, None when the run has no eyelid motion."""


@dataclass
class ModelCheck:
    """Which model the parameters need, and why a consumer's default model would not reproduce the mesh."""

    record: dict
    """name, file, sha256, vertex count, expression basis of the model that produced the run."""
    note: str = ""
    """What the consumer must load (always true, printed as a note)."""
    warnings: list[str] = field(default_factory=list)
    """Mismatches with the consumer's default model (printed as warnings)."""


EYELID_WARNING = ("eyelid motion is carried by dynamic_offset (FLAME has no eyelid parameter); GaussianAvatars "
                  "ignores dynamic_offset, so there the eyelids move only as far as the expression moves them")


def pad(values: np.ndarray, size: int, what: str) -> np.ndarray:
    """Zero-pad the last axis to `size`; refuses arrays longer than the consumers read."""
    if values.shape[-1] > size:
        raise TrackerError(f"{what} has {values.shape[-1]} coefficients; the consumers read at most {size}")
    widths = [(0, 0)] * (values.ndim - 1) + [(0, size - values.shape[-1])]
    return np.pad(values.astype(np.float32), widths)


def eyelid_offsets(model: FlameModel, eyelids: np.ndarray) -> np.ndarray:
    """(T, V, 3) rest-pose vertex offsets of eyelid coefficients (T, 2)."""
    eyelid_dirs = model.dirs[:, :, model.n_shape + model.n_expr:].cpu().numpy()  # (V, 3, 2)
    return np.einsum("vcd,td->tvc", eyelid_dirs, eyelids.astype(np.float32))


def consumer_frames(arrays: dict[str, np.ndarray], model: FlameModel, rows: np.ndarray,
                    world_shift: np.ndarray) -> ConsumerFrames:
    """The selected rows of a run's arrays in the consumers' layout; world_shift (3,) is added to every
    translation (the cameras move with it)."""
    n_verts = model.n_vertices + CONSUMER_TEETH_VERTICES
    eyelids = arrays["eyelids"][rows]
    dynamic = None
    if model.has_eyelids and np.abs(eyelids).max(initial=0) > 0:
        dynamic = np.zeros((len(rows), n_verts, 3), np.float32)
        dynamic[:, :model.n_vertices] = eyelid_offsets(model, eyelids)
    take = lambda key: arrays[key][rows].astype(np.float32)  # noqa: E731
    return ConsumerFrames(
        translation=take("translation") + world_shift.astype(np.float32), rotation=take("rotation"),
        neck_pose=take("neck_pose"), jaw_pose=take("jaw_pose"), eyes_pose=take("eyes_pose"),
        expr=pad(arrays["expr"][rows], CONSUMER_N_EXPR, "expr"),
        shape=pad(arrays["shape"], CONSUMER_N_SHAPE, "shape"),
        static_offset=np.zeros((1, n_verts, 3), np.float32), dynamic_offset=dynamic)


def expression_slot(flame_file: Path, n_shape_used: int) -> int:
    """Index of the first expression direction in the model file's shapedirs (300 in FLAME's files)."""
    from tracker.flame.loading import read_pickle

    if flame_file.suffix == ".npz":
        with np.load(flame_file, allow_pickle=False) as z:
            n_dirs = z["shapedirs"].shape[2]
            n_shape = int(z["n_shape"]) if "n_shape" in z.files else min(300, n_dirs)
    else:
        raw = read_pickle(flame_file)
        shapedirs = raw["shapedirs"]
        n_dirs = (shapedirs.to_array() if hasattr(shapedirs, "to_array") else np.asarray(shapedirs)).shape[2]
        n_shape = int(np.asarray(raw.get("n_shape", min(300, n_dirs))))
    return CONSUMER_EXPR_SLOT if n_dirs > CONSUMER_EXPR_SLOT else max(n_shape, n_shape_used)


def check_model(flame_file: Path, model: FlameModel, consumer: str) -> ModelCheck:
    """The model record that travels with the export, and why `consumer`'s default model would not reproduce
    the tracked mesh (each warning one line). Refuses models whose expressions the consumers cannot address."""
    names = list(model.expression_names)
    basis = (f"named blendshapes ({', '.join(names[:3])}, ...; ARKit-style, useful range 0..1), not FLAME's PCA"
             if names else "FLAME PCA expression directions")
    record = {"name": model.name, "file": flame_file.name, "sha256": model.sha256,
              "vertices": model.n_vertices, "n_shape": model.n_shape, "n_expr": model.n_expr,
              "expression_basis": basis, "eyelid_blendshapes": model.has_eyelids,
              "consumer_vertices": model.n_vertices + CONSUMER_TEETH_VERTICES}
    if model.n_vertices != OFFICIAL_FLAME_VERTICES:
        raise TrackerError(f"{model.name} has {model.n_vertices} vertices; {consumer} needs FLAME's topology "
                           f"({OFFICIAL_FLAME_VERTICES})")
    if expression_slot(flame_file, model.n_shape) != CONSUMER_EXPR_SLOT:
        raise TrackerError(f"{flame_file.name} stores its expressions right after its {model.n_shape} identity "
                           f"directions, not at slot {CONSUMER_EXPR_SLOT} where {consumer} reads them")
    note = (f"{consumer} builds its own FLAME (by default the official FLAME 2023, teeth added): these parameters "
            f"reproduce the tracked mesh with this run's model file {flame_file.name} (sha256 {model.sha256[:16]}...) "
            "in its place")
    warnings = []
    if names:
        warnings.append(f"{model.name} is not the official FLAME: its expressions are {basis}; with the official "
                        f"FLAME 2023 the exported expr would drive other blendshapes (and the identity may differ): "
                        f"track with an official FLAME file to feed {consumer}")
    return ModelCheck(record, note, warnings)
