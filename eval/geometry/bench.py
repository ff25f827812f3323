"""Speed of the geometry metrics on the FLAME template: python -m eval.geometry.bench [--points N]

Measures exact closest-point queries (points near the surface, as in a scan-to-mesh error) and one NoW
evaluation (landmark alignment + refinement) of a synthetic scan in mm with 2 mm landmark noise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from eval import SHARED_DATA
from eval.geometry.mesh_distance import SurfaceIndex
from eval.geometry.mesh_io import load_ply
from eval.geometry.now import NowOptions, now_scan_to_mesh_errors

TEMPLATE = SHARED_DATA / "assets" / "flame" / "template.ply"
# Rough positions (m) of NoW's 7 landmarks on the FLAME template: eye corners, nose bottom, mouth corners.
NOW_POINTS_ON_TEMPLATE = np.array([[-0.045, 0.021, 0.027], [-0.018, 0.020, 0.035], [0.018, 0.020, 0.036],
                                   [0.046, 0.021, 0.028], [0.0, -0.022, 0.060], [-0.024, -0.044, 0.047],
                                   [0.024, -0.044, 0.047]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=30000, help="scan points per query")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="a triangle mesh in metres (.ply)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vertices, faces = load_ply(args.template)
    triangles = vertices[faces]
    face_ids = rng.integers(0, len(faces), args.points)
    on_surface = np.einsum("nc,ncd->nd", rng.dirichlet([1.0, 1.0, 1.0], args.points), triangles[face_ids])

    start = time.perf_counter()
    index = SurfaceIndex(vertices, faces)
    print(f"index of {len(faces)} triangles: {time.perf_counter() - start:.3f} s")
    for noise_mm in (0.0, 1.0, 3.0):
        points = on_surface + rng.normal(scale=noise_mm / 1000.0, size=on_surface.shape)
        start = time.perf_counter()
        index.project(points)
        print(f"{args.points} points, {noise_mm:.0f} mm off the surface: {time.perf_counter() - start:.3f} s")

    scan = 1000.0 * on_surface[on_surface[:, 2] > 0.0]  # the face side, in mm
    landmarks = index.project(NOW_POINTS_ON_TEMPLATE).points
    noisy = landmarks + rng.normal(scale=0.002, size=landmarks.shape)
    for refine in (False, True):
        start = time.perf_counter()
        result = now_scan_to_mesh_errors(scan, 1000.0 * landmarks, vertices, faces, noisy, NowOptions(refine=refine))
        print(f"NoW, refine={refine}: {len(result.distances_mm)} scan points, median "
              f"{np.median(result.distances_mm):.4f} mm, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
