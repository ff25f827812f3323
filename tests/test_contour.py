"""The lower-face silhouette and the sliding-contour term."""

import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.energy.base import Observations
from tracker.energy.contour import POINTS_KEY, WEIGHTS_KEY, ContourEnergy, ContourEnergyConfig
from tracker.fit.solver import Problem, fit_lm
from tracker.flame.assets import load_flame_bundle
from tracker.flame.contour import closest_on_segments, silhouette_edges
from tracker.flame.model import FlameParams


@pytest.fixture(scope="module")
def bundle():
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "ibug68")


def test_closest_point_on_segments():
    start = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]])
    end = torch.tensor([[[10.0, 0.0], [10.0, 10.0]]])
    points = torch.tensor([[[4.0, 3.0], [12.0, 6.0], [-2.0, 0.0]]])
    index, t, dist = closest_on_segments(points, start, end, torch.tensor([[True, True]]))
    assert index.tolist() == [[0, 1, 0]]
    assert torch.allclose(t, torch.tensor([[0.4, 0.6, 0.0]]))
    assert torch.allclose(dist, torch.tensor([[3.0, 2.0, 2.0]]))
    _, _, dist = closest_on_segments(points, start, end, torch.tensor([[False, True]]))
    assert torch.allclose(dist[0, 0], torch.tensor(6.0))  # only the second segment is usable


def test_closest_segment_is_searched_among_each_frames_usable_ones():
    """Frames with different numbers of usable segments: each point's answer is the brute-force nearest of its
    own frame's usable segments (their index among all segments)."""
    g = torch.Generator().manual_seed(3)
    B, C, E = 3, 7, 50
    start, end = torch.rand(B, E, 2, generator=g) * 100, torch.rand(B, E, 2, generator=g) * 100
    points = torch.rand(B, C, 2, generator=g) * 100
    usable = torch.rand(B, E, generator=g) < torch.tensor([[0.05], [0.3], [0.9]])
    index, t, dist = closest_on_segments(points, start, end, usable)
    for b in range(B):
        for c in range(C):
            best = min((float(closest_on_segments(points[b:b + 1, c:c + 1], start[b:b + 1, e:e + 1],
                                                  end[b:b + 1, e:e + 1], usable[b:b + 1, e:e + 1])[2]), e)
                       for e in range(E) if usable[b, e])
            assert int(index[b, c]) == best[1] and abs(float(dist[b, c]) - best[0]) < 1e-4
            e = best[1]
            on = start[b, e] + t[b, c] * (end[b, e] - start[b, e])
            assert abs(float((points[b, c] - on).norm()) - best[0]) < 1e-4


def head(model, yaw: float = 0.0) -> FlameParams:
    p = FlameParams.zeros(1, model.n_shape, model.n_expr)
    p.rotation[0, 1] = yaw
    p.translation[0] = torch.tensor([0.0, 0.0, -0.8])
    return p


def test_silhouette_lies_on_the_projected_outline(bundle):
    """Seen from the front the lower-face silhouette spans the cheeks on both sides and the chin; every
    cheek silhouette lies on the outer boundary of the projected region (almost nothing of the lower-face region
    projects beyond it horizontally at its height; by the ears the head widens again behind the cheek)."""
    model, region = bundle.model, bundle.landmarks.outline
    camera = Camera.from_image(512, 512, fov_deg=30)
    with torch.no_grad():
        pix = camera.project(model(head(model), region.vertex_ids).vertices)[0]
    on = silhouette_edges(pix, region)[0]
    mid = (pix[0, region.edges[on, 0]] + pix[0, region.edges[on, 1]]) / 2
    centre = pix[0, :, 0].mean()
    assert (mid[:, 0] < centre - 40).any() and (mid[:, 0] > centre + 40).any()
    # Outer: for silhouette points on the cheeks, how far the region reaches beyond them at the same height.
    beyond = []
    for x, y in mid[(mid[:, 0] - centre).abs() > 50].tolist():
        row = pix[0, (pix[0, :, 1] - y).abs() < 2]
        beyond.append(float(((row[:, 0] - centre) * (1 if x > centre else -1)).max()) - abs(x - centre))
    assert len(beyond) > 10 and sorted(beyond)[len(beyond) // 2] < 1.0


def test_sliding_contour_recovers_the_pose(bundle):
    """Outline points sampled anywhere on the true silhouette (not at vertices) pull a shifted, turned head
    back: the term's minimum is the truth although the points' partners slide."""
    model, region = bundle.model, bundle.landmarks.outline
    camera = Camera.from_image(512, 512, fov_deg=30)
    truth = head(model, yaw=0.3)
    with torch.no_grad():
        pix = camera.project(model(truth, region.vertex_ids).vertices)[0]
    on = torch.nonzero(silhouette_edges(pix, region)[0])[:, 0]
    g = torch.Generator().manual_seed(0)
    pick = on[torch.randperm(len(on), generator=g)[:30]]
    t = torch.rand(len(pick), 1, generator=g)
    points = pix[0, region.edges[pick, 0]] * (1 - t) + pix[0, region.edges[pick, 1]] * t
    obs = Observations(torch.zeros(1, 0, 2), torch.zeros(1, 0), torch.tensor([200.0]),
                       extras={POINTS_KEY: points[None], WEIGHTS_KEY: torch.ones(1, len(pick))})
    term = ContourEnergy(ContourEnergyConfig(weight=1.0, robust="l2"), model, region)
    problem = Problem(model, bundle.landmarks, camera, [term])
    start = truth.detach()
    start.translation[0, 0] += 0.01
    start.rotation[0, 1] -= 0.1
    before = float(problem.energy(start, obs))
    fitted, _ = fit_lm(problem, start, obs, ["rotation", "translation"], iters=20, rounds=4)
    assert float(problem.energy(truth, obs)) < 1e-6 * before
    assert (fitted.translation - truth.translation).norm() < 0.002
    assert (fitted.rotation - truth.rotation).norm() < 0.02


def test_matches_read_the_landmark_pass_or_their_own_vertices_alike(bundle):
    """In a solver round the outline's partner vertices are computed in the landmarks' FLAME pass
    (Problem.sparse_layout); outside one (no layout) the term evaluates them itself: same residuals, and the
    layout holds the landmark vertices first, then only the partners' other vertices."""
    model, region = bundle.model, bundle.landmarks.outline
    camera = Camera.from_image(512, 512, fov_deg=30)
    truth = head(model, yaw=0.4)
    with torch.no_grad():
        pix = camera.project(model(truth, region.vertex_ids).vertices)[0]
    g = torch.Generator().manual_seed(1)
    points = pix[0, torch.randperm(pix.shape[1], generator=g)[:25]] + torch.randn(25, 2, generator=g) * 4
    obs = Observations(torch.zeros(1, 0, 2), torch.zeros(1, 0), torch.tensor([200.0]),
                       extras={POINTS_KEY: points[None], WEIGHTS_KEY: torch.ones(1, 25)})
    term = ContourEnergy(ContourEnergyConfig(weight=1.0, robust="cauchy"), model, region)
    problem = Problem(model, bundle.landmarks, camera, [term])
    moved = truth.detach()
    moved.expr[0, :3] += 0.5
    state = problem.prepare(problem.evaluation(truth, obs))
    ids, _ = layout = problem.sparse_layout(state)
    landmark_ids = bundle.landmarks.vertex_ids
    partners = torch.unique(state["contour"].vertex_ids)
    assert torch.equal(ids[:len(landmark_ids)], landmark_ids)
    assert set(ids.tolist()) == set(landmark_ids.tolist()) | set(partners.tolist())
    assert len(ids) - len(landmark_ids) < 2 * 25  # the partners, not the whole outline region
    shared = problem.residuals(moved, obs, term_state=state, layout=layout)
    alone = problem.residuals(moved, obs, term_state=state)
    assert shared.abs().max() > 1e-3 and torch.allclose(shared, alone, atol=1e-6)
