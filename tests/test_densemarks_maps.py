"""Canonical maps across videos and the oracle's ground truth: per-network maps built from tracked clips and loaded
by default, the oracle honouring the extrinsics of its ground-truth file, and the oracle's point-matching score
(what calibrates its noise to the real network)."""

import json

import numpy as np
import pytest
import torch

from eval.densemarks_calibration import point_matching
from tests.test_densemarks_energy import (  # noqa: F401  (shared fixtures and helpers)
    CROP,
    SIZE,
    boxes_for,
    bundle,
    one_thread,
    oracle_for,
    sweep_params,
)
from tracker.camera import WORLD_TO_CAMERA, Camera
from tracker.config import load_config
from tracker.densemarks import build_map
from tracker.densemarks.canonical import load_canonical_map
from tracker.densemarks.oracle import (
    CALIBRATED_NOISE,
    OracleDenseMarks,
    OracleNoise,
    in_tracker_world,
    load_oracle_ground_truth,
    template_cube_coordinates,
)
from tracker.densemarks.predict import UvwCache
from tracker.densemarks.stage import oracle_source, run_densemarks_stage
from tracker.energy.base import Observations
from tracker.errors import TrackerError
from tracker.fit.sequence import TrackResult
from tracker.fit.solver import Problem
from tracker.io.export import FrameTable, flame_arrays, write_params


def write_npz(path, params, camera, metadata, **replaced):
    """A ground-truth file in the export format, some arrays replaced (R, t, K)."""
    T = params.batch_size
    arrays = flame_arrays(FrameTable(params, np.arange(T), np.arange(T) / 25.0, np.ones(T, bool),
                                     np.zeros(T, np.float32)), camera, 25.0)
    arrays.update(replaced)
    np.savez(path, metadata=np.array(json.dumps(metadata)), **arrays)
    return path


def test_oracle_honours_the_extrinsics_of_its_ground_truth(bundle, tmp_path):
    """The same sequence written with R = I (the axis flip folded into the FLAME rotation) gives the same maps as
    with the tracker's own R = diag(1, -1, -1); R that are not rotations and K the tracker cannot represent are
    refused with one line."""
    params = sweep_params(bundle.model, [-30.0, 0.0, 40.0], [5.0, 0.0, -8.0], seed=4)
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    standard = write_npz(tmp_path / "standard.npz", params, camera, {"synthetic": True})
    # R = I: the head itself carries the flip (moved by W, so that W applied once more gives the original).
    flipped_params = in_tracker_world(bundle.model, params, np.repeat(np.eye(3)[None], 3, 0), None)
    assert not torch.allclose(flipped_params.rotation, params.rotation)
    identity = write_npz(tmp_path / "identity.npz", flipped_params, camera, {"synthetic": True},
                         R=np.repeat(np.eye(3, dtype=np.float32)[None], 3, 0))
    boxes = boxes_for(bundle, camera, params)
    maps = []
    for path in (standard, identity):
        oracle = OracleDenseMarks(bundle.model, load_oracle_ground_truth(path), OracleNoise(), crop_size=CROP)
        maps.append(np.stack([oracle.predict(t, boxes[t]).uvw for t in range(3)]))
    assert np.abs(maps[0] - maps[1]).max() < 1e-3
    mirror = np.repeat(np.diag([1.0, 1.0, -1.0]).astype(np.float32)[None], 3, 0)
    with pytest.raises(TrackerError, match="not rotations"):
        load_oracle_ground_truth(write_npz(tmp_path / "mirror.npz", params, camera, {"synthetic": True}, R=mirror))
    K = np.repeat(camera.opencv_intrinsics().numpy()[None], 3, 0)
    K[1, 0, 0] *= 1.1
    with pytest.raises(TrackerError, match="intrinsics"):
        load_oracle_ground_truth(write_npz(tmp_path / "zoom.npz", params, camera, {"synthetic": True}, K=K))
    assert np.allclose(WORLD_TO_CAMERA.numpy(), np.load(standard)["R"][0])


def test_point_matching_calibrates_the_oracle(bundle):
    """Exact maps match points to within a pixel; the calibrated degradations lose about a tenth of the matches
    (PCK@0.05 near the network's 0.90 at the network's 512-pixel crop; a little higher at 256)."""
    exact = point_matching(bundle, OracleNoise(), pairs=2, points=150, size=256)
    calibrated = point_matching(bundle, CALIBRATED_NOISE, pairs=2, points=150, size=256)
    assert exact["pck_0.05"] > 0.99 and exact["median_px"] < 1.0
    assert 0.75 < calibrated["pck_0.05"] < 0.97 and calibrated["median_px"] > 2 * exact["median_px"]


def fake_run(bundle, run_dir, params, camera, noise=OracleNoise(), map_key="oracle"):
    """A tracker output folder as the DenseMarks stage leaves it: parameters, summary, prediction cache."""
    T = params.batch_size
    run_dir.mkdir(parents=True)
    write_params(run_dir / "flame_params.npz", FrameTable(params, np.arange(T), np.arange(T) / 25.0,
                                                          np.ones(T, bool), np.zeros(T, np.float32)), camera, 25.0,
                 {"tool": "tracker"})
    oracle, _ = oracle_for(bundle, params, noise)
    cache = UvwCache(run_dir / "cache", oracle.model_id, CROP)
    for t, box in enumerate(boxes_for(bundle, camera, params)):
        cache.put(t, oracle.predict(t, box))
    dense = {"ran": True, "cache_dir": str(cache.directory), "model_id": oracle.model_id, "crop_size": CROP,
             "map_key": map_key}
    (run_dir / "summary.json").write_text(json.dumps({"stages": {"densemarks": dense}}))
    return run_dir


def test_network_map_from_tracked_clips_is_loaded_by_default(bundle, tmp_path, capsys):
    """Two clips of two people (their fits exact here) give the oracle's cube coordinates; the stage then loads
    that map from densemarks.maps_dir instead of estimating one; clips of different predictors are refused."""
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    runs = [fake_run(bundle, tmp_path / f"run{i}", sweep_params(bundle.model, yaws, np.zeros(len(yaws)), seed=i),
                     camera) for i, yaws in enumerate(([-60.0, -20.0, 20.0, 60.0], [-75.0, 0.0, 75.0]))]
    maps_dir = tmp_path / "maps"
    assert build_map.main([str(r) for r in runs] + ["--frames-per-clip", "4", "--config", str(write_maps_config(
        tmp_path, maps_dir))]) == 0
    cmap = load_canonical_map(maps_dir / "oracle.npz", bundle.model.n_vertices)
    exact = template_cube_coordinates(bundle.model.v_template).numpy()
    assert cmap.observed.mean() > 0.35  # both sides of the head; the rest from the affine image of the template
    assert np.median(np.abs(cmap.coords - exact)[cmap.observed]) < 0.002
    assert np.median(np.abs(cmap.coords - exact)) < 0.005
    assert "2 clips" in capsys.readouterr().out

    params = sweep_params(bundle.model, [-20.0, 0.0, 20.0], np.zeros(3), seed=9)
    oracle, _ = oracle_for(bundle, params)
    cfg = load_config(overrides={"densemarks": {"maps_dir": str(maps_dir), "identity": False},
                                 "energy": {"dense_corr": {"vertices": 300, "search_resolution": CROP}}})
    problem = Problem(bundle.model, bundle.landmarks, Camera.from_image(SIZE, SIZE, fov_deg=30), [])
    obs = Observations(torch.zeros(3, len(bundle.landmarks.vertex_ids), 2), torch.zeros(3, 1), torch.full((3,), 60.0))
    result = TrackResult(params, float(camera.focal), np.ones(3, bool), np.ones(3, np.float32), np.zeros(3, bool))
    _, info = run_densemarks_stage(problem, result, obs, np.arange(3), lambda: iter(()), bundle, cfg, tmp_path / "out",
                                   source=oracle_source(oracle))
    assert info["map_source"] == f"per-network {maps_dir / 'oracle.npz'}"

    other = fake_run(bundle, tmp_path / "other", params, camera, map_key="densemarks-0123456789abcdef")
    assert build_map.main([str(runs[0]), str(other), "--out", str(tmp_path / "mixed.npz")]) == 1
    assert "different predictors" in capsys.readouterr().err


def write_maps_config(tmp_path, maps_dir):
    path = tmp_path / "maps.yaml"
    path.write_text(f"densemarks: {{maps_dir: {maps_dir}}}\n")
    return path
