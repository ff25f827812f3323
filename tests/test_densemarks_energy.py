"""DenseMarks energies and stage: canonical map estimation, the two dense terms, the oracle's refusal of real
data, map files, and the stage end to end on a tiny synthetic sequence (oracle predictions)."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.config import load_config
from tracker.densemarks.canonical import (
    CanonicalMap,
    CanonicalMapOptions,
    crop_affine,
    diffuse_unknown,
    estimate_canonical_map,
    load_canonical_map,
    save_canonical_map,
    vertex_graph,
    weighted_median,
    write_canonical_png,
)
from tracker.densemarks.oracle import (
    OracleDenseMarks,
    OracleGroundTruth,
    OracleNoise,
    check_oracle_allowed,
    template_cube_coordinates,
)
from tracker.densemarks.predict import CropBox, frame_to_crop_affine
from tracker.densemarks.frames import prepare_frame, refresh_gates
from tracker.densemarks.stage import choose_source, head_boxes, head_vertex_ids, run_densemarks_stage
from tracker.energy.base import Observations
from tracker.energy.dense import (
    DenseCorrespondenceConfig,
    DenseCorrespondenceEnergy,
    DenseRenderConfig,
    DenseRenderEnergy,
    correspondence_vertices,
)
from tracker.energy.landmarks import LandmarkEnergy, LandmarkEnergyConfig
from tracker.energy.priors import PriorConfig, PriorEnergy
from tracker.errors import TrackerError
from tracker.fit.sequence import TrackResult, landmark_error_px
from tracker.fit.solver import LANDMARK_FIELDS, Problem, fit_adam, fit_lm, torch_threads
from tracker.flame.assets import load_flame_bundle
from tracker.flame.lbs import batch_rodrigues
from tracker.flame.model import FlameParams
from tracker.io.export import FrameTable, write_params

SIZE = 160
"""Video side (pixels) of the synthetic frames."""
CROP = 128
"""Side of the oracle's uvw maps."""


@pytest.fixture(autouse=True)
def one_thread():
    """Mesh-sized tensor work, as in the stage: one thread (extra ones only wait on each other)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bundle():
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 100, 50, "mediapipe478")


def sweep_params(model, yaws_deg, pitches_deg, seed: int = 0) -> FlameParams:
    """Frames of one random identity at the given yaws and pitches, 0.7 m from the camera, slight smile."""
    g = torch.Generator().manual_seed(seed)
    count = len(yaws_deg)
    params = FlameParams.zeros(count, model.n_shape, model.n_expr)
    params.shape = torch.randn(1, model.n_shape, generator=g) * 0.5
    params.rotation = torch.tensor(
        Rotation.from_euler("YX", np.stack([yaws_deg, pitches_deg], 1), degrees=True).as_rotvec(), dtype=torch.float32)
    params.translation = torch.tensor([0.0, 0.02, -0.7]).repeat(count, 1)
    params.expr[:, 33] = 0.4
    return params


def oracle_for(bundle, params, noise: OracleNoise | None = None, crop_size: int = CROP):
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    truth = OracleGroundTruth(params, camera, np.arange(params.batch_size), {"synthetic": True})
    return OracleDenseMarks(bundle.model, truth, noise or OracleNoise(), crop_size=crop_size), camera


def boxes_for(bundle, camera, params):
    return head_boxes(bundle.model, camera, params, np.ones(params.batch_size, bool), head_vertex_ids(bundle), 1.5)


def rotation_error_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    rel = batch_rodrigues(a).transpose(1, 2) @ batch_rodrigues(b)
    return math.degrees(math.acos(float(((rel[0].trace() - 1) / 2).clamp(-1, 1))))


def head_rotation_error_deg(a: FlameParams, b: FlameParams) -> float:
    """Angle between the head orientations (global then neck rotation) of two single-frame parameter sets."""
    head = [batch_rodrigues(p.rotation) @ batch_rodrigues(p.neck_pose) for p in (a, b)]
    return math.degrees(math.acos(float((((head[0].transpose(1, 2) @ head[1])[0].trace() - 1) / 2).clamp(-1, 1))))


def perturbed(params: FlameParams, degrees: float) -> FlameParams:
    """params with the head turned by `degrees` about a tilted axis and moved 2.4 cm."""
    axis = np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2])
    turned = Rotation.from_rotvec(axis * math.radians(degrees)) * Rotation.from_rotvec(params.rotation.numpy())
    out = params.detach()
    out.rotation = torch.tensor(turned.as_rotvec(), dtype=torch.float32)
    out.translation = out.translation + torch.tensor([0.01, -0.01, 0.02])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Building blocks with analytic answers
# ---------------------------------------------------------------------------------------------------------------


def test_crop_affine_matches_the_predictor_convention():
    """A frame pixel centre (integer in OpenCV terms, +0.5 in the tracker's) lands on the same crop point."""
    box = CropBox(10.0, 20.0, 64.0)
    to_crop = frame_to_crop_affine(box, 128)
    point_opencv = np.array([[30.0, 50.0]])
    expected = point_opencv @ to_crop[:, :2].T + to_crop[:, 2] + 0.5  # crop point, tracker convention
    ours = crop_affine(to_crop, 0.5)  # the crop at half resolution
    np.testing.assert_allclose((point_opencv + 0.5) @ ours[:, :2].T + ours[:, 2], 0.5 * expected, atol=1e-9)
    # The box's top-left corner is the crop's origin; its far corner the crop's far corner.
    np.testing.assert_allclose(ours @ np.array([10.0, 20.0, 1.0]), [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(ours @ np.array([74.0, 84.0, 1.0]), [64.0, 64.0], atol=1e-9)


def test_weighted_median_and_diffusion():
    values = np.array([[[1.0], [2.0], [10.0]], [[5.0], [0.0], [7.0]]])
    weights = np.array([[1.0, 1.0, 0.5], [0.0, 0.0, 2.0]])
    np.testing.assert_allclose(weighted_median(values, weights), [[2.0], [7.0]])
    # Harmonic fill on a chain is linear interpolation between the known ends.
    chain = np.array([[i, i + 1, i + 1] for i in range(5)])
    graph = vertex_graph(np.zeros((6, 3)), chain, spatial_neighbours=0)
    known = np.array([True, False, False, False, False, True])
    filled = diffuse_unknown(np.array([[0.0], [9], [9], [9], [9], [1.0]]), known, graph)
    np.testing.assert_allclose(filled[:, 0], np.linspace(0, 1, 6), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Canonical map
# ---------------------------------------------------------------------------------------------------------------


def test_canonical_map_recovers_the_oracles_coordinates(bundle):
    """Maps of 256 pixels (the stage's sampling resolution; at 128 the ears' folds are under two pixels wide).

    Free map (no affine prior), oracle maps carrying a systematic bias (what a real net's map would hold): the
    estimate matches the coordinates painted on every vertex seen at least once with reliability >= 0.3.
    Default map (affine prior) on unbiased maps, whose truth is an affine image of the template: every vertex,
    seen or not, is recovered."""
    yaws = np.array([-75, -50, -25, 0, 25, 50, 75, -10, 10], np.float64)
    pitches = np.array([10, -15, 20, -20, 15, -10, 20, 30, -30], np.float64)
    params = sweep_params(bundle.model, yaws, pitches)
    oracle, camera = oracle_for(bundle, params, OracleNoise(bias_amplitude=0.02, seed=3), crop_size=256)
    boxes = boxes_for(bundle, camera, params)
    cmap = estimate_canonical_map(bundle.model, camera, params, [oracle.predict(t, box) for t, box in enumerate(boxes)],
                                  options=CanonicalMapOptions(affine_prior=0.0))
    error = np.linalg.norm(cmap.coords - oracle.vertex_uvw.numpy(), axis=1)
    seen = cmap.support >= 0.3
    assert seen.mean() > 0.4  # face, scalp, ears and neck seen from both sides
    assert error[seen].max() < 0.01
    assert np.isfinite(cmap.coords).all() and (cmap.support[~cmap.observed] == 0).all()

    exact, _ = oracle_for(bundle, params, crop_size=256)
    cmap = estimate_canonical_map(bundle.model, camera, params, [exact.predict(t, box) for t, box in enumerate(boxes)])
    assert np.linalg.norm(cmap.coords - exact.exact_uvw.numpy(), axis=1).max() < 0.01


def test_map_save_load_round_trip_and_png(bundle, tmp_path):
    rng = np.random.default_rng(0)
    cmap = CanonicalMap(rng.random((bundle.model.n_vertices, 3), dtype=np.float32),
                        rng.random(bundle.model.n_vertices, dtype=np.float32), {"source": "test", "frames_used": 3})
    path = save_canonical_map(tmp_path / "map.npz", cmap)
    loaded = load_canonical_map(path, bundle.model.n_vertices)
    np.testing.assert_array_equal(loaded.coords, cmap.coords)
    np.testing.assert_array_equal(loaded.support, cmap.support)
    assert loaded.metadata["frames_used"] == 3 and loaded.metadata["n_vertices"] == bundle.model.n_vertices
    with pytest.raises(TrackerError, match="another mesh topology"):
        load_canonical_map(path, 100)
    with pytest.raises(TrackerError, match="does not exist"):
        load_canonical_map(tmp_path / "missing.npz")
    exact = CanonicalMap(template_cube_coordinates(bundle.model.v_template).numpy(),
                         np.ones(bundle.model.n_vertices, np.float32))
    import cv2

    image = cv2.imread(str(write_canonical_png(tmp_path / "map.png", bundle.model, exact, size=64)))
    assert image.shape == (64, 192, 3)
    # Left and right views differ: the map's x coordinate runs across the head.
    assert np.abs(image[:, :64].astype(int) - image[:, 128:].astype(int)).mean() > 5


# ---------------------------------------------------------------------------------------------------------------
# The oracle is for synthetic data only
# ---------------------------------------------------------------------------------------------------------------


def write_ground_truth(path, params: FlameParams, camera: Camera, metadata: dict):
    T = params.batch_size
    table = FrameTable(params, np.arange(T), np.arange(T) / 25.0, np.ones(T, bool), np.zeros(T, np.float32))
    write_params(path, table, camera, 25.0, metadata)
    return path


def test_oracle_refuses_real_videos(bundle, tmp_path):
    params = sweep_params(bundle.model, [0.0], [0.0])
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    real = write_ground_truth(tmp_path / "tracked.npz", params, camera, {"tool": "tracker", "video": "me.mp4"})
    synthetic = write_ground_truth(tmp_path / "gt.npz", params, camera, {"synthetic": True})
    with pytest.raises(TrackerError, match="evaluation only"):
        check_oracle_allowed(None)
    with pytest.raises(TrackerError, match="not marked synthetic"):
        check_oracle_allowed(real)
    with pytest.raises(TrackerError, match="does not exist"):
        check_oracle_allowed(tmp_path / "nothing.npz")
    assert check_oracle_allowed(synthetic) == synthetic
    cfg = load_config(overrides={"densemarks": {"oracle": True, "oracle_ground_truth": str(real)}})
    with pytest.raises(TrackerError, match="not marked synthetic"):
        choose_source(cfg.densemarks, bundle.model, torch.device("cpu"))
    cfg = load_config(overrides={"densemarks": {"oracle": True, "oracle_ground_truth": str(synthetic)}})
    source, _ = choose_source(cfg.densemarks, bundle.model, torch.device("cpu"))
    assert source.kind == "oracle"


def test_oracle_refuses_a_video_that_is_not_its_sequence(bundle, tmp_path):
    params = sweep_params(bundle.model, [0.0, 5.0], [0.0, 0.0])
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    synthetic = write_ground_truth(tmp_path / "gt.npz", params, camera, {"synthetic": True})
    cfg = load_config(overrides={"densemarks": {"oracle": True, "oracle_ground_truth": str(synthetic)}})
    source, _ = choose_source(cfg.densemarks, bundle.model, torch.device("cpu"))
    source.check_video(np.array([0, 1]), SIZE, SIZE)  # its own sequence
    with pytest.raises(TrackerError, match="only runs on its own synthetic sequence"):
        source.check_video(np.array([0, 1]), 2 * SIZE, SIZE)
    with pytest.raises(TrackerError, match="has no frame 2"):
        source.check_video(np.arange(4), SIZE, SIZE)


def test_auto_mode_without_weights_skips_the_stage(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: no weights to be found
    cfg = load_config()
    source, reason = choose_source(cfg.densemarks, bundle.model, torch.device("cpu"))
    assert source is None and "weights not found" in reason
    cfg = load_config(overrides={"densemarks": {"mode": "off"}})
    assert choose_source(cfg.densemarks, bundle.model, torch.device("cpu")) == (None, "densemarks.mode is off")


# ---------------------------------------------------------------------------------------------------------------
# The dense terms alone bring back a 20-degree pose error
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_frame(bundle):
    params = sweep_params(bundle.model, [30.0], [6.0], seed=1)
    oracle, camera = oracle_for(bundle, params)
    prediction = oracle.predict(0, boxes_for(bundle, camera, params)[0])
    return params, oracle, camera, prediction


def dense_observations(frame) -> Observations:
    """Dense inputs only: no landmarks (zero weights)."""
    return Observations(torch.zeros(1, 1, 2), torch.zeros(1, 1), torch.ones(1), extras=frame.extras)


def test_correspondence_term_alone_recovers_pose(bundle, single_frame):
    """Levenberg-Marquardt on the correspondence term, gates refreshed between rounds."""
    truth, oracle, camera, prediction = single_frame
    canonical = oracle.exact_uvw
    corr_cfg = DenseCorrespondenceConfig(weight=1.0, search_resolution=CROP)
    ids = torch.as_tensor(correspondence_vertices(bundle.model.n_vertices, 800, seed=0))
    frame = prepare_frame(prediction, cKDTree(canonical.numpy()), canonical[ids].numpy(),
                          DenseRenderConfig(resolution=96), corr_cfg, torch.device("cpu"))
    problem = Problem(bundle.model, bundle.landmarks, camera, [DenseCorrespondenceEnergy(corr_cfg, bundle.model, ids)])
    obs = dense_observations(frame)
    params = perturbed(truth, 20.0)
    assert rotation_error_deg(params.rotation, truth.rotation) == pytest.approx(20.0, abs=1e-3)
    for _ in range(3):
        refresh_gates(frame, bundle.model, camera, params, ids, corr_cfg, 96)
        params = fit_lm(problem, params, obs, ("rotation", "translation"), 5)[0]
    assert rotation_error_deg(params.rotation, truth.rotation) < 1.0
    assert (params.translation - truth.translation).norm() < 0.002


def test_render_term_alone_recovers_pose(bundle, single_frame):
    """Adam on render-and-compare in cube space (no landmarks, no correspondences)."""
    truth, oracle, camera, prediction = single_frame
    canonical = oracle.exact_uvw
    render_cfg = DenseRenderConfig(weight=1.0, resolution=64)
    frame = prepare_frame(prediction, cKDTree(canonical.numpy()), canonical[:1].numpy(), render_cfg,
                          DenseCorrespondenceConfig(search_resolution=32), torch.device("cpu"))
    problem = Problem(bundle.model, bundle.landmarks, camera, [DenseRenderEnergy(render_cfg, canonical)])
    params = fit_adam(problem, perturbed(truth, 20.0), dense_observations(frame), ("rotation", "translation"),
                      iters=90, lr=0.06)
    assert rotation_error_deg(params.rotation, truth.rotation) < 1.0
    assert (params.translation - truth.translation).norm() < 0.003


# ---------------------------------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------------------------------


def test_stage_refines_a_perturbed_track(bundle, tmp_path):
    """Oracle predictions; map first estimated from the two well-fitted frames, then re-estimated with the
    identity on the keyframes; landmarks + dense terms: a badly fitted frame (turned by 8 degrees) comes back,
    good frames stay, and a frame without landmarks is tracked from its predecessors."""
    yaws = np.array([-20.0, -10.0, 0.0, 10.0])
    truth = sweep_params(bundle.model, yaws, np.zeros(4), seed=2)
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    gt_path = write_ground_truth(tmp_path / "gt.npz", truth, camera, {"synthetic": True})
    cfg = load_config(overrides={
        "densemarks": {"oracle": True, "oracle_ground_truth": str(gt_path), "rounds": 2, "lm_iters": 4, "iters": 0,
                       "map_rounds": 1},
        "energy": {"dense_corr": {"weight": 1.0, "vertices": 600, "search_resolution": 128},
                   "dense_render": {"weight": 0.0, "resolution": 96}},
    })
    landmark_terms = [LandmarkEnergy(LandmarkEnergyConfig()), PriorEnergy(PriorConfig(), bundle.model)]
    problem = Problem(bundle.model, bundle.landmarks, camera, landmark_terms)
    with torch.no_grad():
        clean = problem.evaluation(truth, None).landmarks_2d
    weights = torch.ones(clean.shape[:2])
    weights[3] = 0.0  # the last frame lost its landmarks
    obs = Observations(clean, weights, torch.full((4,), 60.0))
    start = truth.detach()
    start.rotation[1] = perturbed(truth.frames(slice(1, 2)), 8.0).rotation[0]
    # Frame 1's large landmark error keeps it out of the map; frame 3 has no fit at all.
    result = TrackResult(start, float(camera.focal), np.array([True, True, True, False]),
                         np.array([1.0, 5.0, 1.0, np.nan], np.float32), np.zeros(4, bool))
    refined, info = run_densemarks_stage(problem, result, obs, np.arange(4), lambda: iter(()), bundle, cfg, tmp_path)
    assert info["ran"] and info["predictor"] == "oracle" and info["map_source"] == "estimated"
    assert info["map_frames"] == 2
    assert (tmp_path / "densemarks_canonical_map.npz").is_file()
    assert (tmp_path / "densemarks_canonical_map.png").is_file()
    assert refined.valid.all() and info["frames_without_landmarks_tracked"] == 1
    assert np.isnan(refined.lmk_error_px[3]) and refined.lmk_error_px[1] < 1.0
    # The neck is free: the head's orientation (global then neck) is what the images determine.
    errors = [head_rotation_error_deg(refined.params.frames(slice(t, t + 1)), truth.frames(slice(t, t + 1)))
              for t in range(4)]
    assert max(errors) < 1.0, errors


def test_identity_step_recovers_the_focal_length(bundle, tmp_path):
    """Landmark fits made under a focal length 25% too short reproject their landmarks perfectly (face landmarks
    barely show perspective); the dense identity step, seeing the whole head, brings the focal within 10%."""
    yaws = np.array([-40.0, -20.0, 0.0, 20.0, 40.0, 60.0])
    truth = sweep_params(bundle.model, yaws, np.zeros(len(yaws)), seed=2)
    camera = Camera.from_image(SIZE, SIZE, fov_deg=30)
    gt_path = write_ground_truth(tmp_path / "gt.npz", truth, camera, {"synthetic": True})
    terms = [LandmarkEnergy(LandmarkEnergyConfig()), PriorEnergy(PriorConfig(), bundle.model)]
    with torch.no_grad():
        clean = Problem(bundle.model, bundle.landmarks, camera, terms).evaluation(truth, None).landmarks_2d
    obs = Observations(clean, torch.ones(clean.shape[:2]), torch.full((len(yaws),), 60.0))
    short = Camera(camera.focal * 0.75, camera.center.clone(), SIZE, SIZE)
    problem = Problem(bundle.model, bundle.landmarks, short, terms)
    with torch_threads(1):
        start, _ = fit_lm(problem, truth.detach(), obs, LANDMARK_FIELDS, 20)
    errors = landmark_error_px(problem, start, obs).numpy()
    assert errors.max() < 0.1  # the wrong focal is invisible to the landmarks
    cfg = load_config(overrides={
        "fit": {"keyframes": len(yaws)},
        "densemarks": {"oracle": True, "oracle_ground_truth": str(gt_path), "rounds": 2, "lm_iters": 4, "iters": 0},
        "energy": {"dense_corr": {"weight": 1.0, "vertices": 600, "search_resolution": 128},
                   "dense_render": {"weight": 0.0, "resolution": 96}},
    })
    result = TrackResult(start, float(short.focal), np.ones(len(yaws), bool), errors, np.zeros(len(yaws), bool))
    refined, info = run_densemarks_stage(problem, result, obs, np.arange(len(yaws)), lambda: iter(()), bundle, cfg,
                                         tmp_path)
    assert abs(refined.focal / float(camera.focal) - 1) < 0.1
    assert info["focal_px"] == pytest.approx(refined.focal, abs=0.01)
    assert float(problem.camera.focal) == pytest.approx(refined.focal)  # later steps and the export share it
