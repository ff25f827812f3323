"""Streamed detection (background producer) and the landmark stage fed by it: same results as sequential, cached,
errors and early stops handled."""

import threading
import time

import numpy as np
import pytest

from tests.conftest import VIDEOS
from tests.test_detect import CountingDetector
from tracker.config import load_config
from tracker.detect.base import make_detector
from tracker.detect.cache import cache_file
from tracker.detect.sequence import detect_video
from tracker.detect.stream import LandmarkStream
from tracker.errors import TrackerError
from tracker.io.export import read_params
from tracker.io.video import FrameSelection, read_frames

CLIP = VIDEOS / "QoT0S2vu9m4_00002.mp4"  # 224x224, a face in every frame
TRACK_ARRAYS = ("frame_indices", "timestamps", "points", "confidence", "valid")


@pytest.fixture(scope="module")
def detector():
    return make_detector("dlib")


@pytest.fixture(scope="module")
def second_detector():
    """Another instance, for a keyframe pass that runs beside the per-frame pass (one instance per thread)."""
    return make_detector("dlib")


def consume(stream: LandmarkStream) -> tuple:
    keys = stream.keyframes()
    frames = list(stream)
    return keys, frames, stream.track()


def assert_same_track(a, b) -> None:
    for name in TRACK_ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_read_frames_positions_decodes_only_what_is_asked():
    selection = FrameSelection(start=1, max_frames=10, stride=2)
    every = list(read_frames(CLIP, selection))
    some = list(read_frames(CLIP, selection, positions=[0, 3, 9]))
    assert [f.index for f in some] == [1, 7, 19] == [every[p].index for p in (0, 3, 9)]
    for frame, position in zip(some, (0, 3, 9)):
        np.testing.assert_array_equal(frame.rgb, every[position].rgb)
        assert frame.timestamp == every[position].timestamp
    assert list(read_frames(CLIP, selection, positions=[])) == []


def test_background_equals_sequential_and_detect_video(detector, tmp_path):
    selection = FrameSelection(max_frames=12)
    runs = []
    for background in (True, False):
        with LandmarkStream(CLIP, detector, selection, [0, 5, 11, 40], use_cache=False,
                            background=background) as stream:
            runs.append(consume(stream))
    (keys, frames, track), (keys2, frames2, track2) = runs
    assert [(f.position, f.index, f.timestamp) for f in frames] == [(f.position, f.index, f.timestamp) for f in frames2]
    assert [f.position for f in frames] == list(range(12))
    assert_same_track(keys, keys2)
    assert_same_track(track, track2)
    assert keys.frame_indices.tolist() == [0, 5, 11] and keys.valid.all()  # position 40 lies past the end
    assert_same_track(track, detect_video(CLIP, detector, selection, use_cache=False))
    assert stream.detect_seconds > 0


def test_stream_and_detect_video_share_the_cache(detector, tmp_path):
    selection = FrameSelection(max_frames=6)
    counting = CountingDetector(detector)
    with LandmarkStream(CLIP, counting, selection, [0, 5], cache_dir=tmp_path) as stream:
        _, _, track = consume(stream)
    assert counting.calls >= 6 + 2
    assert cache_file(tmp_path, CLIP, "dlib").is_file() and cache_file(tmp_path, CLIP, "dlib-keyframes").is_file()
    counting.calls = 0
    assert_same_track(detect_video(CLIP, counting, selection, cache_dir=tmp_path), track)
    with LandmarkStream(CLIP, counting, selection, [0, 5], cache_dir=tmp_path) as stream:
        keys, frames, again = consume(stream)
    assert counting.calls == 0 and stream.detect_seconds == 0
    assert_same_track(again, track)
    with LandmarkStream(CLIP, counting, selection, [1, 4], cache_dir=tmp_path) as stream:  # other keyframes
        assert stream.keyframes().frame_indices.tolist() == [1, 4]
    assert counting.calls == 2


class FailingDetector(CountingDetector):
    def detect(self, rgb, box_hint=None):
        if self.calls == 4:
            raise TrackerError("detector exploded")
        return super().detect(rgb, box_hint)


def test_producer_error_reaches_the_consumer(detector):
    with LandmarkStream(CLIP, FailingDetector(detector), FrameSelection(max_frames=10), [0], use_cache=False) as stream:
        with pytest.raises(TrackerError, match="exploded"):
            consume(stream)
    assert not stream._thread.is_alive()


def test_early_stop_joins_the_producer(detector):
    stream = LandmarkStream(CLIP, detector, FrameSelection(max_frames=30), [0], use_cache=False)
    stream._queue.maxsize = 1  # the producer blocks on a full queue
    with stream:
        next(iter(stream))
    assert not stream._thread.is_alive()
    assert not any(t.name == "landmark-stream" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="not been consumed"):
        stream.track()


@pytest.mark.parametrize("frames, keyframes", [(8, 3), (20, 1)])
def test_landmark_stage_threaded_equals_sequential(tmp_path, monkeypatch, frames, keyframes):
    """The whole landmark stage gives bit-identical parameters with and without the producer threads: keyframe
    candidates that are the first frames (8 frames, 45 candidates) and a keyframe pass of its own, run beside the
    per-frame pass when threaded (20 frames, 15 candidates)."""
    from tracker import pipeline

    results = []
    for background in (True, False):
        streams = []

        def stream(*args, background=background, streams=streams, **kw):
            streams.append(LandmarkStream(*args, **kw, background=background))
            return streams[-1]

        monkeypatch.setattr(pipeline, "LandmarkStream", stream)
        cfg = load_config(overrides={"video": {"max_frames": frames},
                                     "detect": {"landmarks": "dlib", "cache": False},
                                     "fit": {"keyframes": keyframes, "shape_iters": 6}, "densemarks": {"mode": "off"},
                                     "output": {"dir": str(tmp_path / str(background)), "video": False}})
        summary = pipeline.track_video(CLIP, cfg, show_progress=False)
        results.append(read_params(tmp_path / str(background) / CLIP.stem / "flame_params.npz")[0])
        assert summary.valid_frames == frames and summary.seconds["detection"] > 0
        assert (streams[0]._keyframe_pass is not None) == (background and frames == 20)
    for name, value in results[0].items():
        if name != "metadata":
            np.testing.assert_array_equal(value, results[1][name], err_msg=name)


def test_short_video_keyframes_are_the_tracks_own_first_frames(detector, tmp_path):
    """Keyframe candidates that are the whole selection (a short video) are not searched separately: the
    keyframes are the per-frame pass's first detections, so every frame is detected once, exactly as
    `detect_video` detects it, threaded or not, and again from the cache."""
    selection = FrameSelection(max_frames=12)
    counting = CountingDetector(detector)
    alone = detect_video(CLIP, counting, selection, use_cache=False)
    calls_alone, counting.calls = counting.calls, 0
    for background in (True, False):
        with LandmarkStream(CLIP, counting, selection, range(12), use_cache=False, background=background) as stream:
            keys, frames, track = consume(stream)
        assert counting.calls == calls_alone  # nothing detected twice
        counting.calls = 0
        assert_same_track(track, alone)
        assert_same_track(keys, track)
        assert [f.position for f in frames] == list(range(12))
    with LandmarkStream(CLIP, counting, selection, range(20), cache_dir=tmp_path) as stream:  # past the end
        keys, _, track = consume(stream)
    assert_same_track(keys, alone)
    assert_same_track(track, alone)
    counting.calls = 0
    with LandmarkStream(CLIP, counting, selection, range(5), cache_dir=tmp_path) as stream:  # from the cache
        keys, _, track = consume(stream)
    assert counting.calls == 0 and keys.frame_indices.tolist() == alone.frame_indices[:5].tolist()
    assert_same_track(track, alone)


class ThreadRecordingDetector(CountingDetector):
    """Counts its calls, records the threads they came from, and whether it was closed."""

    def __init__(self, detector):
        super().__init__(detector)
        self.threads, self.closed = set(), False

    def detect(self, rgb, box_hint=None):
        self.threads.add(threading.current_thread().name)
        return super().detect(rgb, box_hint)

    def close(self):
        self.closed = True


def test_keyframe_pass_beside_the_frame_pass(detector, second_detector, tmp_path):
    """With a keyframe detector, the keyframe pass runs in a thread of its own beside the per-frame pass: the same
    keyframes and track as the sequential stream, its detector built once (only when the keyframe cache misses,
    never for keyframes that are the first frames) and closed."""
    selection, positions = FrameSelection(max_frames=12), [0, 5, 11, 40]
    with LandmarkStream(CLIP, detector, selection, positions, use_cache=False, background=False) as stream:
        keys_alone, _, track_alone = consume(stream)
    built = []

    def make():
        built.append(ThreadRecordingDetector(second_detector))
        return built[-1]

    for _ in range(2):  # detected, then from the caches
        with LandmarkStream(CLIP, detector, selection, positions, cache_dir=tmp_path, keyframe_detector=make) as stream:
            keys, frames, track = consume(stream)
        assert_same_track(keys, keys_alone)
        assert_same_track(track, track_alone)
        assert [f.position for f in frames] == list(range(12))
    assert len(built) == 1 and built[0].closed
    assert built[0].calls == 3 and built[0].threads == {"landmark-keyframes"}  # position 40 lies past the end
    with LandmarkStream(CLIP, detector, selection, range(12), use_cache=False, keyframe_detector=make) as stream:
        consume(stream)  # the keyframes are the first frames: no pass of their own
    assert len(built) == 1 and stream._keyframe_pass is None


def test_keyframe_pass_error_reaches_the_consumer(detector, second_detector):
    with (LandmarkStream(CLIP, detector, FrameSelection(max_frames=30), range(0, 30, 3), use_cache=False,
                         keyframe_detector=lambda: FailingDetector(second_detector)) as stream,
          pytest.raises(TrackerError, match="exploded")):
        stream.keyframes()
    assert not stream._keyframe_pass.is_alive() and not stream._thread.is_alive()


class SlowDetector(CountingDetector):
    def detect(self, rgb, box_hint=None):
        time.sleep(0.05)
        return super().detect(rgb, box_hint)


def test_closing_stops_the_keyframe_pass_without_caching_it(detector, second_detector, tmp_path):
    stream = LandmarkStream(CLIP, detector, FrameSelection(max_frames=30), range(0, 30, 2), cache_dir=tmp_path,
                            keyframe_detector=lambda: SlowDetector(second_detector))
    with stream:
        time.sleep(0.2)  # a few of the 15 keyframes (0.05 s each) are detected
    assert not stream._keyframe_pass.is_alive()
    assert not cache_file(tmp_path, CLIP, "dlib-keyframes").exists()
    with pytest.raises(RuntimeError, match="closed before its keyframes"):
        stream.keyframes()
