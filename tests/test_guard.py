"""The image stages' guard: refined frames carried away from their landmarks keep their landmark fit; a
refinement that fails on most frames is dropped."""

import numpy as np
import pytest
import torch

from tracker.config import PhotometricGuardConfig
from tracker.fit.guard import guard_error_growth
from tracker.fit.sequence import TrackResult
from tracker.flame.model import FlameParams


def track(errors: list[float], rotation_y: float) -> TrackResult:
    T = len(errors)
    params = FlameParams.zeros(T, 4, 3)
    params.rotation[:, 1] = rotation_y
    params.shape += rotation_y  # the shared identity: kept from the refinement unless it is dropped
    errors = np.array(errors, np.float32)
    return TrackResult(params, 500.0, np.isfinite(errors), errors, np.zeros(T, bool))


def test_frames_far_from_their_landmarks_keep_the_landmark_fit():
    landmark = track([1.0, 1.0, 2.0, np.nan, 1.0], 0.0)
    refined = track([1.5, 9.0, 2.5, np.nan, 6.5], 0.3)
    face_size = np.full(5, 100.0)  # allowance: 5 px more than the landmark stage's error
    result, report = guard_error_growth(landmark, refined, face_size, PhotometricGuardConfig(max_shift=0.05))
    assert report == {"checked": 4, "rejected": 2, "rejected_frames": [1, 4], "dropped": False}
    assert result.params.rotation[:, 1].tolist() == pytest.approx([0.3, 0.0, 0.3, 0.3, 0.0])
    assert torch.equal(result.params.shape, refined.params.shape)
    assert np.allclose(result.lmk_error_px, [1.5, 1.0, 2.5, np.nan, 1.0], equal_nan=True)
    assert refined.params.rotation[1, 1] == pytest.approx(0.3)  # the input is not modified


def test_a_refinement_failing_on_most_frames_is_dropped():
    landmark = track([1.0, 1.0, 1.0], 0.0)
    refined = track([20.0, 30.0, 1.2], 0.3)
    with pytest.warns(UserWarning, match="2 of 3 refined frames moved far"):
        result, report = guard_error_growth(landmark, refined, np.full(3, 100.0), PhotometricGuardConfig(max_rejected=0.5),
                                          "photometric")
    assert result is landmark and report["dropped"] and report["rejected"] == 2
    unchanged, report = guard_error_growth(landmark, track([1.0, 1.1, 1.2], 0.3), np.full(3, 100.0))
    assert report["rejected"] == 0 and unchanged.params.rotation[0, 1] == pytest.approx(0.3)
