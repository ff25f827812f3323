"""Build the shipped flame_assets/ files from the shared data folder and measure what the compaction costs.

    python -m tools.pack_flame_assets [--shared ../shared/data] [--out flame_assets]

- `flame_standin.npz`: the open stand-in (../shared/data/assets/flame_standin/flame_standin.npz) with only its
  non-zero blendshape columns (60 identity + 43 expression directions; the official 300 + 100 layout is zero
  elsewhere) and float32 arrays (the tracker computes in float32), compressed. A `license` entry is added.
- the side files as plain arrays: `flame_static_embedding_68.npz` (TF_FLAME's pickle),
  `flame_dynamic_embedding.npz` (RingNet's pickled .npy), `FLAME_masks.npz` (SMIRK's pickle); copied as they
  are: `l_eyelid.npy`, `r_eyelid.npy`, `head_template.obj`, and the MediaPipe Face Landmarker `.task`.
- not written here: `mediapipe_landmark_embedding.npz` is SMIRK's embedding with each point re-placed where
  MediaPipe puts it on rendered faces, `python -m eval.calibrate_embedding --sequences 8 --out
  flame_assets/mediapipe_landmark_embedding.npz`.

It prints each file's size and the vertex error of the compact model against the original (float64) on
random parameters. flame_assets/NOTICE.md and LICENSES/ are written by hand.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from tracker.flame.landmarks import read_dynamic_contour
from tracker.flame.loading import load_flame_file, read_array_dict
from tracker.flame.model import FlameModel, FlameParams

REPO = Path(__file__).resolve().parents[1]
MODEL_LICENSE = ("CC-BY-4.0 (FLAME 2023 Open template, identity directions, FLAME joint regressor; MPI-IS) and "
                 "MIT (expressions from ICT-FaceKit, eyelids from SMIRK); not the official FLAME model; "
                 "see flame_assets/NOTICE.md")
FLOAT_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "J")
COPIED = {"assets/flame/l_eyelid.npy": "l_eyelid.npy", "assets/flame/r_eyelid.npy": "r_eyelid.npy",
          "assets/flame/head_template.obj": "head_template.obj",
          "assets/mediapipe/face_landmarker_v2_with_blendshapes.task": "face_landmarker_v2_with_blendshapes.task"}


def compact_model(source: Path) -> dict[str, np.ndarray]:
    """The stand-in's arrays with only the used blendshape columns, floats as float32."""
    with np.load(source, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    n_shape, n_expr = int(raw["n_shape"]), int(raw["n_expr"])
    dirs = raw["shapedirs"]
    unused = np.concatenate([dirs[:, :, n_shape:300], dirs[:, :, 300 + n_expr:]], axis=2)
    if np.any(unused):
        raise ValueError(f"{source}: blendshape columns outside the {n_shape} + {n_expr} used ones are not zero")
    raw["shapedirs"] = np.concatenate([dirs[:, :, :n_shape], dirs[:, :, 300:300 + n_expr]], axis=2)
    for key in FLOAT_KEYS:
        raw[key] = np.ascontiguousarray(raw[key], dtype=np.float32)
    raw["license"] = np.array(MODEL_LICENSE)
    return raw


def side_files(shared: Path) -> dict[str, dict[str, np.ndarray]]:
    """Plain-array versions of the pickled side files, by shipped file name."""
    flame = shared / "assets" / "flame"
    return {
        "flame_static_embedding_68.npz": read_array_dict(flame / "flame_static_embedding_68.pkl"),
        "flame_dynamic_embedding.npz": {k: np.asarray(v) for k, v in
                                        read_dynamic_contour(flame / "flame_dynamic_embedding.npy").items()},
        "FLAME_masks.npz": read_array_dict(flame / "FLAME_masks.pkl"),
    }


def random_params(n: int, n_shape: int, n_expr: int, seed: int = 0) -> FlameParams:
    """Identity within +-3 sd, expressions in [0, 1] (full activation), poses up to ~30 degrees, eyelids 0..1."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return FlameParams(shape=6 * u(1, n_shape) - 3, expr=u(n, n_expr), rotation=u(n, 3) - 0.5,
                       neck_pose=u(n, 3) - 0.5, jaw_pose=0.4 * u(n, 3), eyes_pose=0.6 * u(n, 6) - 0.3,
                       eyelids=u(n, 2), translation=torch.zeros(n, 3, dtype=torch.float64))


@torch.no_grad()
def vertex_error_mm(original: Path, compact: Path, n: int = 64, seed: int = 0) -> float:
    """Largest vertex distance (mm) between the two model files posed with the same random parameters,
    evaluated in float64 so the storage precision is what is measured."""
    a, b = (load_flame_file(p, 300, 100, dtype=np.float64) for p in (original, compact))
    model_a, model_b = FlameModel(a).double(), FlameModel(b).double()
    params = random_params(n, model_a.n_shape, model_a.n_expr, seed)
    diff = model_a(params).vertices - model_b(params).vertices
    return float(diff.norm(dim=-1).max()) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "flame_assets")
    args = parser.parse_args()
    source = args.shared / "assets" / "flame_standin" / "flame_standin.npz"
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "flame_standin.npz", **compact_model(source))
    for name, arrays in side_files(args.shared).items():
        np.savez_compressed(args.out / name, **arrays)
    for src, name in COPIED.items():
        shutil.copyfile(args.shared / src, args.out / name)
    total = 0
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.stat().st_size / 1e6:8.3f} MB  {path.relative_to(args.out)}")
    print(f"{total / 1e6:8.3f} MB  total in {args.out}")
    print(f"compact model vertex error vs the original (float64, 64 random poses): "
          f"{vertex_error_mm(source, args.out / 'flame_standin.npz'):.2e} mm")


if __name__ == "__main__":
    main()
