"""Calibrate a detector's landmark embedding on FLAME from synthetic renders with exact ground truth.

    python -m eval.calibrate_embedding [--detector mediapipe|dlib] [--sequences N] [--out FILE]

A landmark embedding says where on the FLAME surface each detector point lies. The published ones (SMIRK's
105 MediaPipe points, TF_FLAME's 68) were placed by hand, and the detectors' own idea of, say, the corner of the
mouth sits a few pixels away from them, consistently: a bias no amount of frames averages out, which the fit
then explains with a wrong identity and expression. Here every landmark is moved to the surface point whose
projection best agrees with the detector over many rendered frames of random people, poses and expressions
(robust mean error; frames turned more than MAX_YAW_DEG away are skipped, where points hide). The renders use
faces (FFHQ photos 0 and 9) and seeds that neither the synthetic benchmark nor the hold-out benchmark uses.
Face-outline points are not embedded (they slide along the silhouette, tracker.energy.contour).

For MediaPipe, whose 478 points form a mesh over the whole face, every mesh point the published embedding lacks
is embedded too (except the face oval, which is a silhouette): it has no published position, so its best vertex
is searched over the whole face region before the same refinement. Four times the points pin identity, focal
length and expression down better than the 105 hand-placed ones (README, issue 10's measurements);
`--published-only` keeps the published points alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from eval.run import RESULTS, log
from eval.synthetic.generate import generate_sequence, load_assets, load_ground_truth
from eval.synthetic.scenario import Segment, SequenceSpec
from eval.tracked import head_yaw_deg
from tracker.detect.base import SCHEME_IBUG68, SCHEME_MEDIAPIPE, make_detector
from tracker.detect.sequence import detect_video
from tracker.errors import TrackerError, run_reporting_errors
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import MEDIAPIPE_FACE_OVAL, OUTLINE_POINTS, LandmarkSet

MAX_YAW_DEG = 40.0
"""Frames turned further than this are not used (landmarks there are occluded or guessed)."""
SEARCH_RADIUS_M = 0.02
"""A landmark may move at most this far from its published position."""
BARY_STEPS = 8
"""Barycentric grid resolution when refining inside the triangles around the best vertex."""
CALIBRATION_PHOTOS = (0, 9)
SCHEMES = {"mediapipe": SCHEME_MEDIAPIPE, "dlib": SCHEME_IBUG68}
MEDIAPIPE_MESH_POINTS = 468
"""MediaPipe's face-mesh points (the 10 iris points after them are not on the skin)."""
SEARCH_REGIONS = ("face", "forehead", "nose", "lips", "eye_region")
"""FLAME mask regions searched for the points without a published position (eyeballs excluded)."""


def calibration_specs(count: int) -> tuple[SequenceSpec, ...]:
    """`count` sequences of turns, nods and talking, alternating the two calibration faces."""
    segments = (Segment("turn", 30), Segment("talk", 30), Segment("nod", 20), Segment("talk", 20))
    return tuple(SequenceSpec(f"calib_{i:02d}", segments, photo=CALIBRATION_PHOTOS[i % 2], seed=5000 + i,
                              max_yaw_deg=45.0, fov_deg=float(20 + 5 * (i % 4)), distance_m=0.6 + 0.1 * (i % 5))
                 for i in range(count))


def barycentric_grid(steps: int) -> np.ndarray:
    """(G, 3) barycentric coordinates on a regular grid over a triangle."""
    grid = [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.asarray(grid, np.float64) / steps


def robust_cost(errors: np.ndarray) -> np.ndarray:
    """Cauchy cost of errors (..., F) in face-size units, summed over frames (NaN frames ignored)."""
    scale = 0.02
    return np.nansum(np.log1p((errors / scale) ** 2), axis=-1)


def fit_embedding(frames_vertices: list[np.ndarray], frames_points: list[np.ndarray], published_surface: np.ndarray,
                  faces: np.ndarray, template: np.ndarray, published: np.ndarray, region: np.ndarray,
                  project) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best surface point for each embedded landmark.

    frames_vertices: per frame (V, 3) world vertices; frames_points: per frame (L, 2) detections in embedding
    order (NaN where missing); published_surface: (F, L, 3) the published points on every frame's mesh (NaN for
    points without one); published: (L, 3) their template positions (NaN rows: search all of `region`, (R,)
    vertex ids); project(frame, points (..., 3)) -> (..., 2) pixels. Returns face indices (L,), barycentric
    (L, 3), the robust cost before/after (L, 2; before is NaN without a published point), and each landmark's
    spread (L,): the robust standard deviation of its distance to the calibrated point, in face-size units (how
    far the detector strays from it, by pose, expression and face).
    """
    verts = np.stack(frames_vertices)  # (F, V, 3)
    points = np.stack(frames_points)  # (F, L, 2)
    sizes = np.linalg.norm(np.nanmax(points, 1) - np.nanmin(points, 1), axis=-1)  # (F,)
    L = points.shape[1]
    face_idx = np.zeros(L, np.int64)
    bary = np.zeros((L, 3))
    costs = np.zeros((L, 2))
    grid = barycentric_grid(BARY_STEPS)
    vertex_faces = [[] for _ in range(len(template))]
    for f, tri in enumerate(faces):
        for v in tri:
            vertex_faces[v].append(f)

    def cost_of(surface_points: np.ndarray, l: int) -> np.ndarray:
        """surface_points: (F, K, 3) -> (K,) robust cost of landmark l."""
        pix = np.stack([project(f, surface_points[f]) for f in range(len(verts))])  # (F, K, 2)
        err = np.linalg.norm(pix - points[:, l, None], axis=-1) / sizes[:, None]
        return robust_cost(err.T)

    for l in range(L):
        if np.isfinite(published[l]).all():
            near = np.flatnonzero(np.linalg.norm(template - published[l], axis=1) < SEARCH_RADIUS_M)
        else:
            near = region
        best_vertex = near[np.argmin(cost_of(verts[:, near], l))]
        candidates = [(f, g) for f in vertex_faces[best_vertex] for g in grid]
        tri = faces[[f for f, _ in candidates]]  # (K, 3)
        weights = np.stack([g for _, g in candidates])  # (K, 3)
        surface = (verts[:, tri] * weights[None, :, :, None]).sum(2)  # (F, K, 3)
        cost = cost_of(surface, l)
        k = int(np.argmin(cost))
        face_idx[l], bary[l] = candidates[k][0], weights[k]
        before = float(cost_of(published_surface[:, l, None], l)[0]) if np.isfinite(published[l]).all() else np.nan
        costs[l] = (before, float(cost[k]))
    spread = np.zeros(L)
    for l in range(L):
        surface = (verts[:, faces[face_idx[l]]] * bary[l][None, :, None]).sum(1)  # (F, 3)
        pix = np.stack([project(f, surface[f][None])[0] for f in range(len(verts))])
        err = np.linalg.norm(pix - points[:, l], axis=-1) / sizes
        spread[l] = 1.4826 * np.nanmedian(np.abs(err[np.isfinite(err)]))
    return face_idx, bary, costs, spread


def published_positions(verts: np.ndarray, landmarks: LandmarkSet, l: int) -> np.ndarray:
    """(F, 3) the published embedding's landmark l on every frame's mesh."""
    ids = landmarks.vertex_ids.numpy()[landmarks.corners[l].numpy()]
    return (verts[:, ids] * landmarks.bary[l].numpy()[None, :, None]).sum(1)


def unpublished_points(detector: str, published_index: np.ndarray) -> np.ndarray:
    """Detector points to embed beyond the published ones: MediaPipe's other mesh points, face oval aside."""
    if detector != "mediapipe":
        return np.zeros(0, np.int64)
    skip = set(published_index.tolist()) | set(MEDIAPIPE_FACE_OVAL)
    return np.array([i for i in range(MEDIAPIPE_MESH_POINTS) if i not in skip], np.int64)


def calibrate(detector: str, count: int, out: Path, cache: Path, with_sigma: bool = False,
              published_only: bool = False) -> Path:
    scheme = SCHEMES[detector]
    assets = load_assets(cache)
    bundle = load_flame_bundle(None, None, assets.bundle.model.n_shape, assets.bundle.model.n_expr, scheme)
    model, landmarks = bundle.model, bundle.landmarks
    faces = model.faces.numpy()
    extra = np.zeros(0, np.int64) if published_only else unpublished_points(detector, landmarks.detector_index.numpy())
    detector_index = np.concatenate([landmarks.detector_index.numpy(), extra])
    embedded = ~np.isin(detector_index, OUTLINE_POINTS[scheme])
    n_published = landmarks.n_landmarks
    frames_vertices, frames_points, cameras = [], [], []
    for spec in calibration_specs(count):
        log(f"calibration sequence {spec.name}")
        sequence = generate_sequence(spec, assets, cache / "calibration")
        gt = load_ground_truth(sequence.ground_truth)
        det = make_detector(detector)
        try:
            track = detect_video(sequence.video, det, cache_dir=cache / "calibration_detections")
        finally:
            if hasattr(det, "close"):
                det.close()
        with torch.no_grad():
            vertices = model(gt.params).vertices.numpy()
        usable = track.valid & (np.abs(head_yaw_deg(gt.params)) < MAX_YAW_DEG)
        for t in np.flatnonzero(usable):
            frames_vertices.append(vertices[t])
            frames_points.append(track.points[t][detector_index])
            cameras.append(gt.camera)
    if not frames_vertices:
        raise TrackerError(f"no usable calibration frame: {detector} found no face within {MAX_YAW_DEG:.0f} "
                           "degrees of frontal in the renders")
    log(f"{len(frames_vertices)} frames")

    def project(f: int, pts: np.ndarray) -> np.ndarray:
        return cameras[f].project(torch.from_numpy(pts).float())[0].numpy()

    template = model.v_template.numpy().astype(np.float64)
    verts = np.stack(frames_vertices)
    unknown = np.full((len(extra), 3), np.nan)
    published = np.concatenate([np.stack([published_positions(template[None], landmarks, l)[0]
                                          for l in range(n_published)]), unknown])
    on_frames = np.stack([published_positions(verts, landmarks, l) for l in range(n_published)], 1)
    published_surface = np.concatenate([on_frames, np.broadcast_to(unknown, (len(verts), *unknown.shape))], 1)
    eyeballs = np.concatenate([bundle.masks["left_eyeball"], bundle.masks["right_eyeball"]])
    region = np.setdiff1d(np.concatenate([bundle.masks[name] for name in SEARCH_REGIONS]), eyeballs)
    face_idx, bary, costs, spread = fit_embedding(frames_vertices, frames_points, published_surface, faces, template,
                                                  published, region, project)
    placed = (template[faces[face_idx]] * bary[..., None]).sum(1)
    moved = np.linalg.norm(placed[:n_published] - published[:n_published], axis=1)
    known = embedded[:n_published]
    log(f"landmark spread (face-size units): median {np.median(spread[embedded]):.4f}, "
        f"range {spread[embedded].min():.4f}..{spread[embedded].max():.4f}")
    log(f"published points: robust cost {costs[:n_published][known, 0].sum():.1f} -> "
        f"{costs[:n_published][known, 1].sum():.1f}; moved by {1000 * np.median(moved[known]):.1f} mm (median), "
        f"{1000 * moved[known].max():.1f} mm (max); {len(extra)} more mesh points embedded")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each point's spread as its landmark_sigma (inverse-variance weights in the fit) only on request: on the
    # hold-out benchmark it helped the renderer it was measured on and hurt the other (yaw sweep 3.51 -> 3.71 mm).
    sigma = {"landmark_sigma": np.where(embedded, spread, spread[embedded].max()).astype(np.float32)} if with_sigma else {}
    np.savez(out, lmk_face_idx=face_idx, lmk_b_coords=bary.astype(np.float32),
             landmark_indices=detector_index, calibrated=embedded,
             frames=np.int64(len(frames_vertices)), **sigma)
    log(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.calibrate_embedding", description=__doc__.split("\n")[0])
    parser.add_argument("--detector", choices=sorted(SCHEMES), default="mediapipe")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences of 100 frames")
    parser.add_argument("--out", help="output .npz (default: eval/results/calibration/<detector>_embedding.npz)")
    parser.add_argument("--sigma", action="store_true", help="also write each point's spread as landmark_sigma")
    parser.add_argument("--published-only", action="store_true",
                        help="MediaPipe: calibrate the published points only, without the rest of the mesh")
    args = parser.parse_args(argv)
    if args.sequences < 1:
        parser.error("--sequences must be >= 1")
    out = Path(args.out) if args.out else RESULTS / "calibration" / f"{args.detector}_embedding.npz"
    return run_reporting_errors(lambda: calibrate(args.detector, args.sequences, out, RESULTS / "cache", args.sigma,
                                                   args.published_only))


if __name__ == "__main__":
    sys.exit(main())
