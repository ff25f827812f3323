"""Dense-correspondence accuracy of uvw predictors (DensePose-style) on the synthetic sequences.

Every face-region pixel of a frame shows a known surface point: the ground-truth mesh is rasterised and the
pixel's vertex is the corner of its triangle with the largest barycentric weight. A predictor's uvw at that
pixel is matched to the vertex whose canonical coordinates are nearest (the predictor's canonical map), and the
error is the geodesic distance on the neutral template between the matched and the true vertex, in mm.
Reported per predictor: the ratio of correct points at 5, 10 and 20 mm and GPS = mean exp(-g^2 / 2 kappa^2)
with kappa = 10 mm (eval.metrics).

Predictors: the DenseMarks network (needs its weights and a canonical map made for them) and the tracker's
evaluation-only oracle with controlled degradations, which calibrates the measure: a known error goes in,
its score comes out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from eval.metrics import correct_point_ratio, geodesic_distances, geodesic_point_similarity
from eval.synthetic.generate import GroundTruth
from eval.synthetic.render import faces_in_region, region_mask, screen_vertices
from tracker.densemarks.canonical import load_canonical_map
from tracker.densemarks.oracle import CALIBRATED_NOISE, OracleDenseMarks, OracleNoise, load_oracle_ground_truth
from tracker.densemarks.predict import CropBox, DenseMarksPredictor, UvwPrediction, apply_affine
from tracker.densemarks.weights import resolve_weights_path
from tracker.errors import TrackerError
from tracker.flame.model import FlameModel
from tracker.render import RasterSettings, rasterize

M_TO_MM = 1000.0


@dataclass(frozen=True)
class DenseOptions:
    frames: int = 8
    """Frames scored per sequence (evenly spread)."""
    pixels: int = 2000
    """Face pixels sampled per frame."""
    thresholds_mm: tuple[float, ...] = (5.0, 10.0, 20.0)
    kappa_mm: float = 10.0
    crop_scale: float = 1.5
    """Crop side over the side of the face's bounding square."""
    seed: int = 0


@dataclass(frozen=True)
class UvwPredictor:
    """A uvw map source: predict(video frame index, RGB frame, crop box), and the (V, 3) canonical
    coordinates of each vertex in the predictor's cube."""

    name: str
    predict: Callable[[int, np.ndarray, CropBox], UvwPrediction]
    canonical: np.ndarray


class GeodesicTable:
    """Geodesic distances (mm) on the neutral template from every face vertex to every vertex."""

    def __init__(self, model: FlameModel, face_ids: np.ndarray):
        self.row_of = np.full(model.n_vertices, -1)
        self.row_of[face_ids] = np.arange(len(face_ids))
        self.distances = M_TO_MM * geodesic_distances(model.v_template, model.faces, face_ids).astype(np.float32)

    def __call__(self, true_vertex: np.ndarray, matched_vertex: np.ndarray) -> np.ndarray:
        return self.distances[self.row_of[true_vertex], matched_vertex]


def face_box(pixels: np.ndarray, scale: float) -> CropBox:
    """Square crop around (N, 2) pixel positions (OpenCV convention), `scale` times their bounding square."""
    low, high = pixels.min(0), pixels.max(0)
    size = float((high - low).max() * scale)
    centre = (low + high) / 2
    return CropBox(float(centre[0] - size / 2), float(centre[1] - size / 2), size)


def sample_uvw(prediction: UvwPrediction, pixels: np.ndarray) -> np.ndarray:
    """Bilinear uvw at (N, 2) frame pixels (OpenCV convention: pixel centres at integers) -> (N, 3)."""
    crop = apply_affine(prediction.frame_to_crop, pixels)
    return np.stack([map_coordinates(channel, [crop[:, 1], crop[:, 0]], order=1, mode="nearest")
                     for channel in prediction.uvw], axis=1)


@torch.no_grad()
def frame_errors(predictor: UvwPredictor, gt: GroundTruth, row: int, frame: np.ndarray, model: FlameModel,
                 face_ids: np.ndarray, candidates: np.ndarray, geodesics: GeodesicTable, options: DenseOptions,
                 rng: np.random.Generator) -> np.ndarray:
    """Geodesic errors (mm) of the predictor's correspondences at sampled face pixels of one frame."""
    vertices = model(gt.params.frames(slice(row, row + 1))).vertices[0]
    screen = screen_vertices(vertices, gt.camera)
    fragments = rasterize(screen, model.faces, RasterSettings((gt.camera.height, gt.camera.width)))
    mask = region_mask(fragments.triangle_id[0], faces_in_region(model.faces, face_ids)).numpy()
    rows, cols = np.nonzero(mask)
    pick = rng.choice(len(rows), size=min(options.pixels, len(rows)), replace=False)
    rows, cols = rows[pick], cols[pick]
    triangle = fragments.triangle_id[0, rows, cols]
    corner = fragments.bary[0, rows, cols].argmax(-1)
    true_vertex = model.faces[triangle, corner].numpy()
    pixels = np.stack([cols, rows], axis=1).astype(np.float64)  # OpenCV convention: centres at integers
    face_pixels = screen[0, face_ids, :2].numpy() - 0.5
    prediction = predictor.predict(int(row), frame, face_box(face_pixels, options.crop_scale))
    _, nearest = cKDTree(predictor.canonical[candidates]).query(sample_uvw(prediction, pixels))
    return geodesics(true_vertex, candidates[nearest])


def dense_scores(predictor: UvwPredictor, gt: GroundTruth, frames: dict[int, np.ndarray], model: FlameModel,
                 face_ids: np.ndarray, candidates: np.ndarray, geodesics: GeodesicTable,
                 options: DenseOptions) -> np.ndarray:
    """Geodesic errors (mm) over the given frames ({row: RGB frame}) of one sequence, concatenated."""
    rng = np.random.default_rng(options.seed)
    return np.concatenate([frame_errors(predictor, gt, row, frame, model, face_ids, candidates, geodesics,
                                        options, rng) for row, frame in sorted(frames.items())])


def summarise(errors_mm: np.ndarray, options: DenseOptions) -> dict[str, float]:
    """PCK-style ratios at the thresholds, GPS and the number of points."""
    ratios = correct_point_ratio(errors_mm, options.thresholds_mm)
    return {**{f"pck_{t:g}mm": float(r) for t, r in zip(options.thresholds_mm, ratios, strict=True)},
            "gps": geodesic_point_similarity(errors_mm, options.kappa_mm), "median_mm": float(np.median(errors_mm)),
            "points": float(len(errors_mm))}


ORACLES = {"oracle_exact": OracleNoise(), "oracle_calibrated": CALIBRATED_NOISE}
"""Calibration predictors: the exact oracle (the measure's ceiling: pixels snap to the nearest vertex), and one
with per-pixel noise, blur, 5 % outliers and a small systematic bias (cube units; the cube spans the whole
head, about 25 cm, so 0.02 is about 5 mm)."""


def oracle_predictor(name: str, model: FlameModel, ground_truth: Path, noise: OracleNoise) -> UvwPredictor:
    """The tracker's evaluation-only oracle on one synthetic sequence, degraded by `noise`."""
    oracle = OracleDenseMarks(model, load_oracle_ground_truth(ground_truth), noise)
    return UvwPredictor(name, lambda index, _rgb, box: oracle.predict(index, box), oracle.exact_uvw.cpu().numpy())


def network_predictor(weights: str | None, canonical_map: str | None, n_vertices: int,
                      device: str = "cpu") -> UvwPredictor:
    """The DenseMarks network with a canonical map made for it; MissingAssetError/TrackerError if either is
    missing (weights are looked up offline only)."""
    if not canonical_map:
        raise TrackerError("no canonical map for the DenseMarks network (pass --canonical-map: a map saved by a "
                           "tracker run, densemarks_canonical_map.npz)")
    predictor = DenseMarksPredictor.from_weights(resolve_weights_path(weights, offline=True), device)
    return UvwPredictor("densemarks", lambda _index, rgb, box: predictor.predict(rgb, box),
                        load_canonical_map(canonical_map, n_vertices).coords)
