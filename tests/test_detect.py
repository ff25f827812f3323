"""Landmark detectors, face-box tracking, square crops and the per-video detection cache."""

import logging
import os
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import MEDIAPIPE_TASK, SHARED, VIDEOS
from tracker.detect.base import FaceBox, LandmarkDetector, Landmarks, make_detector
from tracker.detect.boxes import BoxTrackerOptions, FaceBoxTracker, square_crop
from tracker.detect.cache import cache_file
from tracker.detect.mediapipe import (
    MEDIAPIPE_IBUG_EQUIVALENTS,
    SHIPPED_MODEL,
    MediaPipeDetector,
    MediaPipeOptions,
    native_stderr_to_log,
)
from tracker.detect.sequence import detect_frames, detect_video
from tracker.errors import MissingAssetError, TrackerError
from tracker.io.video import FrameSelection, read_frames

FFHQ = SHARED / "images" / "FFHQ"
MP_POINTS = [mp for mp, _ in MEDIAPIPE_IBUG_EQUIVALENTS.values()]
IBUG_POINTS = [ibug for _, ibug in MEDIAPIPE_IBUG_EQUIVALENTS.values()]


@pytest.fixture(scope="module")
def mediapipe_detector():
    with make_detector("mediapipe", model_path=str(MEDIAPIPE_TASK)) as detector:
        yield detector


@pytest.fixture(scope="module")
def dlib_detector():
    return make_detector("dlib")


@pytest.fixture(scope="module")
def wojtek_frames():
    return list(read_frames(VIDEOS / "wojtek.mp4", FrameSelection(max_frames=5)))


def face_size(landmarks: Landmarks) -> float:
    return landmarks.bounding_box().size


# Hand-read from wojtek.mp4 frame 0: eye centres (image left, image right) and nose tip, in pixels.
WOJTEK_EYES = np.array([[191.0, 238.0], [272.0, 238.0]])
WOJTEK_NOSE = np.array([232.0, 284.0])


def test_mediapipe_on_wojtek(mediapipe_detector, wojtek_frames):
    track = detect_frames(wojtek_frames, mediapipe_detector)
    assert track.valid.all() and track.points.shape == (5, 478, 2)
    assert np.all((track.points >= 0) & (track.points <= 512))
    points = track.points[0]
    eyes = np.stack([points[[33, 133]].mean(0), points[[362, 263]].mean(0)])
    np.testing.assert_allclose(eyes, WOJTEK_EYES, atol=10)
    np.testing.assert_allclose(points[4], WOJTEK_NOSE, atol=10)


def test_dlib_on_wojtek(dlib_detector, wojtek_frames):
    track = detect_frames(wojtek_frames, dlib_detector)
    assert track.valid.all() and track.points.shape == (5, 68, 2) and track.scheme == "ibug68"
    assert np.all((track.points >= 0) & (track.points <= 512))
    eyes = np.stack([track.points[0, 36:42].mean(0), track.points[0, 42:48].mean(0)])
    np.testing.assert_allclose(eyes, WOJTEK_EYES, atol=10)


def test_mediapipe_and_dlib_agree(mediapipe_detector, dlib_detector, wojtek_frames):
    for frame in wojtek_frames:
        mesh, ibug = mediapipe_detector.detect(frame.rgb), dlib_detector.detect(frame.rgb)
        error = np.linalg.norm(mesh.points[MP_POINTS] - ibug.points[IBUG_POINTS], axis=1)
        assert error.max() < 0.05 * face_size(ibug), error / face_size(ibug)


def test_tracked_crop_matches_full_search(mediapipe_detector, dlib_detector, wojtek_frames):
    # The crop-and-map-back path must land where a fresh search does; a hint off by a fifth of
    # the face size must not move the result either.
    rgb = wojtek_frames[-1].rgb
    for detector in (mediapipe_detector, dlib_detector):
        searched = detector.detect(rgb)
        box = searched.bounding_box()
        shifted = FaceBox(box.x0 + 0.2 * box.size, box.y0 - 0.1 * box.size,
                          box.x1 + 0.2 * box.size, box.y1 - 0.1 * box.size)
        for hint in (box, shifted):
            tracked = detector.detect(rgb, hint)
            error = np.linalg.norm(tracked.points - searched.points, axis=1).mean()
            assert error < 0.02 * box.size, (detector.name, error)


@pytest.mark.parametrize("kind", ["black", "noise"])
def test_no_face_in_blank_images(mediapipe_detector, dlib_detector, kind):
    rng = np.random.default_rng(0)
    image = np.zeros((256, 256, 3), np.uint8) if kind == "black" else \
        rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert mediapipe_detector.detect(image) is None
    assert dlib_detector.detect(image) is None
    assert dlib_detector.detect(image, FaceBox(64, 64, 192, 192)) is None


def test_small_face_in_1080p(mediapipe_detector, dlib_detector, shared_data):
    frame = next(read_frames(VIDEOS / "duda.mp4"))
    mesh, ibug = mediapipe_detector.detect(frame.rgb), dlib_detector.detect(frame.rgb)
    assert mesh is not None and ibug is not None
    assert face_size(mesh) < 0.2 * 1080  # the face is small: found only thanks to window search
    error = np.linalg.norm(mesh.points[MP_POINTS] - ibug.points[IBUG_POINTS], axis=1)
    assert error.max() < 0.06 * face_size(ibug)


def ffhq_images() -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(Image.open(png).convert("RGB")), np.load(png.with_suffix(".npy")))
            for png in sorted(FFHQ.glob("*.png"))]


def test_dlib_matches_ffhq_reference_landmarks(dlib_detector, shared_data):
    # Image 00005 has the mouth and chin behind a hand and microphone: dlib misplaces those, so
    # the per-image bound is looser than the average one.
    errors = []
    for image, reference in ffhq_images():
        found = dlib_detector.detect(image)
        errors.append(np.linalg.norm(found.points - reference, axis=1).mean() / image.shape[0])
    assert len(errors) == 10
    assert max(errors) < 0.035 and np.mean(errors) < 0.02, errors


def test_mediapipe_matches_ffhq_reference_at_ibug_points(mediapipe_detector, shared_data):
    errors = []
    for image, reference in ffhq_images():
        found = mediapipe_detector.detect(image)
        errors.append(np.linalg.norm(found.points[MP_POINTS] - reference[IBUG_POINTS], axis=1).mean()
                      / image.shape[0])
    assert max(errors) < 0.035 and np.mean(errors) < 0.015, errors


def test_square_crop_maps_points_back_exactly():
    # A smooth blob keeps its centroid under bilinear resampling; a half-pixel error in the
    # crop's affine map would move it by 0.5 px times the scale.
    true_center = np.array([70.3, 40.8])
    rows, cols = np.mgrid[:100, :120] + 0.5
    blob = np.exp(-((cols - true_center[0]) ** 2 + (rows - true_center[1]) ** 2) / (2 * 3.0**2))
    image = np.repeat(blob[..., None], 3, axis=2).astype(np.float32)
    ys, xs = np.mgrid[:80, :80] + 0.5
    for center, side in [((70.5, 40.5), 40.0), ((60.0, 50.0), 50.0), ((75.2, 33.9), 37.0)]:
        crop = square_crop(image, center, side, 80)
        weight = crop.image[..., 0].astype(float)
        centroid = np.array([[(weight * xs).sum(), (weight * ys).sum()]]) / weight.sum()
        np.testing.assert_allclose(crop.points_to_frame(centroid)[0], true_center, atol=0.01)


def square_landmarks(cx: float, cy: float, side: float) -> Landmarks:
    """68 points spread over the square of `side` centred at (cx, cy) (corners included)."""
    unit = np.linspace(-0.5, 0.5, 68)
    points = np.stack([cx + side * unit, cy + side * unit[::-1]], axis=1).astype(np.float32)
    return Landmarks(points, np.ones(68, np.float32), "ibug68")


def test_box_tracker_smooths_snaps_and_resets():
    tracker = FaceBoxTracker(BoxTrackerOptions(smoothing=0.25, snap_distance=0.5))
    box = tracker.update(square_landmarks(100, 100, 40))
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((80, 80, 120, 120))
    box = tracker.update(square_landmarks(108, 100, 60))  # moves 8 px < 0.5 * 40: filtered
    assert box.center == pytest.approx((102, 100)) and box.size == pytest.approx(45)
    box = tracker.update(square_landmarks(300, 200, 50))  # far away: a re-detection, snap
    assert box.center == pytest.approx((300, 200)) and box.size == pytest.approx(50)
    assert tracker.update(None) is None and tracker.box is None


class CountingDetector:
    """A real detector that counts its detect() calls (to tell cache hits from misses)."""

    def __init__(self, detector: LandmarkDetector) -> None:
        self.inner, self.name, self.scheme, self.calls = detector, detector.name, detector.scheme, 0

    def settings(self) -> dict:
        return self.inner.settings()

    def detect(self, rgb, box_hint=None):
        self.calls += 1
        return self.inner.detect(rgb, box_hint)


def write_noise_video(path: Path, n_frames: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for _ in range(n_frames):
            noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(noise, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_detection_cache_roundtrip_and_invalidation(dlib_detector, tmp_path, shared_data):
    video = tmp_path / "clip.mp4"
    video.write_bytes((VIDEOS / "QoT0S2vu9m4_00002.mp4").read_bytes())
    detector = CountingDetector(dlib_detector)
    selection = FrameSelection(max_frames=3)
    first = detect_video(video, detector, selection, cache_dir=tmp_path)
    assert detector.calls >= 3 and first.valid.all()
    assert cache_file(tmp_path, video, "dlib").is_file()

    detector.calls = 0
    again = detect_video(video, detector, selection, cache_dir=tmp_path)
    assert detector.calls == 0
    for name in ("frame_indices", "timestamps", "points", "confidence", "valid"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.scheme == "ibug68"

    detect_video(video, detector, replace(selection, stride=2), cache_dir=tmp_path)  # other settings
    assert detector.calls >= 3
    detector.calls = 0
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file "changed"
    detect_video(video, detector, replace(selection, stride=2), cache_dir=tmp_path)
    assert detector.calls >= 3

    cache_file(tmp_path, video, "dlib").write_bytes(b"not an npz")  # damaged cache: recompute
    detector.calls = 0
    detect_video(video, detector, replace(selection, stride=2), cache_dir=tmp_path)
    assert detector.calls >= 3


def test_frames_without_face_cached_as_invalid(dlib_detector, tmp_path):
    video = tmp_path / "noise.mp4"
    write_noise_video(video, 3)
    track = detect_video(video, dlib_detector, cache_dir=tmp_path)
    cached = detect_video(video, CountingDetector(dlib_detector), cache_dir=tmp_path)
    for result in (track, cached):
        assert not result.valid.any() and np.isnan(result.points).all()
        assert result.landmarks(0) is None and list(result.frame_indices) == [0, 1, 2]


def test_unknown_detector_and_option():
    with pytest.raises(TrackerError, match="unknown landmark detector 'nope'.*mediapipe"):
        make_detector("nope")
    with pytest.raises(TrackerError, match="unknown option.*crop_sise"):
        make_detector("dlib", crop_sise=128)


def test_mediapipe_model_lookup(tmp_path, monkeypatch):
    """--mediapipe-model, then $TRACKER_MEDIAPIPE_MODEL, then the model shipped in flame_assets/ (no download);
    a missing or broken file is a one-line error."""
    monkeypatch.delenv("TRACKER_MEDIAPIPE_MODEL", raising=False)
    with MediaPipeDetector() as detector:
        assert detector.model_path == SHIPPED_MODEL
        assert SHIPPED_MODEL.read_bytes() == MEDIAPIPE_TASK.read_bytes()  # Google's bundle, unchanged
    with pytest.raises(MissingAssetError, match="not found") as error:
        MediaPipeDetector(MediaPipeOptions(model_path=str(tmp_path / "absent.task")))
    assert "\n" not in str(error.value)
    garbage = tmp_path / "garbage.task"
    garbage.write_bytes(b"not a model")
    monkeypatch.setenv("TRACKER_MEDIAPIPE_MODEL", str(garbage))
    with pytest.raises(MissingAssetError, match="cannot load MediaPipe model"):
        MediaPipeDetector()
    with MediaPipeDetector(MediaPipeOptions(model_path=str(MEDIAPIPE_TASK))) as explicit:  # the option wins
        assert explicit.model_path == MEDIAPIPE_TASK


def test_fan_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty checkpoint folder if installed
    with pytest.raises(MissingAssetError, match="face-alignment|FAN weights not found") as error:
        make_detector("fan")
    assert "\n" not in str(error.value)
    assert not any(tmp_path.rglob("*.pth*"))


def test_native_stderr_goes_to_the_debug_log_and_comes_back(capfd, caplog):
    """Lines written to file descriptor 2 inside the block (as native code writes them, past Python's sys.stderr)
    reach the DEBUG log, not the terminal; afterwards the descriptor writes to the terminal again."""
    with caplog.at_level(logging.DEBUG, logger="tracker.detect.mediapipe"):
        with native_stderr_to_log():
            os.write(2, b"W0000 native start-up line\n")
        os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert "native start-up line" not in err and "after the block" in err
    assert [r.getMessage() for r in caplog.records] == ["mediapipe: W0000 native start-up line"]


def test_mediapipe_starts_without_native_lines_on_the_terminal(capfd):
    with make_detector("mediapipe", model_path=str(MEDIAPIPE_TASK)) as detector:
        detector.detect(np.zeros((200, 200, 3), np.uint8))
    err = capfd.readouterr().err
    assert "W0000" not in err and "INFO: Created" not in err and "InitGoogle" not in err, err
