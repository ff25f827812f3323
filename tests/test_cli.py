"""The command line end to end, and every kind of bad input it must refuse in one line."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import FLAME_STANDIN, REPO, VIDEOS
from tracker.io.export import read_params
from tracker.run import main

WOJTEK = VIDEOS / "wojtek.mp4"
DOCUMENTED_KEYS = {"shape", "expr", "jaw_pose", "neck_pose", "rotation", "translation", "eyes_pose", "eyelids",
                   "K", "R", "t", "image_size", "fps", "frame_index", "valid", "lmk_error_px"}


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tracked(tracked_wojtek):
    """20 frames of wojtek.mp4 tracked with the default (MediaPipe) pipeline, overlay video on."""
    return tracked_wojtek


def test_end_to_end_outputs(tracked):
    arrays, meta = read_params(tracked / "flame_params.npz")
    assert DOCUMENTED_KEYS <= set(arrays)
    T = 20
    assert arrays["expr"].shape[0] == T and arrays["rotation"].shape == (T, 3) and arrays["K"].shape == (T, 3, 3)
    assert arrays["eyes_pose"].shape == (T, 6) and arrays["eyelids"].shape == (T, 2)
    assert all(np.isfinite(v).all() for k, v in arrays.items() if v.dtype.kind == "f")
    assert arrays["valid"].all() and arrays["frame_index"].tolist() == list(range(T))
    assert arrays["image_size"].tolist() == [512, 512] and abs(float(arrays["fps"]) - 25) < 1e-3
    # MediaPipe's landmarks on this 512x512 clip are self-consistent to ~1 px; a FLAME fit that lies on the
    # face reprojects its 105 landmarks within 2 px on average (a misplaced or drifting head gives > 5 px).
    assert arrays["lmk_error_px"].mean() < 2.0
    assert meta["complete"] and meta["flame_sha256"] and meta["n_expr"] == 43
    assert meta["config"]["detect"]["landmarks"] == "mediapipe"
    summary = json.loads((tracked / "summary.json").read_text())
    assert summary["frames"] == T and summary["valid_frames"] == T


def test_overlay_video_has_every_frame(tracked):
    with av.open(str(tracked / "overlay.mp4")) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == 20 and (frames[0].height, frames[0].width) == (512, 512)


def test_photometric_run_exports_appearance(tmp_path):
    """--photometric on (few, cheap steps): texture and lighting next to the parameters, the stage recorded,
    a textured overlay for every frame."""
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("photometric:\n  texture_keyframe_iters: 30\n  frame_iters: 1\n  identity_rounds: 1\n"
                   "  identity_appearance_iters: 10\n  appearance_refine_iters: 10\n"
                   "  keyframes: 2\n  appearance_refine_frames: 3\n")
    code = main([str(WOJTEK), "--max-frames", "6", "--photometric", "on", "--config", str(cfg), "--densemarks", "off",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = tmp_path / "wojtek"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["photometric"]["ran"] is True and "photometric" in summary["seconds"]
    lighting = json.loads((out / "lighting.json").read_text())
    assert np.array(lighting["sh_coefficients"]).shape == (9, 3)
    texture = av.open(str(out / "texture.png"))
    assert (texture.streams.video[0].width, texture.streams.video[0].height) == (256, 256)
    texture.close()
    arrays, meta = read_params(out / "flame_params.npz")
    assert arrays["valid"].all() and arrays["lmk_error_px"].mean() < 3.0  # identity from 6 frames only
    assert meta["config"]["photometric"]["enabled"] is True
    with av.open(str(out / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6


def test_oracle_is_refused_on_a_real_video(tmp_path, capsys):
    """The evaluation-only DenseMarks oracle, pointed at a synthetic sequence's ground truth, refuses to run on
    a real clip: one line, exit 1."""
    from tests.conftest import FLAME_ASSETS
    from tracker.camera import Camera
    from tracker.config import load_config
    from tracker.flame.assets import load_flame_bundle
    from tracker.flame.model import FlameParams
    from tracker.io.export import FrameTable, write_params

    flame = load_config().flame
    model = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), flame.n_shape, flame.n_expr, "mediapipe478").model
    params = FlameParams.zeros(3, model.n_shape, model.n_expr)
    truth = tmp_path / "gt.npz"
    write_params(truth, FrameTable(params, np.arange(3), np.arange(3) / 25.0, np.ones(3, bool), np.zeros(3, np.float32)),
                 Camera.from_image(256, 256), 25.0, {"synthetic": True})
    cfg = tmp_path / "oracle.yaml"
    cfg.write_text(f"densemarks:\n  oracle: true\n  oracle_ground_truth: {truth}\n")
    code, _, err = run_cli([WOJTEK, "--max-frames", "3", "--config", cfg, "--no-video", "--out", tmp_path, "--quiet"],
                           capsys)
    assert code == 1 and "oracle" in err and "own synthetic sequence" in err
    assert len(err.strip().splitlines()) == 1


def test_head_pose_is_plausible(tracked):
    """The fitted head sits in front of the camera, upright, facing it (wojtek looks into the camera)."""
    arrays, _ = read_params(tracked / "flame_params.npz")
    assert (arrays["translation"][:, 2] < -0.2).all()  # in front of the camera (FLAME z towards the viewer)
    assert np.degrees(np.linalg.norm(arrays["rotation"], axis=1)).max() < 45


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "tracker.run", "--help"], capture_output=True, text=True,
                         cwd=REPO).stdout
    for flag in ("--flame", "--out", "--config", "--landmarks", "--device", "--max-frames", "--photometric",
                 "--densemarks", "--densemarks-weights", "--no-video", "--save-meshes"):
        assert flag in out


def test_missing_flame_exits_3_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FLAME_MODEL", raising=False)
    proc = subprocess.run([sys.executable, "-m", "tracker.run", str(WOJTEK), "--flame", str(tmp_path / "no.pkl"),
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 3  # missing asset (2 is argparse's usage error)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "flame.is.tue.mpg.de" in lines[0] and "Traceback" not in proc.stderr


def test_corrupt_flame_file(tmp_path, capsys):
    bad = tmp_path / "generic_model.pkl"
    bad.write_bytes(b"\x80\x02garbage")
    code, _, err = run_cli([WOJTEK, "--flame", bad, "--out", tmp_path, "--quiet"], capsys)
    assert code == 1 and "not a readable" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty"])
def test_bad_video(tmp_path, capsys, kind):
    path = tmp_path / "clip.mp4"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    code, _, err = run_cli([path, "--out", tmp_path, "--quiet"], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_zero_frame_video(tmp_path, capsys):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:
        container.add_stream("mpeg4", rate=25)
    code, _, err = run_cli([path, "--out", tmp_path, "--quiet"], capsys)
    assert code == 1 and "frame" in err


def test_unknown_config_key_and_bad_values(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("fit:\n  frame_iterz: 3\n")
    code, _, err = run_cli([WOJTEK, "--config", cfg, "--out", tmp_path], capsys)
    assert code == 1 and "fit.frame_iterz" in err
    code, _, err = run_cli([WOJTEK, "--stride", "0", "--out", tmp_path], capsys)
    assert code == 1 and "stride" in err
    cfg.write_text("energy:\n  landmarks:\n    weight: -1\n")
    code, _, err = run_cli([WOJTEK, "--config", cfg, "--out", tmp_path], capsys)
    assert code == 1 and "weight" in err
    code, _, err = run_cli([WOJTEK, "--device", "cuda:7", "--out", tmp_path], capsys)
    assert code == 1 and "CUDA" in err


def _video_with_black_frames(path: Path, n: int, black: set[int]) -> None:
    with av.open(str(WOJTEK)) as src, av.open(str(path), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 512
        stream.pix_fmt = "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i == n:
                break
            rgb = frame.to_ndarray(format="rgb24")
            if i in black:
                rgb = np.zeros_like(rgb)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)


def test_frames_without_a_face_are_marked_and_tracking_goes_on(tmp_path, capsys):
    video = tmp_path / "gaps.mp4"
    _video_with_black_frames(video, 12, {4, 5, 6})
    code, out, _ = run_cli([video, "--out", tmp_path, "--no-video", "--quiet"], capsys)
    assert code == 0 and "3 without a face" in out
    arrays, _ = read_params(tmp_path / "gaps" / "flame_params.npz")
    assert arrays["valid"].tolist() == [i not in {4, 5, 6} for i in range(12)]
    assert np.isnan(arrays["lmk_error_px"][4]) and arrays["lmk_error_px"][[0, 3, 7, 11]].max() < 3
    assert np.isfinite(arrays["rotation"]).all()  # gaps hold their neighbour's values, flagged invalid


def test_crash_keeps_finished_frames(tmp_path, capsys, monkeypatch):
    import tracker.fit.sequence as sequence

    real_fit, calls = sequence.fit_lm, {"n": 0}

    def failing_fit(*args, **kwargs):
        calls["n"] += "reference" in kwargs  # one per window of frames (fit.window: 8), the last pass
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sequence, "fit_lm", failing_fit)
    code, _, err = run_cli([WOJTEK, "--max-frames", "20", "--out", tmp_path, "--no-video", "--quiet"], capsys)
    assert code == 4 and "simulated failure" in err  # an internal error, not bad input
    arrays, meta = read_params(tmp_path / "wojtek" / "flame_params.npz")
    assert meta["complete"] is False and len(arrays["frame_index"]) == 8  # the first window
    assert np.isfinite(arrays["rotation"]).all()


def test_commands_report_tracker_errors_in_one_line(capsys):
    from tracker.errors import MissingAssetError, run_reporting_errors

    def missing() -> None:
        raise MissingAssetError("weights not found at /x")

    assert run_reporting_errors(missing) == 3
    assert capsys.readouterr().err == "error: weights not found at /x\n"
    assert run_reporting_errors(lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # bugs are not bad input: they keep their traceback
        run_reporting_errors(lambda: 1 / 0)
