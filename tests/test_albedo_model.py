"""Loading statistical albedo models (FLAME texture space, FLAME albedo from BFM) in the tracker's texture
convention, and refusing files that are not one. The stage's use of a model: tests/test_photometric.py."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tracker.errors import TrackerError
from tracker.render.albedo_model import load_albedo_model

SIDE = 16


def images(count: int, seed: int) -> np.ndarray:
    """(count, SIDE, SIDE, 3) random images, channels in RGB order."""
    return np.random.default_rng(seed).random((count, SIDE, SIDE, 3)).astype(np.float32)


def stored(rgb: np.ndarray, scale: float) -> np.ndarray:
    """(N, S, S, 3) RGB images -> (S*S*3, N) as the files store them: BGR, pixel by pixel, times scale."""
    return np.stack([image[..., ::-1].reshape(-1) for image in rgb], axis=1) * scale


@pytest.mark.parametrize("keys,scale,name", [(("mean", "tex_dir"), 255.0, "FLAME texture space"),
                                             (("MU", "PC"), 1.0, "FLAME albedo from BFM")])
def test_both_formats_load_as_rgb_textures_with_v_up(tmp_path, keys, scale, name):
    """The mean and the first directions come back as (3, S, S) RGB in [0, 1], row 0 being the file's first
    image row (v = 1 in FLAME's layout, as the tracker's textures), whatever the file's scale."""
    mean, directions = images(1, 0), images(5, 1) - 0.5
    path = tmp_path / "albedo.npz"
    np.savez(path, **{keys[0]: stored(mean, scale)[:, 0], keys[1]: stored(directions, scale)})
    model = load_albedo_model(path, SIDE, components=3)
    assert model.components == 3 and model.mean.shape == (3, SIDE, SIDE)
    assert torch.allclose(model.mean, torch.from_numpy(mean[0]).permute(2, 0, 1), atol=1e-5)
    assert torch.allclose(model.basis, torch.from_numpy(directions[:3]).permute(0, 3, 1, 2), atol=1e-5)
    code = torch.tensor([0.5, -1.0, 2.0])
    expected = torch.from_numpy(mean[0] + np.tensordot(code.numpy(), directions[:3], axes=1)).permute(2, 0, 1)
    assert torch.allclose(model.albedo(code), expected, atol=1e-5)
    assert model.source == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                            "format": name, "components": 3, "components_in_file": 5}
    # More components asked for than the file holds: all of them.
    assert load_albedo_model(path, SIDE, components=50).components == 5


def test_the_model_is_resampled_to_the_texture_size(tmp_path):
    """Area averaging to a smaller texture (2 x 2 blocks here), bilinear to a larger one."""
    mean, directions = images(1, 2), images(2, 3)
    path = tmp_path / "albedo.npz"
    np.savez(path, MU=stored(mean, 1.0)[:, 0], PC=stored(directions, 1.0))
    small = load_albedo_model(path, SIDE // 2, components=2)
    blocks = F.avg_pool2d(torch.from_numpy(directions).permute(0, 3, 1, 2), 2)
    assert small.basis.shape == (2, 3, SIDE // 2, SIDE // 2) and torch.allclose(small.basis, blocks, atol=1e-6)
    assert load_albedo_model(path, 2 * SIDE, components=2).mean.shape == (3, 2 * SIDE, 2 * SIDE)


def test_files_that_are_no_albedo_model_are_refused_in_one_line(tmp_path):
    with pytest.raises(TrackerError, match="not found"):
        load_albedo_model(tmp_path / "missing.npz", SIDE, 10)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, shapedirs=np.zeros((5, 3, 2)))
    with pytest.raises(TrackerError, match="not an albedo model.*shapedirs"):
        load_albedo_model(wrong, SIDE, 10)
    not_square = tmp_path / "not_square.npz"
    np.savez(not_square, mean=np.zeros(10 * 20 * 3), tex_dir=np.zeros((10 * 20 * 3, 2)))
    with pytest.raises(TrackerError, match="square"):
        load_albedo_model(not_square, SIDE, 10)
    broken = tmp_path / "broken.npz"
    values = stored(images(1, 4), 255.0)
    values[7] = np.nan
    np.savez(broken, mean=values[:, 0], tex_dir=values)
    with pytest.raises(TrackerError, match="non-finite"):
        load_albedo_model(broken, SIDE, 10)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mean=np.array([{"a": 1}], dtype=object), tex_dir=np.zeros((3, 1)))
    with pytest.raises(TrackerError):
        load_albedo_model(pickled, SIDE, 10)
    for error in (wrong, not_square, broken, pickled):
        with pytest.raises(TrackerError) as info:
            load_albedo_model(error, SIDE, 10)
        assert "\n" not in str(info.value)


def test_an_albedo_model_needs_a_texture_albedo(tmp_path):
    from tracker.config import TrackerConfig
    from tracker.fit.photometric import StageCrop, check_stage_inputs
    from tracker.fit.sequence import TrackResult
    from tracker.flame.model import FlameParams

    cfg = TrackerConfig()
    cfg.photometric.albedo_model, cfg.photometric.albedo = str(tmp_path / "FLAME_texture.npz"), "vertex"
    result = TrackResult(FlameParams.zeros(1, 10, 10), 500.0, np.ones(1, bool), np.zeros(1, np.float32),
                         np.zeros(1, bool))
    crop = StageCrop(0, 0, 64, 64)
    with pytest.raises(TrackerError, match="albedo_model .*albedo: texture"):
        check_stage_inputs(result, np.zeros((1, 64, 64, 3), np.uint8), crop, cfg.photometric)
