"""The DenseMarks stage recovers sequences made with the model it fits.

One short synthetic sequence (a yaw sweep to +-85 degrees with talking, 320x320, focal length unknown to the
tracker) is tracked the way the pipeline does it: the landmark stage on landmarks that carry a detector's
systematic offsets and are missing beyond 60 degrees of yaw, then the DenseMarks stage fed by the oracle. With
exact maps and the exact canonical map the fit must be near-exact; with the map estimated by the tracker, close;
with corrupted maps, never worse than the landmark stage.
"""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tests.test_densemarks_energy import bundle, one_thread  # noqa: F401  (shared fixtures)
from tracker.camera import Camera
from tracker.config import load_config
from tracker.densemarks.oracle import OracleDenseMarks, OracleGroundTruth, OracleNoise, template_cube_coordinates
from tracker.densemarks.stage import oracle_source, run_densemarks_stage
from tracker.energy.base import Observations
from tracker.fit.sequence import SequenceTracker
from tracker.fit.solver import Problem
from tracker.flame.model import FlameParams
from tracker.energy.landmarks import LandmarkEnergy
from tracker.energy.priors import PriorEnergy
from tracker.energy.temporal import TemporalEnergy

SIZE = 320
FOV_DEG = 40.0
"""The sequence's field of view; the tracker starts from 30 degrees and must find the focal length itself."""
FRAMES = 12
LOST_YAW_DEG = 60.0
"""The 'detector' finds no face beyond this yaw."""


@pytest.fixture(scope="module")
def sequence(bundle):
    """Ground truth, oracle ground truth, landmark observations and the landmark stage's track."""
    model = bundle.model
    g = torch.Generator().manual_seed(3)
    yaw = np.linspace(-85.0, 85.0, FRAMES)
    pitch = 12.0 * np.sin(np.linspace(0.0, 3.0, FRAMES))
    truth = FlameParams.zeros(FRAMES, model.n_shape, model.n_expr)
    truth.shape = torch.randn(1, model.n_shape, generator=g) * 0.7
    truth.rotation = torch.tensor(Rotation.from_euler("YX", np.stack([yaw, pitch], 1), degrees=True).as_rotvec(),
                                  dtype=torch.float32)
    truth.translation = torch.tensor([0.0, 0.01, -0.6]).repeat(FRAMES, 1)
    phase = torch.rand(12, generator=g) * 6.28
    truth.expr[:, :12] = 0.2 + 0.15 * torch.sin(phase + torch.linspace(0.0, 2.0, FRAMES)[:, None])  # talking
    truth.jaw_pose[:, 0] = torch.linspace(0.0, 0.2, FRAMES)
    camera = Camera.from_image(SIZE, SIZE, fov_deg=FOV_DEG)
    cfg = load_config(overrides={"densemarks": {"maps_dir": ""}, "fit": {"keyframes": 6}})
    _, problem = landmark_problem_for(bundle, camera, cfg, FRAMES)
    with torch.no_grad():
        clean = problem.evaluation(truth, None).landmarks_2d
    # A detector's systematic offsets (the same every frame), and no detection at steep yaw.
    offsets = torch.randn(clean.shape[1], 2, generator=g) * 1.5
    found = np.abs(yaw) <= LOST_YAW_DEG
    obs = Observations(clean + offsets, torch.as_tensor(found, dtype=torch.float32)[:, None].expand(-1, clean.shape[1]).clone(),
                       torch.full((FRAMES,), 120.0))
    landmark_camera = Camera.from_image(SIZE, SIZE, fov_deg=30.0)
    _, problem = landmark_problem_for(bundle, landmark_camera, cfg, FRAMES)
    tracker = SequenceTracker(problem, cfg)
    identity = tracker.estimate_identity(obs, found)
    shape, problem.camera.focal = identity.shape, identity.focal
    result = tracker.track(obs, found, shape)
    oracle_truth = OracleGroundTruth(truth, camera, np.arange(FRAMES), {"synthetic": True})
    return truth, camera, oracle_truth, obs, result, cfg


def landmark_problem_for(bundle, camera, cfg, frames):
    """The landmark stage's problem as the pipeline builds it (landmark, prior and temporal terms)."""
    energy = cfg.energy
    return None, Problem(bundle.model, bundle.landmarks, camera,
                         [LandmarkEnergy(energy.landmarks), PriorEnergy(energy.priors, bundle.model),
                          TemporalEnergy(energy.temporal)], jacobian="analytic")


def refine(bundle, sequence, tmp_path, noise=OracleNoise(), dense=None, oracle_truth=None):
    """The DenseMarks stage on the landmark track: refined track, info and the camera it leaves."""
    truth, camera, default_truth, obs, result, cfg = sequence
    dense = dict(dense or {})
    energy = dense.pop("energy", {})
    cfg = load_config(overrides={"densemarks": {"maps_dir": "", **dense}, "fit": {"keyframes": 6},
                                 "energy": {"dense_corr": {"search_resolution": 256}, **energy}})
    stage_camera = Camera.from_image(SIZE, SIZE, focal=result.focal)
    _, problem = landmark_problem_for(bundle, stage_camera, cfg, FRAMES)
    oracle = OracleDenseMarks(bundle.model, oracle_truth or default_truth, noise, crop_size=256)
    refined, info = run_densemarks_stage(problem, result, obs, np.arange(FRAMES), lambda: iter(()), bundle, cfg,
                                         tmp_path, source=oracle_source(oracle))
    return refined, info, stage_camera


@torch.no_grad()
def errors(bundle, params: FlameParams, focal: float, truth: FlameParams, camera: Camera):
    """Per frame: face error after rigid alignment (mm) and mean reprojection of the face vertices (px)."""
    from eval.metrics import vertex_error_mm

    face = torch.as_tensor(bundle.masks["face"])
    pred, gt = bundle.model(params).vertices[:, face], bundle.model(truth).vertices[:, face]
    tracked_camera = Camera(torch.tensor(focal), camera.center, SIZE, SIZE)
    reprojection = (tracked_camera.project(pred)[0] - camera.project(gt)[0]).norm(dim=-1).mean(-1).numpy()
    return vertex_error_mm(pred, gt, alignment="rigid"), reprojection


def test_exact_correspondences_give_an_exact_fit(bundle, sequence, tmp_path):
    """Exact maps and the exact canonical map: near-exact shape, expression, pose and focal length, on every
    frame of the sweep, including the frames the detector missed."""
    truth, camera, _, _, result, _ = sequence
    landmark_rigid, landmark_reprojection = errors(bundle, result.params, result.focal, truth, camera)
    exact_map = tmp_path / "exact_map.npy"
    np.save(exact_map, template_cube_coordinates(bundle.model.v_template).numpy())
    refined, info, stage_camera = refine(bundle, sequence, tmp_path, dense={"canonical_map": str(exact_map)})
    rigid, reprojection = errors(bundle, refined.params, refined.focal, truth, camera)
    assert info["ran"] and info["frames_without_landmarks_tracked"] == int((~result.valid).sum()) > 0
    assert refined.valid.all() and not info["guard"]["sequence_fallback"]
    assert np.median(landmark_rigid) > 1.5 and abs(result.focal / float(camera.focal) - 1) > 0.05  # a poor start
    # Past 60 degrees of yaw half the face is out of sight; the profiles end at 0.3-0.4 mm.
    assert np.median(rigid) <= 0.3 and rigid.max() <= 0.6, rigid
    assert np.median(reprojection) <= 0.5 and reprojection.max() < 10.0, reprojection
    assert abs(refined.focal / float(camera.focal) - 1) <= 0.02
    assert float(stage_camera.focal) == pytest.approx(refined.focal)


def test_map_estimated_by_the_tracker_gives_a_close_fit(bundle, sequence, tmp_path):
    """Exact maps, canonical map estimated from the video's own fits: a map is known only up to an affine
    transform that the head's shape can absorb, and it starts from the landmark fits (~2 mm off here), so the
    fit is not exact; still far better than the landmark stage, every frame tracked, the focal length close."""
    truth, camera, _, _, result, _ = sequence
    landmark_rigid, _ = errors(bundle, result.params, result.focal, truth, camera)
    refined, info, _ = refine(bundle, sequence, tmp_path)
    rigid, reprojection = errors(bundle, refined.params, refined.focal, truth, camera)
    assert info["map_source"] == "estimated" and refined.valid.all()
    assert np.median(rigid) <= 0.6 and rigid.max() <= 1.0, rigid  # 0.35 / 0.6 measured
    assert np.median(rigid) < 0.3 * np.median(landmark_rigid)
    assert np.median(reprojection) <= 1.5 and reprojection.max() < 10.0, reprojection
    assert abs(refined.focal / float(camera.focal) - 1) <= 0.05  # 3.5% measured


def test_corrupted_maps_cannot_make_a_fit_worse_than_the_landmark_stage(bundle, sequence, tmp_path):
    """Maps rendered with the head turned and moved (a ground truth read in the wrong convention): the guard
    finds the refinement disagreeing with the landmarks on most frames and keeps the landmark track, its focal
    length and validity; no frame ends worse than the landmark stage left it."""
    truth, camera, oracle_truth, _, result, _ = sequence
    wrong = truth.detach()
    turn = Rotation.from_euler("Y", 25, degrees=True)
    wrong.rotation = torch.tensor((turn * Rotation.from_rotvec(truth.rotation.numpy())).as_rotvec(), dtype=torch.float32)
    wrong.translation = wrong.translation + torch.tensor([0.04, 0.03, 0.0])
    corrupted = OracleGroundTruth(wrong, camera, np.arange(FRAMES), {"synthetic": True, "corrupted": True})
    with pytest.warns(UserWarning, match="landmark track is kept"):
        refined, info, stage_camera = refine(bundle, sequence, tmp_path, oracle_truth=corrupted)
    assert info["guard"]["sequence_fallback"]
    landmark_rigid, landmark_reprojection = errors(bundle, result.params, result.focal, truth, camera)
    rigid, reprojection = errors(bundle, refined.params, refined.focal, truth, camera)
    assert np.array_equal(refined.valid, result.valid)
    assert refined.focal == pytest.approx(result.focal) and float(stage_camera.focal) == pytest.approx(result.focal)
    found = result.valid
    assert (rigid[found] <= landmark_rigid[found] + 1e-3).all()
    assert (reprojection[found] <= landmark_reprojection[found] + 1e-3).all()


def test_garbage_maps_on_some_frames_fall_back_frame_by_frame(bundle, sequence, tmp_path):
    """Random uvw on two detected frames: those frames lack support and keep their (re-fitted) landmark fit, the
    others are refined, the frames after them unharmed; nothing ends worse than the landmark stage."""
    truth, camera, oracle_truth, _, result, _ = sequence

    class GarbageOnSome(OracleDenseMarks):
        def predict(self, frame_index, box):
            prediction = super().predict(frame_index, box)
            if frame_index in (4, 7):
                rng = np.random.default_rng(frame_index)
                prediction = type(prediction)(rng.random(prediction.uvw.shape).astype(np.float32),
                                              prediction.frame_to_crop)
            return prediction

    exact_map = tmp_path / "exact_map.npy"
    np.save(exact_map, template_cube_coordinates(bundle.model.v_template).numpy())
    cfg = load_config(overrides={"densemarks": {"canonical_map": str(exact_map)}, "fit": {"keyframes": 6},
                                 "energy": {"dense_corr": {"search_resolution": 256}}})
    _, _, _, obs, _, _ = sequence
    stage_camera = Camera.from_image(SIZE, SIZE, focal=result.focal)
    _, problem = landmark_problem_for(bundle, stage_camera, cfg, FRAMES)
    oracle = GarbageOnSome(bundle.model, oracle_truth, OracleNoise(), crop_size=256)
    refined, info = run_densemarks_stage(problem, result, obs, np.arange(FRAMES), lambda: iter(()), bundle, cfg,
                                         tmp_path, source=oracle_source(oracle))
    assert not info["guard"]["sequence_fallback"]
    assert {4, 7} <= set(info["guard"]["failed_frames"]) and result.valid[[4, 7]].all()
    assert refined.valid[[4, 7]].all()
    landmark_rigid, _ = errors(bundle, result.params, result.focal, truth, camera)
    rigid, _ = errors(bundle, refined.params, refined.focal, truth, camera)
    # Every frame ends better than the landmark stage left it, the lost profiles included (0.22-0.44 mm
    # measured; they drifted to 2-5 mm while a hidden eye's eyelid could run off), the garbage frames re-fitted
    # to their landmarks (0.9-1.0 mm against 1.6).
    assert (rigid <= landmark_rigid).all(), (rigid, landmark_rigid)
    # The frames after a garbage frame do not inherit it: their motion prediction starts afresh (0.12 / 0.26
    # mm measured; 0.86 / 0.68 when extrapolated from the garbage fit).
    assert (rigid[[5, 8]] <= 0.5).all(), rigid
    others = np.setdiff1d(np.arange(FRAMES), [4, 7])
    assert np.median(rigid[others]) < 0.3 * np.median(landmark_rigid[others]), (rigid, landmark_rigid, info)


def test_landmark_fits_are_refitted_under_a_far_focal_length(bundle, sequence):
    """The dense identity step may move the focal length by tens of percent; a landmark fit merely moved along
    its viewing ray (rescale_to_camera) then misses its landmarks by pixels, while the refit start the stage
    adds (refit_landmark_track) meets them again under the new camera."""
    from dataclasses import replace

    from tracker.densemarks.fitting import rescale_to_camera
    from tracker.densemarks.stage import refit_landmark_track
    from tracker.fit.sequence import landmark_error_px

    _, _, _, obs, result, cfg = sequence
    camera = Camera.from_image(SIZE, SIZE, focal=1.6 * result.focal)
    _, problem = landmark_problem_for(bundle, camera, cfg, FRAMES)
    moved = replace(result, params=rescale_to_camera(result.params, result.focal, 1.6 * result.focal),
                    focal=1.6 * result.focal)
    refits = refit_landmark_track(problem, moved, obs, cfg.fit.first_frame_iters)
    rows = torch.as_tensor(np.flatnonzero(result.valid))
    before = landmark_error_px(problem, moved.params.frames(rows), obs.frames(rows))
    after = landmark_error_px(problem, refits.frames(rows), obs.frames(rows))
    # The landmarks carry fixed offsets (1.5 px per point): what the landmark stage met under its own camera
    # is the floor.
    floor = torch.as_tensor(result.lmk_error_px[result.valid])
    assert float((after - floor).max()) < 0.1 and float(before.median()) > float(after.max()) + 1.0, (after, before)
    assert torch.equal(refits.shape, moved.params.shape)  # the identity stays the stage's
