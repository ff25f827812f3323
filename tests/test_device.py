"""No hidden CPU assumptions (there is no GPU here): the landmark energy and its analytic derivatives run with
every tensor on the `meta` device, where a tensor created on the CPU inside it fails; tensors reach numpy only through an explicit .cpu()."""

import ast
from pathlib import Path

import torch

from tests.conftest import REPO
from tracker.camera import Camera
from tracker.config import TrackerConfig
from tracker.energy.base import Observations
from tracker.fit.solver import LANDMARK_FIELDS
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameParams
from tracker.pipeline import landmark_terms_problem

META = torch.device("meta")


def on_meta(problem):
    """The problem with every tensor on `meta`: it is built on the CPU (the landmark vertex subset reads data),
    then moved, model, subset model, landmarks, camera and the terms' own tensors."""
    problem.model.to(META)
    problem.landmark_model.to(META)
    problem.landmarks = problem.landmarks.to(META)
    problem.camera = Camera.from_image(problem.camera.height, problem.camera.width, device=META)
    for term in problem.terms:
        for name, value in vars(term).items():
            if isinstance(value, torch.Tensor):
                setattr(term, name, value.to(META))
    return problem


def test_landmark_energy_and_its_derivatives_create_no_cpu_tensors():
    bundle = load_flame_bundle(None, None, 20, 10, "mediapipe478")
    problem = on_meta(landmark_terms_problem(bundle.model, bundle.landmarks, Camera.from_image(240, 320),
                                             TrackerConfig()))
    B, L = 3, len(problem.landmarks.detector_index)
    params = FlameParams.zeros(B, 20, 10, META)
    obs = Observations(torch.zeros(B, L, 2, device=META), torch.ones(B, L, device=META), torch.ones(B, device=META))
    residuals = problem.residuals(params, obs, reference=params)
    assert residuals.device == META and residuals.shape[0] == B and residuals.shape[1] > 2 * L
    jacobian = problem.residual_jacobian(problem.evaluation(params, obs, reference=params), LANDMARK_FIELDS)
    assert jacobian.device == META and jacobian.shape == (*residuals.shape, 10 + 3 + 3 + 6 + 2 + 3)
    vertices = problem.model(params).vertices
    assert vertices.device == META and vertices.shape == (B, bundle.model.n_vertices, 3)


def numpy_calls_without_cpu(path: Path) -> list[int]:
    """Lines where `x.numpy()` is called on something that is not `....cpu()` (fails for a GPU tensor)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
            receiver = node.func.value
            on_cpu = isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute) \
                and receiver.func.attr == "cpu"
            if not on_cpu and not node.args:  # np.asarray(...).numpy() does not exist; torch.Tensor.numpy() only
                lines.append(node.lineno)
    return lines


def test_tensors_reach_numpy_through_cpu():
    offenders = {str(path.relative_to(REPO)): lines for path in sorted((REPO / "tracker").rglob("*.py"))
                 if (lines := numpy_calls_without_cpu(path))}
    assert offenders == {}
