"""Bridging detector gaps with optical flow: which gaps are bridged, and the poses a bridged gap gets on a
synthetic head turn (eval.synthetic: textured, lit, noisy frames) whose middle frames lost their landmarks."""

import numpy as np
import pytest
import torch

from eval.synthetic.generate import generate_sequence, load_assets, load_ground_truth
from eval.synthetic.scenario import Segment, SequenceSpec
from eval.tracked import head_rotation
from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.camera import Camera
from tracker.config import BridgeConfig, TrackerConfig
from tracker.energy.base import Observations
from tracker.energy.priors import PriorEnergy
from tracker.energy.temporal import TemporalEnergy
from tracker.fit.bridge import bridge_gaps, detector_gaps, interpolated
from tracker.fit.sequence import TrackResult, fill_gaps
from tracker.fit.solver import Problem
from tracker.flame.assets import load_flame_bundle
from tracker.flame.lbs import matrix_to_axis_angle
from tracker.io.export import FrameTable, flame_arrays
from tracker.io.video import read_frames

TURN = SequenceSpec("bridge_turn", (Segment("turn", 32),), photo=2, seed=21, image_size=256, max_yaw_deg=50.0)
GAP = (9, 14)
"""Frames whose landmarks are dropped: the head turns by about 25 degrees across them."""


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(B,) angles between rotation matrices (B, 3, 3), degrees."""
    return np.degrees(matrix_to_axis_angle(a.transpose(1, 2) @ b).norm(dim=-1).numpy())


def test_short_gaps_next_to_fitted_frames_are_bridged():
    valid = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0], bool)
    assert detector_gaps(valid, 3) == [(0, 2), (4, 7), (14, 15)]  # the five-frame gap is too long
    assert detector_gaps(valid, 5) == [(0, 2), (4, 7), (8, 13), (14, 15)]
    assert detector_gaps(np.zeros(4, bool), 10) == []  # nothing to start from


def test_interpolated_parameters_turn_by_slerp(bundle):
    model = bundle.model
    before, after = (model_params(model, [0.0, 0.2, 0.0]), model_params(model, [0.0, 0.8, 0.0]))
    middle = interpolated(before, after, 0.25)
    assert torch.allclose(middle.rotation, torch.tensor([[0.0, 0.35, 0.0]]), atol=1e-5)
    assert interpolated(before, None, 0.5) is not before and torch.equal(interpolated(before, None, 0.5).rotation,
                                                                         before.rotation)


def model_params(model, rotation):
    from tracker.flame.model import FlameParams
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.rotation[0] = torch.tensor(rotation)
    return params


@pytest.fixture(scope="module")
def bundle():
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")


@pytest.fixture(scope="module")
def turn(tmp_path_factory):
    assets = load_assets(tmp_path_factory.mktemp("cache"), str(FLAME_STANDIN), str(FLAME_ASSETS))
    sequence = generate_sequence(TURN, assets, tmp_path_factory.mktemp("turn"))
    return sequence, load_ground_truth(sequence.ground_truth)


def test_a_bridged_gap_follows_the_turn(bundle, turn):
    """The frames around the gap hold the true parameters (what the landmark stage gives at best); the gap's
    frames, filled with their nearest neighbour's pose by the landmark stage, get poses within 3 degrees of
    the truth from the flow (2.5 at most when measured), where the nearest neighbour is up to 22 degrees off."""
    sequence, gt = turn
    T = gt.n_frames
    valid = np.ones(T, bool)
    valid[GAP[0]:GAP[1]] = False
    truth = gt.params
    rows = [truth.frames(slice(t, t + 1)) if valid[t] else None for t in range(T)]
    filled = fill_gaps(rows)
    from tracker.fit.solver import FRAME_FIELDS
    from tracker.flame.model import FlameParams
    params = FlameParams(shape=truth.shape, **{n: torch.cat([getattr(p, n) for p in filled]) for n in FRAME_FIELDS})
    errors = np.where(valid, 0.5, np.nan).astype(np.float32)
    result = TrackResult(params, float(gt.camera.focal), valid, errors, np.zeros(T, bool))
    cfg = TrackerConfig()
    problem = Problem(bundle.model, bundle.landmarks, gt.camera,
                      [PriorEnergy(cfg.energy.priors, bundle.model), TemporalEnergy(cfg.energy.temporal)])
    obs = Observations(torch.zeros(T, 0, 2), torch.zeros(T, 0), torch.full((T,), 80.0))
    bridged_result, bridged, report = bridge_gaps(problem, result, obs, lambda: read_frames(sequence.video),
                                                  bundle.masks, cfg.bridge)
    gap = np.zeros(T, bool)
    gap[GAP[0]:GAP[1]] = True
    assert np.array_equal(bridged, gap) and bridged_result.valid.all()
    assert report == {"ran": True, "gaps": 1, "bridged": int(gap.sum()), "unfitted": 0}
    assert np.isfinite(bridged_result.lmk_error_px[gap]).all() and (bridged_result.lmk_error_px[gap] < 3).all()
    true_rotation = head_rotation(truth).float()
    nearest = angle_deg(head_rotation(result.params).float(), true_rotation)[gap]
    flow = angle_deg(head_rotation(bridged_result.params).float(), true_rotation)[gap]
    assert nearest.max() > 10 and flow.max() < 3.0, (nearest, flow)
    assert torch.equal(bridged_result.params.rotation[~torch.as_tensor(gap)],
                       result.params.rotation[~torch.as_tensor(gap)])  # fitted frames are left alone

    off = bridge_gaps(problem, result, obs, lambda: read_frames(sequence.video), bundle.masks,
                      BridgeConfig(enabled=False))
    assert off[0] is result and not off[1].any() and off[2]["bridged"] == 0


def test_the_export_marks_bridged_frames(bundle):
    from tracker.flame.model import FlameParams
    T = 3
    params = FlameParams.zeros(T, bundle.model.n_shape, bundle.model.n_expr)
    params.translation[:, 2] = -0.6
    camera = Camera.from_image(64, 64)
    table = FrameTable(params, np.arange(T), np.arange(T) / 25.0, np.ones(T, bool), np.ones(T, np.float32),
                       bridged=np.array([False, True, False]))
    assert flame_arrays(table, camera, 25.0)["bridged"].tolist() == [False, True, False]
    plain = FrameTable(params, np.arange(T), np.arange(T) / 25.0, np.ones(T, bool), np.ones(T, np.float32))
    assert not flame_arrays(plain, camera, 25.0)["bridged"].any()
