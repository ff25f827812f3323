"""Analytic derivatives: FLAME's skinning and every landmark-stage energy term give the Jacobians that
forward-mode differentiation of the same functions gives, so Levenberg-Marquardt can linearise without
evaluating the model again for each parameter."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.func import jacfwd

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.config import load_config
from tracker.energy.base import Observations, ScaledTerm
from tracker.energy.contour import POINTS_KEY, WEIGHTS_KEY
from tracker.energy.dense import CORR_TARGET, CORR_WEIGHT, CROP_PX, DenseCorrespondenceConfig, DenseCorrespondenceEnergy
from tracker.energy.head_size import HeadSizeEnergy
from tracker.energy.point_tracks import PointTrackEnergy
from tracker.energy.priors import PriorEnergy
from tracker.fit.solver import LANDMARK_FIELDS, ParamPacker, _round_residuals, block_jacobians, fit_lm, log_focal_std
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameParams
from tracker.pipeline import landmark_terms_problem

ALL_FIELDS = ["expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "eyelids", "translation", "shape"]


def random_params(model, batch: int, seed: int, dtype=torch.float32) -> FlameParams:
    """Every joint turned (frame 0's head by a hair: the small-angle series), shape, expression and eyelids
    set."""
    g = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(dtype)

    p = FlameParams(rand(1, model.n_shape, scale=0.5), (torch.rand(batch, model.n_expr, generator=g) * 0.4 - 0.05).to(dtype),
                    rand(batch, 3, scale=0.4), rand(batch, 3, scale=0.15), rand(batch, 3, scale=0.1),
                    rand(batch, 6, scale=0.15), torch.rand(batch, 2, generator=g).to(dtype),
                    (torch.tensor([0.01, -0.02, -0.9]) + rand(batch, 3, scale=0.01)).to(dtype))
    p.rotation[0] = torch.tensor([1e-5, -2e-5, 1e-5], dtype=dtype)
    return p


def forward_mode(fn, params: FlameParams, fields: list[str]) -> torch.Tensor:
    """d fn(params) / d fields by forward-mode AD: (B, ..., P), columns field by field (`shape` shared)."""
    B = params.batch_size
    sizes = [getattr(params, f).shape[1] for f in fields]

    def moved(delta):
        changes = {}
        for name, part in zip(fields, torch.split(delta, sizes, dim=-1)):
            changes[name] = getattr(params, name) + (part[:1] if name == "shape" else part)
        return fn(FlameParams(**{**params.__dict__, **changes}))

    # One tangent per parameter, the same in every frame; frames do not interact, so per-frame blocks come out.
    jac = jacfwd(lambda d: moved(d.expand(B, -1)))(params.expr.new_zeros(sum(sizes)))
    return jac


def test_skinning_derivatives_match_forward_mode():
    """FLAME with pose correctives (random ones: the stand-in has none) and expression directions that move the
    joints: every field's columns, every joint turned, in double precision."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    model = bundle.model.double()
    torch.manual_seed(0)
    model.posedirs.copy_(torch.randn_like(model.posedirs) * 1e-3)
    model.pose_correctives = True
    assert model.moving_coefficients[model.n_shape:].any()  # the expression directions move joints
    sub = model.restricted(bundle.landmarks.vertex_ids)
    params = random_params(model, 2, seed=1, dtype=torch.float64)
    vertices, jac = sub.jacobian(params, ALL_FIELDS)
    assert torch.equal(vertices, sub(params).vertices)
    expected = forward_mode(lambda p: sub(p).vertices, params, ALL_FIELDS)
    assert jac.shape == expected.shape
    start = 0
    for name in ALL_FIELDS:
        width = getattr(params, name).shape[1]
        block, truth = jac[..., start:start + width], expected[..., start:start + width]
        assert truth.abs().max() > 1e-3, name
        assert (block - truth).abs().max() < 1e-7 * truth.abs().max(), name
        start += width
    assert_point_jacobians_combine_the_vertices(sub, params, expected)
    # Without pose correctives the same model skips their terms and still gives its own derivatives.
    model.posedirs.zero_()
    model.pose_correctives = False
    sub = model.restricted(bundle.landmarks.vertex_ids)
    jac = sub.jacobian(params, ALL_FIELDS)[1]
    expected = forward_mode(lambda p: sub(p).vertices, params, ALL_FIELDS)
    assert (jac - expected).abs().max() < 1e-7 * expected.abs().max()
    assert_point_jacobians_combine_the_vertices(sub, params, expected)


def assert_point_jacobians_combine_the_vertices(sub, params, vertex_jacobian):
    """`point_jacobian` of left @ (points on triangles or edges, weights not summing to 1) equals left @ the
    weighted sum of the vertices' forward-mode derivatives, with corners shared by the frames or each frame's
    own."""
    g = torch.Generator().manual_seed(7)
    B, S = vertex_jacobian.shape[:2]
    d = sub.derivatives(params, ALL_FIELDS)
    for shape in ((40, 3), (B, 40, 2)):
        corners = torch.randint(0, S, shape, generator=g)
        bary = torch.rand(shape, generator=g, dtype=torch.float64)
        left = torch.randn(B, 40, 2, 3, generator=g, dtype=torch.float64)
        rows = vertex_jacobian[torch.arange(B)[:, None], corners.expand(B, *shape[-2:]).reshape(B, -1)]
        combined = (bary.expand(B, *shape[-2:])[..., None, None] * rows.view(B, 40, shape[-1], 3, -1)).sum(2)
        computed = sub.point_jacobian(params, d, ALL_FIELDS, corners, bary, left)
        assert computed.shape == (B, 40, 2, vertex_jacobian.shape[-1])
        expected = left @ combined
        assert (computed - expected).abs().max() < 1e-7 * expected.abs().max(), shape


def observed(problem, params: FlameParams, seed: int) -> Observations:
    """Landmarks 3 px off the model's, random confidences, outline points near the silhouette."""
    g = torch.Generator().manual_seed(seed)
    clean = problem.evaluation(params, None).landmarks_2d.detach()
    B, L = clean.shape[:2]
    points = clean + 3 * torch.randn(clean.shape, generator=g)
    extras = {}
    if problem.landmarks.outline is not None:
        C = len(problem.landmarks.outline_index)
        extras = {POINTS_KEY: points[:, :C] + 4, WEIGHTS_KEY: torch.rand(B, C, generator=g) + 0.5}
    return Observations(points, torch.rand(B, L, generator=g) + 0.5, torch.full((B,), 200.0), extras=extras)


@pytest.mark.parametrize("scheme,robust,basis", [("mediapipe478", "cauchy", "blendshapes"), ("mediapipe478", "l2", "pca"),
                                                 ("mediapipe478", "huber", "blendshapes"), ("ibug68", "gm", "blendshapes"),
                                                 ("ibug68", "l1", "pca")])
def test_energy_term_derivatives_match_forward_mode(scheme, robust, basis, monkeypatch):
    """The landmark stage's terms (landmarks, sliding outline with its matches held, priors with either
    expression basis, temporal, the held head size) in a solver round: the analytic block Jacobians, identity
    and focal columns included (translations scaled with the focal; the focal column from the terms'
    `focal_jacobian`, no forward-mode pass), equal the forward-mode ones."""
    from tracker.fit import solver

    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, scheme)
    cfg = load_config(None, {"energy": {"landmarks": {"robust": robust}, "contour": {"robust": robust}}})
    problem = landmark_terms_problem(bundle.model, bundle.landmarks, Camera.from_image(512, 512, 30), cfg)
    params = random_params(bundle.model, 3, seed=2)
    params.eyelids = params.eyelids * 2.0 - 0.5  # on both sides of the eyelid barrier
    if basis == "pca":
        problem.terms = [PriorEnergy(cfg.energy.priors, SimpleNamespace(expression_names=[]))
                         if term.name == "priors" else term for term in problem.terms]
        assert next(term for term in problem.terms if term.name == "priors").basis == "pca"
    problem = problem.with_terms([*problem.terms, HeadSizeEnergy(bundle.model, params.shape * 0.5)])
    assert problem.jacobian == "analytic" and problem.analytic
    obs = observed(problem, params, seed=3)
    reference = params.detach()
    reference.rotation += 0.02
    reference.expr += 0.03
    for free_shape, free_focal in ((False, False), (True, True)):
        packer = ParamPacker(params, LANDMARK_FIELDS, free_shape, free_focal)
        X, s = packer.pack(params)
        if free_focal:
            s[-1] = 0.1
        residual_fn, _, matching, analytic = _round_residuals(problem, packer, X, s, obs, reference, 5.0)
        assert matching  # the outline points found their partners
        expected = block_jacobians(residual_fn, X, s)
        with monkeypatch.context() as patched:
            patched.setattr(solver, "jacfwd", None)  # the analytic Jacobians must not need it
            computed = analytic(X, s)
        for a, b in zip(computed, expected):
            assert a.shape == b.shape
            if b.numel():
                assert (a - b).abs().max() < 2e-6 * b.abs().max(), (free_shape, free_focal)


def test_analytic_solver_fits_as_forward_mode():
    """The identity stage's joint fit (identity, focal, poses of 4 keyframes, landmarks seen through a longer
    lens than the start's) reaches the same solution with the analytic Jacobians as with forward-mode ones."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    # No eyelid barrier: two eyelids end on its edge, where its kink lets the two solvers part by 2e-4 rad.
    cfg = load_config(None, {"energy": {"priors": {"eyelid_bounds": 0.0}}})
    problem = landmark_terms_problem(bundle.model, bundle.landmarks, Camera.from_image(512, 512, 20), cfg)
    truth = random_params(bundle.model, 4, seed=4)
    truth.translation[:, 2] = -0.4  # close enough for perspective to tell the focal length
    obs = observed(problem, truth, seed=5)
    camera = Camera.from_image(512, 512, 30)
    start = truth.detach()
    start.shape.zero_()
    start.expr.zero_()
    results = {}
    for mode in ("analytic", "forward"):
        problem.camera = Camera.from_image(512, 512, 30)
        results[mode] = fit_lm(problem, start, obs, LANDMARK_FIELDS, 15, free_shape=True, free_focal=True,
                               focal_prior=0.01, jacobian=mode)
    (fit_a, focal_a), (fit_f, focal_f) = results["analytic"], results["forward"]
    assert abs(float(focal_a / focal_f) - 1) < 1e-3
    assert (fit_a.shape - fit_f.shape).abs().max() < 1e-3
    assert (fit_a.rotation - fit_f.rotation).abs().max() < 1e-4
    assert float(focal_a / camera.focal) > 1.2  # the focal did move towards the truth (1.52x the start)
    # The focal length's Laplace uncertainty at that fit, from analytic and from forward-mode Jacobians.
    problem.camera = Camera.from_image(512, 512, 30)
    problem.camera.focal = focal_a
    spread = {mode: log_focal_std(replace(problem, jacobian=mode), fit_a, obs, LANDMARK_FIELDS, 0.01)
              for mode in ("analytic", "forward")}
    assert 0 < spread["analytic"] < 0.5 and spread["analytic"] == pytest.approx(spread["forward"], rel=1e-3)


def test_point_terms_derivatives_match_forward_mode():
    """The other point terms: DenseMarks correspondences (robust, gated, scaled by the crop) and the optical-flow
    point tracks that bridge detector gaps."""
    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    problem = landmark_terms_problem(bundle.model, bundle.landmarks, Camera.from_image(512, 512, 30),
                                     load_config(None, {}))
    params = random_params(bundle.model, 2, seed=6)
    g = torch.Generator().manual_seed(7)
    ids = torch.randperm(bundle.model.n_vertices, generator=g)[:50]
    seen = problem.camera.project(bundle.model(params).vertices[:, ids])[0].detach()
    targets = seen + 4 * torch.randn(seen.shape, generator=g)
    gate = (torch.rand(2, 50, generator=g) > 0.2).float()
    obs = Observations(torch.zeros(2, 1, 2), torch.zeros(2, 1), torch.full((2,), 150.0),
                       extras={CORR_TARGET: targets, CORR_WEIGHT: gate, CROP_PX: torch.tensor([300.0, 260.0])})
    terms = [DenseCorrespondenceEnergy(DenseCorrespondenceConfig(), bundle.model, ids),
             PointTrackEnergy(bundle.model.restricted(ids), targets, gate, torch.tensor([150.0, 140.0]))]
    fields = list(LANDMARK_FIELDS) + ["neck_pose", "shape"]
    for term in terms:
        analytic = term.jacobian(problem.evaluation(params, obs), fields)
        expected = forward_mode(lambda p, term=term: term(problem.evaluation(p, obs)), params, fields)
        assert analytic.shape == expected.shape and expected.abs().max() > 1.0
        assert (analytic - expected).abs().max() < 2e-6 * expected.abs().max(), term.name
    # The correspondences' log-focal column, the 3D points held (the identity fit frees the focal length).
    dense = terms[0]
    camera = problem.camera

    def at_focal(v):
        scaled = Camera(camera.focal * torch.exp(v), camera.center, camera.height, camera.width)
        return dense(problem.evaluation(params, obs, camera=scaled))

    expected = jacfwd(at_focal)(torch.zeros(()))
    analytic = ScaledTerm(dense, 3.0).focal_jacobian(problem.evaluation(params, obs))
    assert expected.abs().max() > 0.1 and torch.allclose(analytic, expected * 3.0 ** 0.5, rtol=1e-4, atol=1e-6)
