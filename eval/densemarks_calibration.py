"""Calibrate the DenseMarks oracle's degradations against the real network's point-matching accuracy.

    python -m eval.densemarks_calibration [--pairs 12] [--points 600] [--out eval/results/densemarks_calibration]

The paper reports point matching on NeRSemble (pairs of views of one head): a query pixel in one image is matched
to the pixel of the other image whose embedding is nearest, and the match counts as correct within 0.05 of the
image side (PCK@0.05 ~0.90; mean error 3.68, DINOv3 7.60 / 0.72; FIELD_NOTES). The mean error is read as a
percentage of the image side: in pixels it could not coexist with 10% of matches beyond 0.05 of the side (25.6
pixels at 512) for either method, since DINOv3's 28% failures alone would then average under 27 pixels. Here the same protocol runs on
the oracle's maps of a synthetic head in pairs of frames whose yaw differs by 20-60 degrees: query pixels on the
head of frame a (away from its silhouette), their match in frame b's whole crop (background included, as the
network has no mask), scored against where the same surface point lies in b (when b sees it). Errors are in
pixels of the 512-pixel crop. A grid over per-pixel noise, blur and outliers is searched for the setting whose
PCK@0.05 is nearest 0.90 (then mean error nearest 3.68% of the side); the smooth bias field is the same in both images and
does not change matching, so it keeps its default. The result is tracker.densemarks.oracle.CALIBRATED_NOISE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.spatial import cKDTree

from eval.dense_benchmark import sequence_camera, sequence_params
from eval.tracked import head_yaw_deg
from tracker.camera import Camera
from tracker.config import load_config
from tracker.densemarks.canonical import crop_affine, crop_screen_vertices
from tracker.densemarks.oracle import CALIBRATED_NOISE, OracleDenseMarks, OracleGroundTruth, OracleNoise
from tracker.densemarks.stage import head_boxes, head_vertex_ids
from tracker.detect.base import SCHEME_MEDIAPIPE
from tracker.errors import run_reporting_errors
from tracker.flame.assets import FlameBundle, load_flame_bundle
from tracker.flame.model import FlameParams
from tracker.render import RasterSettings, rasterize

PCK_FRACTION = 0.05
TARGET_PCK = 0.90
TARGET_MAE_PERCENT = 3.68
SILHOUETTE_MARGIN_PX = 3
"""Query pixels lie at least this far inside the head's silhouette in frame a."""


def crop_geometry(bundle: FlameBundle, params: FlameParams, camera: Camera, frame: int, oracle: OracleDenseMarks,
                  box) -> tuple[np.ndarray, torch.Tensor, object]:
    """The oracle's uvw (3, S, S) of one frame, its posed vertices in crop pixels + depth (V, 3), and the
    rasterisation of the head in the crop."""
    prediction = oracle.predict(frame, box)
    affine = torch.as_tensor(crop_affine(prediction.frame_to_crop), dtype=torch.float32)[None]
    with torch.no_grad():
        vertices = bundle.model(params.frames(slice(frame, frame + 1))).vertices
        screen = crop_screen_vertices(vertices, camera, affine)[0]
    size = prediction.uvw.shape[-1]
    return prediction.uvw, screen, rasterize(screen[None], bundle.model.faces, RasterSettings((size, size)))


def pair_errors(bundle: FlameBundle, params: FlameParams, camera: Camera, oracle: OracleDenseMarks, boxes: list,
                a: int, b: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """Point-matching errors (crop pixels) of query pixels on the head in frame a, matched into frame b."""
    uvw_a, _, frags_a = crop_geometry(bundle, params, camera, a, oracle, boxes[a])
    uvw_b, screen_b, frags_b = crop_geometry(bundle, params, camera, b, oracle, boxes[b])
    size = uvw_a.shape[-1]
    inside = cv2.erode(frags_a.mask[0].numpy().astype(np.uint8), np.ones((2 * SILHOUETTE_MARGIN_PX + 1,) * 2))
    rows, cols = np.nonzero(inside)
    pick = rng.choice(len(rows), size=min(points, len(rows)), replace=False)
    rows, cols = rows[pick], cols[pick]
    triangle = frags_a.triangle_id[0, rows, cols]
    bary = frags_a.bary[0, rows, cols]
    corners = bundle.model.faces[triangle]  # (N, 3)
    target = (screen_b[corners] * bary[..., None]).sum(1)  # the same surface points in frame b: x, y, depth
    col_b = target[:, 0].floor().long().clamp(0, size - 1)
    row_b = target[:, 1].floor().long().clamp(0, size - 1)
    inside_b = ((target[:, :2] >= 0) & (target[:, :2] < size)).all(-1)
    seen = inside_b & frags_b.mask[0, row_b, col_b] & \
        ((target[:, 2] - frags_b.depth[0, row_b, col_b]).abs() < 0.003)
    if not seen.any():
        return np.zeros(0)
    queries = np.moveaxis(uvw_a, 0, -1)[rows, cols][seen.numpy()]
    _, nearest = cKDTree(np.moveaxis(uvw_b, 0, -1).reshape(-1, 3)).query(queries)
    matched = np.stack([nearest % size + 0.5, nearest // size + 0.5], axis=1)
    return np.linalg.norm(matched - target[seen, :2].numpy(), axis=1)


def point_matching(bundle: FlameBundle, noise: OracleNoise, pairs: int, points: int, size: int = 512,
                   seed: int = 0) -> dict[str, float]:
    """PCK@0.05 and mean error (crop pixels) of the oracle with `noise` on frame pairs of a synthetic head
    turning +-80 degrees (pairs 20-60 degrees apart in yaw)."""
    frames = 48
    params = sequence_params(bundle.model, "train", frames, 777 + seed)
    camera = sequence_camera(size)
    oracle = OracleDenseMarks(bundle.model, OracleGroundTruth(params, camera, np.arange(frames), {"synthetic": True}),
                              noise, crop_size=size)
    boxes = head_boxes(bundle.model, camera, params, np.ones(frames, bool), head_vertex_ids(bundle), 1.5)
    yaw = head_yaw_deg(params)
    candidates = [(a, b) for a, b in itertools.permutations(range(frames), 2) if 20 <= abs(yaw[a] - yaw[b]) <= 60]
    rng = np.random.default_rng(seed)
    chosen = [candidates[i] for i in rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False)]
    errors = np.concatenate([pair_errors(bundle, params, camera, oracle, boxes, a, b, points, rng)
                             for a, b in chosen])
    return {"pck_0.05": float((errors < PCK_FRACTION * size).mean()), "mae_px": float(errors.mean()),
            "mae_percent": float(100 * errors.mean() / size), "median_px": float(np.median(errors)),
            "points": int(len(errors))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--points", type=int, default=600, help="query pixels per pair")
    parser.add_argument("--out", default="eval/results/densemarks_calibration")
    args = parser.parse_args()
    if args.pairs < 1 or args.points < 10:
        parser.error("--pairs must be >= 1 and --points >= 10")
    return run_reporting_errors(lambda: calibrate(args))


def calibrate(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    cfg = load_config()
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               SCHEME_MEDIAPIPE, cfg.flame.eyelids)
    rows = []
    for noise_std, blur, dropout in itertools.product((0.01, 0.02, 0.04), (0.002, 0.006), (0.02, 0.04, 0.07)):
        noise = replace(CALIBRATED_NOISE, noise_std=noise_std, blur_fraction=blur, dropout=dropout)
        scores = point_matching(bundle, noise, args.pairs, args.points)
        rows.append({**asdict(noise), **scores})
        print(json.dumps(rows[-1]), flush=True)
    exact = point_matching(bundle, OracleNoise(), args.pairs, args.points)
    calibrated = point_matching(bundle, CALIBRATED_NOISE, args.pairs, args.points)
    best = min(rows, key=lambda r: abs(r["pck_0.05"] - TARGET_PCK) / 0.02 + abs(r["mae_percent"] - TARGET_MAE_PERCENT))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps({"grid": rows, "exact": exact, "best": best,
                                                      "calibrated_noise": {**asdict(CALIBRATED_NOISE), **calibrated}},
                                                     indent=1))
    print(f"exact oracle: {exact}\nbest of the grid: {best}\nCALIBRATED_NOISE now: {calibrated}")


if __name__ == "__main__":
    sys.exit(main())
