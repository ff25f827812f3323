"""Recovery of known FLAME parameters from landmarks projected with a known camera."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.config import load_config
from tracker.energy.base import Observations
from tracker.energy.landmarks import LandmarkEnergy, LandmarkEnergyConfig
from tracker.energy.priors import PriorConfig, PriorEnergy
from tracker.energy.temporal import TemporalEnergy
from tracker.fit.init import rigid_from_landmarks
from tracker.fit.sequence import SequenceTracker
from tracker.fit.solver import LANDMARK_FIELDS, Problem, fit_lm
from tracker.flame.assets import load_flame_bundle
from tracker.flame.lbs import batch_rodrigues
from tracker.flame.model import FlameParams


def rotation_error_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) angle between axis-angle rotations a and b (B, 3)."""
    rel = batch_rodrigues(a).transpose(1, 2) @ batch_rodrigues(b)
    return torch.rad2deg(torch.acos(((rel.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))


@pytest.fixture(scope="module", params=["mediapipe478", "ibug68"])
def bundle(request):
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, request.param)


def make_truth(model, batch: int, seed: int) -> FlameParams:
    g = torch.Generator().manual_seed(seed)
    p = FlameParams.zeros(batch, model.n_shape, model.n_expr)
    p.shape = torch.randn(1, model.n_shape, generator=g) * 0.5
    p.rotation = torch.stack([torch.linspace(-0.1, 0.15, batch), torch.linspace(-0.5, 0.5, batch),
                              torch.full((batch,), 0.05)], 1)
    p.translation = torch.tensor([0.01, -0.02, -0.9]).repeat(batch, 1)
    p.jaw_pose[:, 0] = torch.linspace(0.0, 0.2, batch)
    p.expr[:, 33] = 0.5  # mouthSmile_L on the stand-in
    return p


def observe(problem: Problem, truth: FlameParams, noise_px: float = 0.0, seed: int = 0) -> tuple[Observations, torch.Tensor]:
    clean = problem.evaluation(truth, None).landmarks_2d.detach()
    g = torch.Generator().manual_seed(seed)
    noisy = clean + noise_px * torch.randn(clean.shape, generator=g)
    size = (clean.max(1).values - clean.min(1).values).norm(dim=-1)
    return Observations(noisy, torch.ones(clean.shape[:2]), size), clean


def make_problem(bundle, camera, prior_weight=1e-3):
    terms = [LandmarkEnergy(LandmarkEnergyConfig()), PriorEnergy(PriorConfig(weight=prior_weight), bundle.model)]
    return Problem(bundle.model, bundle.landmarks, camera, terms)


def pnp_init(problem, obs, shape):
    B = obs.landmarks.shape[0]
    init = FlameParams.zeros(B, problem.model.n_shape, problem.model.n_expr)
    init.shape = shape.clone()
    for b in range(B):
        rot, trans = rigid_from_landmarks(problem.model, problem.landmarks, problem.camera,
                                          obs.landmarks[b].numpy(), obs.landmark_weights[b].numpy(), shape)
        init.rotation[b], init.translation[b] = torch.from_numpy(rot), torch.from_numpy(trans)
    return init


def test_pnp_initialisation_is_close(bundle):
    camera = Camera.from_image(512, 512, fov_deg=30)
    problem = make_problem(bundle, camera)
    truth = make_truth(bundle.model, 3, seed=0)
    truth.expr.zero_()
    truth.jaw_pose.zero_()
    obs, _ = observe(problem, truth)
    init = pnp_init(problem, obs, truth.shape)
    assert rotation_error_deg(init.rotation, truth.rotation).max() < 0.5
    assert (init.translation - truth.translation).norm(dim=-1).max() < 0.005


def test_noiseless_recovery(bundle):
    """Exact landmarks: rotation within 1 degree, translation within 2 mm, reprojection below 0.5 px."""
    camera = Camera.from_image(512, 512, fov_deg=30)
    problem = make_problem(bundle, camera)
    truth = make_truth(bundle.model, 3, seed=1)
    obs, clean = observe(problem, truth)
    fitted, _ = fit_lm(problem, pnp_init(problem, obs, truth.shape), obs, LANDMARK_FIELDS, 30)
    reproj = (problem.evaluation(fitted, obs).landmarks_2d - clean).norm(dim=-1).mean(-1)
    assert rotation_error_deg(fitted.rotation, truth.rotation).max() < 1.0
    assert (fitted.translation - truth.translation).norm(dim=-1).max() < 0.002
    assert reproj.max() < 0.5
    assert (fitted.jaw_pose[:, 0] - truth.jaw_pose[:, 0]).abs().max() < math.radians(2)


def test_recovery_with_one_pixel_noise(bundle):
    """1 px Gaussian noise on every landmark (face ~130 px wide): rotation within 2 degrees, translation
    within 15 mm (mostly depth, which a 1 px error on a small face barely constrains), and the fit stays
    within 1 px of the clean landmarks."""
    camera = Camera.from_image(512, 512, fov_deg=30)
    problem = make_problem(bundle, camera, prior_weight=0.1)
    truth = make_truth(bundle.model, 3, seed=2)
    obs, clean = observe(problem, truth, noise_px=1.0, seed=3)
    fitted, _ = fit_lm(problem, pnp_init(problem, obs, truth.shape), obs, LANDMARK_FIELDS, 30)
    reproj = (problem.evaluation(fitted, obs).landmarks_2d - clean).norm(dim=-1).mean(-1)
    assert rotation_error_deg(fitted.rotation, truth.rotation).max() < 2.0
    assert (fitted.translation - truth.translation).norm(dim=-1).max() < 0.015
    assert reproj.max() < 1.0


def test_sequence_tracking_recovers_identity_focal_and_poses():
    """Identity and focal from keyframes, then frame-by-frame tracking, on a 12-frame head turn."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    true_camera = Camera.from_image(512, 512, fov_deg=25)
    truth = make_truth(bundle.model, 12, seed=4)
    obs, clean = observe(make_problem(bundle, true_camera), truth)
    # Exact landmarks: near-zero priors and the head's size free (held at the mean head's by default), so the
    # optimum is the truth and the test measures the solver.
    # 5 degrees of turn per frame: more iterations per frame than the default's 5.
    cfg = load_config(overrides={"fit": {"keyframes": 6, "frame_iters": 40, "hold_head_size": False},
                                 "energy": {"priors": {"shape": 1e-5, "expr": 1e-4, "expr_sparsity": 0.0}}})
    camera = Camera.from_image(512, 512, fov_deg=cfg.camera.fov_prior_deg)  # starts at 30 degrees
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, bundle.model),
             TemporalEnergy(cfg.energy.temporal)]
    problem = Problem(bundle.model, bundle.landmarks, camera, terms)
    tracker = SequenceTracker(problem, cfg)
    valid = np.ones(12, bool)
    identity = tracker.estimate_identity(obs, valid)
    shape, camera.focal = identity.shape, identity.focal
    assert identity.focal_source == "estimated" and identity.focal_log_std < 0.05
    result = tracker.track(obs, valid, shape)
    assert result.valid.all() and not result.reinitialised.any()
    assert np.nanmax(result.lmk_error_px) < 0.5
    assert abs(float(camera.focal) / float(true_camera.focal) - 1) < 0.03
    assert rotation_error_deg(result.params.rotation, truth.rotation).max() < 1.0


def test_reinitialises_after_a_jump():
    """A frame whose head teleports (lost track) is re-initialised from its own landmarks."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    camera = Camera.from_image(512, 512, fov_deg=30)
    truth = make_truth(bundle.model, 8, seed=5)
    truth.rotation[5:] = torch.tensor([0.0, -1.0, 0.0])  # a 60-degree jump
    truth.translation[5:] = torch.tensor([-0.08, 0.05, -0.8])
    obs, _ = observe(make_problem(bundle, camera), truth)
    # 8 degrees (16 px) of turn between frames: more iterations than the default's 5, so that only the jump
    # itself looks like a lost track.
    # Frame by frame (window 1): a window's later frames start from their own landmarks and take the jump
    # in their stride (below).
    cfg = load_config(overrides={"fit": {"frame_iters": 10, "window": 1}})
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, bundle.model),
             TemporalEnergy(cfg.energy.temporal)]
    tracker = SequenceTracker(Problem(bundle.model, bundle.landmarks, camera, terms), cfg)
    result = tracker.track(obs, np.ones(8, bool), truth.shape)
    assert result.reinitialised[5] and not result.reinitialised[:5].any()
    assert result.lmk_error_px[5] < 1.0
    # Frames 4-7 in one window: frame 5 starts from its PnP pose and needs no re-initialisation; the jump
    # bends the window's temporal reference, which costs its neighbours about a pixel.
    cfg.fit.window = 4
    result = SequenceTracker(Problem(bundle.model, bundle.landmarks, camera, terms), cfg).track(obs, np.ones(8, bool),
                                                                                               truth.shape)
    assert not result.reinitialised.any() and result.lmk_error_px[5] < 1.0
    assert np.nanmax(result.lmk_error_px) < 1.5


def test_independent_frames_are_solved_as_separate_problems(bundle):
    """fit_lm(independent=True) on a batch gives each frame what solving it alone gives: its own damping,
    steps and stopping, so a frame that starts far off neither slows nor disturbs the others."""
    camera = Camera.from_image(512, 512, fov_deg=30)
    # A prior that makes every frame well posed: along a flat expression direction float32 rounding that
    # depends on the batch shape alone moves a weakly held frame's result by tenths.
    problem = make_problem(bundle, camera, prior_weight=1e-2)
    truth = make_truth(bundle.model, 3, seed=15)
    obs, _ = observe(problem, truth, noise_px=1.0, seed=16)
    start = truth.detach()
    start.rotation[1] += torch.tensor([0.3, -0.4, 0.1])  # far off: many rejected steps
    start.expr += 0.2
    start.jaw_pose[2, 0] = 0.0
    # One solver round (the tracker's): a round's discrete choices are made for the whole batch.
    together, _ = fit_lm(problem, start, obs, LANDMARK_FIELDS, 6, reference=truth, rounds=1, independent=True)
    for b in range(3):
        alone, _ = fit_lm(problem, start.frames(slice(b, b + 1)), obs.frames(slice(b, b + 1)), LANDMARK_FIELDS, 6,
                          reference=truth.frames(slice(b, b + 1)), rounds=1)
        for name in LANDMARK_FIELDS:
            assert torch.allclose(getattr(together, name)[b], getattr(alone, name)[0], atol=1e-3), (b, name)
    joint, _ = fit_lm(problem, start, obs, LANDMARK_FIELDS, 6, reference=truth, rounds=1)  # one damping
    assert (joint.expr - together.expr).abs().max() > 0.05  # what a shared damping does to them
    with pytest.raises(ValueError, match="independent"):
        fit_lm(problem, start, obs, LANDMARK_FIELDS, 2, free_shape=True, independent=True)


def test_windowed_tracking_matches_frame_by_frame():
    """Frames fitted a window at a time (side by side) track a 15-frame turn with a gap as well as one at a
    time does (default priors, exact landmarks): every frame within 2 degrees and 0.5 px of the truth and 1.5
    degrees of the frame-by-frame track, the gap marked invalid, the frames after it a new run."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    camera = Camera.from_image(512, 512, fov_deg=30)
    truth = make_truth(bundle.model, 15, seed=17)
    obs, _ = observe(make_problem(bundle, camera), truth)
    valid = np.ones(15, bool)
    valid[9] = False
    results = {}
    for window in (1, 4, 15):
        cfg = load_config(overrides={"fit": {"window": window, "frame_iters": 10}})
        terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, bundle.model),
                 TemporalEnergy(cfg.energy.temporal)]
        tracker = SequenceTracker(Problem(bundle.model, bundle.landmarks, camera, terms), cfg)
        results[window] = result = tracker.track(obs, valid, truth.shape)
        assert (result.valid == valid).all() and not result.reinitialised.any()
        assert np.nanmax(result.lmk_error_px) < 0.5, window
        assert rotation_error_deg(result.params.rotation[valid], truth.rotation[valid]).max() < 2.0, window
    for window in (4, 15):
        assert rotation_error_deg(results[window].params.rotation, results[1].params.rotation)[valid].max() < 1.5


def test_smooth_in_time_keeps_a_quadratic_and_removes_alternation():
    """The windows' temporal reference: a quadratic motion passes unchanged, frame-to-frame alternation
    (jitter) is taken out, and a run too short for the degree gets a lower one (two frames: the line through
    them, i.e. themselves)."""
    from tracker.fit.sequence import smooth_in_time

    t = torch.linspace(0, 1, 9)[:, None]
    run = FlameParams.zeros(9, 4, 5)
    run.rotation = torch.cat([0.2 + 0.5 * t - 0.3 * t ** 2, 2 * t, torch.zeros_like(t)], dim=1)
    smooth = smooth_in_time(run, 2)
    assert torch.allclose(smooth.rotation, run.rotation, atol=1e-5)
    jittery = run.map(torch.clone)
    jittery.translation[:, 0] = 0.01 * torch.tensor([(-1.0) ** k for k in range(9)])
    assert smooth_in_time(jittery, 2).translation[:, 0].pow(2).mean().sqrt() < 0.4 * 0.01
    two = run.frames(slice(0, 2))
    assert torch.allclose(smooth_in_time(two, 2).rotation, two.rotation, atol=1e-6)


def test_smooth_run_solves_the_banded_least_squares():
    """smooth_run's maths: no smoothing returns the fits; overwhelming smoothing returns the straight line that
    best fits them (second differences zero); and in between the result is the normal equations' solution."""
    from tracker.fit.smooth import smooth_run

    rng = np.random.default_rng(0)
    n, d = 9, 2
    fits = rng.normal(size=(n, d))
    info = np.stack([np.eye(d) * (1 + t) for t in range(n)])
    assert np.allclose(smooth_run(fits, info, np.zeros(d)), fits)
    line = smooth_run(fits, info, np.full(d, 1e9))
    assert np.abs(line[2:] - 2 * line[1:-1] + line[:-2]).max() < 1e-6
    t = np.arange(n)
    for k in range(d):  # the weighted least-squares line through the fits
        w = info[:, k, k]
        A = np.stack([np.ones(n), t], 1)
        coef = np.linalg.solve(A.T @ (w[:, None] * A), A.T @ (w * fits[:, k]))
        assert np.allclose(line[:, k], A @ coef, atol=1e-5)
    weights = np.array([3.0, 0.5])
    mid = smooth_run(fits, info, weights)
    D = np.diff(np.eye(n), 2, axis=0)
    for k in range(d):
        A = np.diag(info[:, k, k]) + weights[k] * D.T @ D
        assert np.allclose(mid[:, k], np.linalg.solve(A, info[:, k, k] * fits[:, k]), atol=1e-8)


def test_robust_smoothing_keeps_a_motion_onset():
    """A head that rests, then turns at a constant rate (one large acceleration), seen with small noise: quadratic
    smoothing strong enough to remove the noise rounds the onset off; the Huber smoothing keeps it and still
    removes the noise."""
    from tracker.fit.smooth import smooth_run

    rng = np.random.default_rng(1)
    n = 30
    truth = np.concatenate([np.zeros(15), 0.05 * np.arange(1, 16)])[:, None]
    fits = truth + 0.002 * rng.normal(size=truth.shape)
    # A weakly seen direction (information 100 per rad^2) and the default rotation weight.
    info, weights = np.full((n, 1, 1), 100.0), np.array([1000.0])
    quadratic, robust = smooth_run(fits, info, weights), smooth_run(fits, info, weights, robust=0.1)

    def error(x):
        return np.abs(x - truth).max()

    assert error(quadratic) > 0.02 and error(robust) < 0.5 * error(quadratic), (error(quadratic), error(robust))

    def noise(x):  # acceleration while the head rests
        return np.abs(np.diff(x[:14], 2, axis=0)).mean()

    assert noise(robust) < 0.3 * noise(fits)


def test_pose_smoothing_removes_jitter_without_lag():
    """Landmarks with 1 px noise: on a static head, frame-by-frame tracking jitters and the pose smoothing cuts the
    face's jitter (camera-space vertex acceleration) at least in half; on a head turning and stopping fast, the
    smoothed poses stay as close to the truth as the tracked ones (directions the landmarks see are kept)."""
    from tracker.fit.smooth import smooth_track

    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    camera = Camera.from_image(512, 512, fov_deg=30)
    cfg = load_config()
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, bundle.model),
             TemporalEnergy(cfg.energy.temporal)]
    problem = Problem(bundle.model, bundle.landmarks, camera, terms)
    face = torch.as_tensor(bundle.masks["face"])

    def vertices(p):
        with torch.no_grad():
            return bundle.model(p).vertices[:, face]

    def jitter(p):
        v = vertices(p)
        return float((v[2:] - 2 * v[1:-1] + v[:-2]).norm(dim=-1).mean())

    static = make_truth(bundle.model, 16, seed=6)
    static.rotation[:] = torch.tensor([0.05, 0.2, 0.0])
    static.jaw_pose[:] = 0.1
    turning = make_truth(bundle.model, 16, seed=8)
    turning.rotation[:, 1] = torch.tensor([0.0] * 4 + [0.1 * k for k in range(1, 9)] + [0.8] * 4)
    for truth, seed in ((static, 7), (turning, 9)):
        obs, _ = observe(make_problem(bundle, camera), truth, noise_px=1.0, seed=seed)
        tracked = SequenceTracker(problem, cfg).track(obs, np.ones(16, bool), truth.shape)
        smoothed = smooth_track(problem, tracked, obs, cfg.fit.smooth_rotation, cfg.fit.smooth_translation,
                                cfg.fit.smooth_robust)
        error = {name: float((vertices(p.params) - vertices(truth)).norm(dim=-1).mean())
                 for name, p in (("tracked", tracked), ("smoothed", smoothed))}
        if truth is static:
            assert jitter(smoothed.params) < 0.5 * jitter(tracked.params)
            assert error["smoothed"] < error["tracked"] + 1e-4
        else:
            assert error["smoothed"] < 1.1 * error["tracked"] + 1e-4, error
        assert np.abs(smoothed.lmk_error_px - tracked.lmk_error_px).max() < 1.0


def test_difference_jacobians_match_forward_mode(bundle):
    """The landmark stage's batched finite differences give the forward-mode Jacobian (robust loss, prior
    and temporal terms included) to within 1e-3 of its scale: central ones everywhere, and one-sided ones in
    the blendshape columns (what the solver uses)."""
    from tracker.fit.solver import ParamPacker, _round_residuals, block_jacobians, difference_jacobians

    camera = Camera.from_image(512, 512, fov_deg=30)
    problem = make_problem(bundle, camera)
    truth = make_truth(bundle.model, 3, seed=8)
    obs, _ = observe(problem, truth, noise_px=2.0, seed=9)
    start = truth.detach()
    start.rotation += 0.05
    start.expr += 0.1
    packer = ParamPacker(start, LANDMARK_FIELDS, free_shape=True)
    X, s = packer.pack(start)
    residual_fn = _round_residuals(problem, packer, X, s, obs, truth, 0.0)[0]
    forward = block_jacobians(residual_fn, X, s)
    linear = packer.linear_columns(X)
    assert int(linear.sum()) == bundle.model.n_expr + start.eyelids.shape[1] and not bool(linear[-3:].any())
    for one_sided in (None, linear):
        differences = difference_jacobians(residual_fn, packer.difference_steps(X), X, s, one_sided)
        for a, b in zip(forward, differences):
            assert (a - b).abs().max() < 1e-3 * a.abs().max()


def test_whole_track_evaluations_in_chunks_give_the_same_numbers(monkeypatch):
    """The evaluations over a whole track (the pose smoothing's Jacobians and errors, the stage energies) run a
    chunk of frames at a time, so that memory stays flat on long videos (1000 frames at once took 0.9 GB): in
    chunks of 4 frames they give the numbers one pass over all frames gives."""
    from tracker.fit import smooth
    from tracker.fit.sequence import TrackResult, landmark_error_px
    from tracker.pipeline import frame_energy

    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    camera = Camera.from_image(512, 512, fov_deg=30)
    problem = make_problem(bundle, camera, prior_weight=0.1)
    truth = make_truth(bundle.model, 11, seed=12)
    obs, _ = observe(problem, truth, noise_px=1.5, seed=13)
    valid = np.ones(11, bool)
    valid[5] = False  # two runs of frames
    g = torch.Generator().manual_seed(14)
    jittery = truth.map(lambda t: t.clone())  # poses that the smoothing moves
    jittery.rotation += 0.01 * torch.randn(jittery.rotation.shape, generator=g)
    jittery.translation += 0.002 * torch.randn(jittery.translation.shape, generator=g)
    with torch.no_grad():
        errors = landmark_error_px(problem, jittery, obs).numpy()
    track = TrackResult(jittery, float(camera.focal), valid, errors, np.zeros(11, bool))

    whole_energy = np.where(valid, problem.energy(jittery, obs).detach().numpy(), np.nan)
    smoothed_whole = smooth.smooth_track(problem, track, obs, 1000.0, 1e5, 0.1)
    monkeypatch.setattr(smooth, "CHUNK", 4)
    monkeypatch.setattr("tracker.pipeline.ENERGY_CHUNK", 4)
    smoothed_chunks = smooth.smooth_track(problem, track, obs, 1000.0, 1e5, 0.1)
    np.testing.assert_allclose(frame_energy(problem, track, obs), whole_energy, rtol=1e-5)
    for name in ("rotation", "translation"):  # float32 rounding of other batch shapes: 2e-5 rad, 0.02 mm
        torch.testing.assert_close(getattr(smoothed_chunks.params, name), getattr(smoothed_whole.params, name),
                                   atol=2e-5, rtol=0)
    np.testing.assert_allclose(smoothed_chunks.lmk_error_px, smoothed_whole.lmk_error_px, rtol=1e-3)
    assert (smoothed_whole.params.rotation - jittery.rotation).abs().max() > 1e-3  # the smoothing ran
