"""The statistical priors: their maths, and that a MAP identity fit beats the mean face."""

import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.config import load_config
from tracker.energy.base import Observations
from tracker.energy.head_size import head_size
from tracker.energy.landmarks import LandmarkEnergy
from tracker.energy.priors import (
    SPARSITY_EPS,
    PriorConfig,
    PriorEnergy,
    barrier_residuals,
    expression_basis,
    sparsity_residuals,
)
from tracker.energy.temporal import TemporalEnergy
from tracker.fit.sequence import SequenceTracker, choose_keyframes
from tracker.fit.solver import Problem
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameParams


@pytest.fixture(scope="module")
def bundle():
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")


class Pca:
    """A model whose expressions are unnamed (PCA, like official FLAME)."""
    expression_names: list = []


def prior_energy(prior: PriorEnergy, params: FlameParams, shared_frames: int | None = None) -> float:
    """The prior's energy summed over the batch (shared terms spread over `shared_frames`, default the batch)."""
    class Ev:
        pass
    ev = Ev()
    ev.params, ev.shared_frames = params, shared_frames or params.batch_size
    return float(prior(ev).pow(2).sum())


def test_identity_prior_is_half_squared_norm_counted_once(bundle):
    """-log N(0, I) of the shared identity, weighted, whatever the number of frames in the batch."""
    cfg = PriorConfig(weight=2.0, shape=0.5, expr=0.0, expr_sparsity=0.0, expr_bounds=0.0, jaw=0.0, neck=0.0,
                      eyes=0.0, eyelids=0.0)
    prior = PriorEnergy(cfg, bundle.model)
    beta = torch.linspace(-2, 2, bundle.model.n_shape)[None]
    for frames in (1, 7):
        params = FlameParams.zeros(frames, bundle.model.n_shape, bundle.model.n_expr)
        params.shape = beta
        assert prior_energy(prior, params) == pytest.approx(2.0 * 0.5 * float(beta.pow(2).sum()), rel=1e-5)
    # A chunk of 7 frames of a 21-frame track carries a third of it.
    assert prior_energy(prior, params, shared_frames=21) == pytest.approx(2.0 * 0.5 * float(beta.pow(2).sum()) / 3,
                                                                          rel=1e-5)


def test_expression_prior_follows_the_basis(bundle):
    """Blendshape rigs (named expressions) get the barrier and sparsity terms; PCA models a Gaussian only."""
    assert expression_basis(bundle.model) == "blendshapes"
    assert expression_basis(Pca()) == "pca"
    cfg = PriorConfig(weight=1.0, shape=0.0, expr=0.3, expr_sparsity=0.2, expr_bounds=10.0)
    expr = torch.tensor([[0.5, -0.2, 1.4, 0.0]])
    pca = PriorEnergy(cfg, Pca()).expression_residuals(expr).pow(2).sum()
    assert float(pca) == pytest.approx(0.3 * float(expr.pow(2).sum()), rel=1e-5)
    rig = PriorEnergy(cfg, bundle.model).expression_residuals(expr).pow(2).sum()
    smooth_l1 = (torch.sqrt(expr ** 2 + SPARSITY_EPS ** 2) - SPARSITY_EPS).sum()
    outside = 0.2 ** 2 + 0.4 ** 2
    assert float(rig) == pytest.approx(float(pca + 0.2 * smooth_l1 + 10.0 * outside), rel=1e-4)


def test_eyelid_prior_is_light_l2_and_a_barrier_outside_open_to_closed(bundle):
    """Eyelid closing coefficients: a light pull towards open, and a barrier outside [-0.25, 1.25] (open 0,
    closed 1, with a margin) whatever the expression basis (an eyelid turned away from the camera must not drift
    to any value)."""
    cfg = PriorConfig(weight=2.0, shape=0.0, expr=0.0, expr_sparsity=0.0, expr_bounds=0.0, jaw=0.0, neck=0.0,
                      eyes=0.0, eyelids=0.01, eyelid_bounds=10.0)
    params = FlameParams.zeros(2, bundle.model.n_shape, bundle.model.n_expr)
    params.eyelids = torch.tensor([[-0.2, 1.25], [-0.5, 1.5]])
    inside = 0.2 ** 2 + 1.25 ** 2 + 0.5 ** 2 + 1.5 ** 2
    outside = 0.25 ** 2 + 0.25 ** 2
    for model in (bundle.model, Pca()):
        assert prior_energy(PriorEnergy(cfg, model), params) == pytest.approx(2.0 * (0.01 * inside + 10.0 * outside),
                                                                              rel=1e-5)


def test_barrier_and_sparsity_residuals():
    a = torch.tensor([[-0.5, 0.0, 0.3, 1.0, 1.25]])
    assert torch.allclose(barrier_residuals(a), torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.25]]))
    # Quadratic near zero (smooth for Gauss-Newton), linear (L1) far from it.
    small, large = torch.tensor([[1e-3]]), torch.tensor([[2.0]])
    assert float(sparsity_residuals(small) ** 2) == pytest.approx(1e-6 / (2 * SPARSITY_EPS), rel=1e-2)
    assert float(sparsity_residuals(large) ** 2) == pytest.approx(2.0 - SPARSITY_EPS, rel=1e-3)
    # Signed and smooth through 0 (sqrt of the smooth L1 has a kink there that stalls Gauss-Newton): odd, with a
    # finite, non-zero slope 1 / sqrt(2 eps) at 0.
    assert torch.equal(sparsity_residuals(-large), -sparsity_residuals(large))
    zero = torch.zeros(1, 1, requires_grad=True)
    sparsity_residuals(zero).sum().backward()
    assert float(zero.grad) == pytest.approx((2 * SPARSITY_EPS) ** -0.5, rel=1e-6)


def test_keyframes_span_the_head_poses():
    """Farthest-point sampling in (yaw, pitch) picks the frontal frame and both sides of a turn, up to the
    largest keyframe angle (45 degrees)."""
    yaw = np.concatenate([np.zeros(50), np.linspace(0, 80, 17), np.linspace(80, -70, 31)])
    angles = np.stack([yaw, np.zeros_like(yaw)], 1)
    valid = np.ones(len(yaw), bool)
    keys = choose_keyframes(valid, 3, angles)
    assert sorted(np.round(yaw[keys]).tolist()) == [-45, 0, 45]
    assert len(choose_keyframes(valid, 3)) == 3  # without angles: spread over the sequence


@pytest.mark.parametrize("shape_prior, margin", [(None, 0.9), (0.005, 0.6)])
def test_identity_from_exact_landmarks_beats_the_mean_face(bundle, shape_prior, margin):
    """A known identity drawn from the prior, seen in 10 poses through exact landmarks: the MAP identity fitted
    on keyframes is clearly closer to it than the mean face (neutral face vertices). Landmarks do not see every
    identity direction (the prior keeps those at the mean), so the fit does not reach the truth; the default
    prior, sized for a detector's errors, holds it nearer the mean than a weak one. Faces are compared at the
    true head's size: landmarks cannot see size (the fit keeps the mean head's, `fit.hold_head_size`)."""
    model = bundle.model
    g = torch.Generator().manual_seed(11)
    T = 10
    truth = FlameParams.zeros(T, model.n_shape, model.n_expr)
    truth.shape = torch.randn(1, model.n_shape, generator=g)
    truth.rotation[:, 1] = torch.linspace(-0.7, 0.7, T)
    truth.rotation[:, 0] = 0.15 * torch.sin(torch.arange(T) * 1.3)
    truth.translation[:] = torch.tensor([0.0, 0.0, -0.9])
    truth.jaw_pose[:, 0] = 0.1 * (torch.arange(T) % 3)
    camera = Camera.from_image(512, 512, fov_deg=30)
    priors = {} if shape_prior is None else {"shape": shape_prior}
    cfg = load_config(overrides={"camera": {"focal": float(camera.focal)}, "energy": {"priors": priors}})
    terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, model),
             TemporalEnergy(cfg.energy.temporal)]
    problem = Problem(model, bundle.landmarks, camera, terms)
    clean = problem.evaluation(truth, None).landmarks_2d.detach()
    size = (clean.amax(1) - clean.amin(1)).norm(dim=-1)
    obs = Observations(clean, torch.ones(clean.shape[:2]), size)
    shape = SequenceTracker(problem, cfg).estimate_identity(obs, np.ones(T, bool)).shape

    face = torch.as_tensor(bundle.masks["face"])

    def neutral(beta):
        """Neutral face vertices, scaled about the head's centroid to the true head's size."""
        p = FlameParams.zeros(1, model.n_shape, model.n_expr)
        p.shape = beta
        head = model(p).vertices[0]
        centre = head.mean(0)
        return centre + (head[face] - centre) * float(head_size(model, truth.shape) / head_size(model, beta))

    with torch.no_grad():
        true_face = neutral(truth.shape)
        fitted = (neutral(shape) - true_face).norm(dim=-1).mean()
        mean = (neutral(torch.zeros_like(shape)) - true_face).norm(dim=-1).mean()
    assert fitted < margin * mean, (float(fitted), float(mean))


def test_identity_keeps_the_mean_head_size_unless_told_otherwise(bundle):
    """One camera sees a head's size only together with its distance, so the keyframe identity keeps the mean
    head's size (`fit.hold_head_size`) while its shape follows the landmarks; switched off, the size drifts with
    the shape (here towards the true head's, 3% larger)."""
    model = bundle.model
    T = 6
    truth = FlameParams.zeros(T, model.n_shape, model.n_expr)
    g = torch.Generator().manual_seed(5)
    truth.shape = 0.5 * torch.randn(1, model.n_shape, generator=g)
    mean_size = float(head_size(model, torch.zeros_like(truth.shape)))
    # Grow the head 3% along the identity directions that scale the template best.
    dirs = model.dirs[:, :, :model.n_shape].reshape(-1, model.n_shape)
    centred = model.v_template - model.v_template.mean(0)
    grow = torch.linalg.lstsq(dirs, 0.03 * centred.reshape(-1, 1)).solution[:, 0]
    truth.shape = truth.shape + grow
    true_size = float(head_size(model, truth.shape))
    assert true_size / mean_size > 1.02
    truth.rotation[:, 1] = torch.linspace(-0.6, 0.6, T)
    truth.translation[:] = torch.tensor([0.0, 0.0, -0.9])
    camera = Camera.from_image(512, 512, fov_deg=30)
    sizes = {}
    for hold in (True, False):
        cfg = load_config(overrides={"camera": {"focal": float(camera.focal)}, "fit": {"hold_head_size": hold},
                                     "energy": {"priors": {"shape": 0.005}}})
        terms = [LandmarkEnergy(cfg.energy.landmarks), PriorEnergy(cfg.energy.priors, model)]
        problem = Problem(model, bundle.landmarks, camera, terms)
        clean = problem.evaluation(truth, None).landmarks_2d.detach()
        obs = Observations(clean, torch.ones(clean.shape[:2]), (clean.amax(1) - clean.amin(1)).norm(dim=-1))
        shape = SequenceTracker(problem, cfg).estimate_identity(obs, np.ones(T, bool)).shape
        sizes[hold] = float(head_size(model, shape)) / mean_size
    assert abs(sizes[True] - 1) < 0.002, sizes
    assert sizes[False] > 1.01, sizes
