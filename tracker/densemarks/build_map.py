"""Build a predictor's per-network canonical map from tracked clips.

    python -m tracker.densemarks.build_map RUN_DIR [RUN_DIR ...] [--out MAP.npz] [--frames-per-clip 40]

The DenseMarks network predicts points of one canonical cube whatever the video, so the cube coordinate of each
FLAME vertex (the canonical map) is a property of the network, not of a video: estimated once from many clips
(many people, poses and views), it serves every later video (the DenseMarks stage loads it by default from
densemarks.maps_dir) instead of a map estimated from the video's own landmark fits, which inherits their errors.

RUN_DIR: an output folder of `python -m tracker.run` in which the DenseMarks stage ran (flame_params.npz,
summary.json, and the prediction cache the summary names). Every clip must come from the same predictor. The map
is written to --out, by default where the stage looks for it (<maps_dir>/<predictor>.npz), with a PNG beside it.
Fits of a monocular tracker carry its own systematic errors (the detector's landmark offsets move the head on
the image by a little); clips with accurate geometry (multi-view or ground truth) give the most exact map.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tracker.config import load_config
from tracker.densemarks.canonical import (
    CanonicalMapOptions,
    MapClip,
    estimate_map_from_clips,
    network_map_path,
    save_canonical_map,
    write_canonical_png,
)
from tracker.densemarks.predict import UvwCache
from tracker.detect.base import SCHEME_MEDIAPIPE
from tracker.errors import TrackerError, run_reporting_errors
from tracker.fit.sequence import evenly_spaced
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameModel
from tracker.io.export import camera_from_arrays, params_from_arrays, read_params


def read_clip(run_dir: Path, model: FlameModel, frames: int) -> tuple[MapClip, dict]:
    """Up to `frames` valid frames (spread over the clip) of one tracker run with their cached predictions, and
    the run's DenseMarks report; TrackerError when the run has no DenseMarks stage or its cache is gone."""
    summary_path, params_path = run_dir / "summary.json", run_dir / "flame_params.npz"
    if not (summary_path.is_file() and params_path.is_file()):
        raise TrackerError(f"{run_dir} is not a tracker output folder (summary.json and flame_params.npz)")
    dense = json.loads(summary_path.read_text()).get("stages", {}).get("densemarks", {})
    if not dense.get("ran") or not dense.get("cache_dir"):
        raise TrackerError(f"{run_dir}: the DenseMarks stage did not run there (or predates prediction caches in "
                           "the summary): track the clip with DenseMarks on")
    arrays, _ = read_params(params_path)
    params = params_from_arrays(arrays, model.n_shape, model.n_expr)
    cache = UvwCache.existing(Path(dense["cache_dir"]), dense["model_id"], int(dense["crop_size"]))
    rows = evenly_spaced(np.flatnonzero(arrays["valid"]), frames)
    predictions = [cache.get(int(arrays["frame_index"][row])) for row in rows]
    if any(p is None for p in predictions):
        raise TrackerError(f"{run_dir}: DenseMarks predictions missing from {cache.directory}: re-run the clip")
    return MapClip(camera_from_arrays(arrays), params.frames(torch.as_tensor(rows)), predictions), dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracker.densemarks.build_map", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="tracker output folders (DenseMarks stage ran)")
    parser.add_argument("--out", help="map file to write (default: <maps_dir>/<predictor>.npz)")
    parser.add_argument("--frames-per-clip", type=int, default=40, help="frames used per clip (spread out)")
    parser.add_argument("--config", help="YAML config (FLAME model, densemarks.maps_dir, map_affine_prior)")
    args = parser.parse_args(argv)
    if args.frames_per_clip < 1:
        parser.error("--frames-per-clip must be >= 1")
    return run_reporting_errors(lambda: build(args))


def build(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               SCHEME_MEDIAPIPE, cfg.flame.eyelids)
    clips, keys = [], set()
    for run in tqdm(args.runs, desc="clips", unit="clip"):
        clip, dense = read_clip(Path(run), bundle.model, args.frames_per_clip)
        clips.append(clip)
        keys.add(dense.get("map_key", ""))
    if len(keys) != 1 or not next(iter(keys)):
        raise TrackerError(f"the clips come from different predictors ({sorted(keys)}): a map serves one network")
    key = keys.pop()
    out = Path(args.out) if args.out else network_map_path(cfg.densemarks.maps_dir, key)
    if out is None:
        raise TrackerError("densemarks.maps_dir is '' (no per-network maps): pass --out")
    cmap = estimate_map_from_clips(bundle.model, clips, CanonicalMapOptions(affine_prior=cfg.densemarks.map_affine_prior),
                                   {"predictor": key, "runs": [str(r) for r in args.runs]})
    save_canonical_map(out, cmap)
    png = write_canonical_png(out.with_suffix(".png"), bundle.model, cmap)
    frames = sum(clip.params.batch_size for clip in clips)
    print(f"map of {key} from {len(clips)} clips ({frames} frames, {100 * cmap.observed.mean():.0f}% of vertices "
          f"seen): {out} ({png.name})")


if __name__ == "__main__":
    sys.exit(main())
