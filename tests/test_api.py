"""The Python API: tracker.track returns a result, tracker.load reads one back; report.png per run."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import tracker
from tests.conftest import REPO, VIDEOS
from tracker.api import nested_overrides, resolve_config
from tracker.camera import Camera
from tracker.config import TrackerConfig
from tracker.errors import TrackerError


def test_import_tracker_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, tracker; print('torch' in sys.modules)"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr


def test_load_gives_the_arrays_and_the_mesh(tracked_wojtek):
    result = tracker.load(tracked_wojtek)
    T = len(result)
    assert T == 20 and result.frame_index.tolist() == list(range(20)) and result.valid.all()
    assert result["expr"].shape == (T, result.metadata["n_expr"]) and result.params["rotation"].shape == (T, 3)
    assert result.K.shape == (T, 3, 3) and result.R.shape == (T, 3, 3) and result.t.shape == (T, 3)
    assert result.summary["frames"] == T
    verts = result.vertices(5)
    assert verts.shape == (5023, 3) and np.isfinite(verts).all()
    # the same mesh the tracker fitted: its projection with the exported camera lies on the image, the head
    # in front of the camera, about where the landmarks were (the centre half of the 512 px frame)
    pixels = result.project(verts, 5)
    assert ((pixels > 64) & (pixels < 448)).mean() > 0.95
    camera = Camera.from_image(512, 512, focal=float(result.K[5, 0, 0]))
    with torch.no_grad():
        own = camera.project(torch.as_tensor(verts))[0].numpy() - 0.5
    assert np.abs(own - pixels).max() < 1e-3
    assert tracker.load(tracked_wojtek / "flame_params.npz").path == result.path


def test_report_is_written(tracked_wojtek):
    from tracker.io.report import head_pose_degrees, invalid_runs

    png = (tracked_wojtek / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    arrays = tracker.load(tracked_wojtek).arrays
    assert arrays["stage_names"].tolist() == ["landmarks"] and arrays["stage_energy"].shape == (1, 20)
    assert np.isfinite(arrays["stage_energy"]).all() and (arrays["stage_energy"] > 0).all()
    # yaw about y, pitch about x, roll about z (degrees), invalid frames grouped into runs
    pose = head_pose_degrees(np.array([[0, np.radians(30), 0], [np.radians(10), 0, 0]]), np.zeros((2, 3)))
    assert np.allclose(pose, [[30, 0, 0], [0, 10, 0]], atol=1e-6)
    assert invalid_runs(np.arange(6), np.array([1, 0, 0, 1, 1, 0], bool)) == [(0.5, 2.5), (4.5, 5.5)]


def test_overrides_and_config():
    assert nested_overrides({"seed": 3, "video__max_frames": 5, "output": {"video": False}}) == \
        {"seed": 3, "video": {"max_frames": 5}, "output": {"video": False}}
    cfg = resolve_config(TrackerConfig(), {"fit__keyframes": 2})
    assert cfg.fit.keyframes == 2 and TrackerConfig().fit.keyframes != 2
    with pytest.raises(TrackerError, match="unknown config key"):
        resolve_config(None, {"video__max_frame": 5})


def test_track_returns_a_result(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / "cache"))
    result = tracker.track(VIDEOS / "wojtek.mp4", show_progress=False, video__max_frames=3, fit__keyframes=2,
                           densemarks__mode="off", output={"dir": str(tmp_path), "video": False, "report": False})
    assert len(result) == 3 and result.valid.all() and result.summary["valid_frames"] == 3
    assert result.path == tmp_path / "wojtek" / "flame_params.npz"
    assert not (tmp_path / "wojtek" / "report.png").exists()
    assert result.metadata["config"]["fit"]["keyframes"] == 2


def test_a_missing_optional_detector_package_is_one_clear_error(monkeypatch):
    """--landmarks dlib without the dlib extra: a missing-asset error naming the extra, not a traceback."""
    import builtins

    from tracker.detect.base import make_detector
    from tracker.errors import MissingAssetError

    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ModuleNotFoundError("No module named 'dlib'", name="dlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tracker.detect.dlib", raising=False)
    monkeypatch.delitem(sys.modules, "dlib", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with pytest.raises(MissingAssetError, match=r"needs the dlib package: pip install \".\[dlib\]\""):
        make_detector("dlib")
