"""Video decoding: metadata, frame selection, timestamps (incl. variable frame rate), error messages."""

import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import VIDEOS
from tracker.errors import TrackerError
from tracker.io.video import DecodeReport, FrameSelection, prefetched, probe_video, read_frames


def write_video(path: Path, codec: str, pts: list[int], time_base: Fraction = Fraction(1, 1000),
                size: tuple[int, int] = (64, 48), pix_fmt: str = "yuv420p") -> list[int]:
    """Encode flat grey frames (level 40 * i) at presentation times pts * time_base; returns the levels."""
    width, height = size
    levels = [40 * i for i in range(len(pts))]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        for level, frame_pts in zip(levels, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return levels


def assert_one_line_error(call, *fragments: str) -> None:
    with pytest.raises(TrackerError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("name, width, height, n_frames", [
    ("wojtek.mp4", 512, 512, 400), ("duda.mp4", 1920, 1080, 252), ("0Fi83BHQsMA_00002.mp4", 224, 224, 41)])
def test_probe_dev_videos(shared_data, name, width, height, n_frames):
    info = probe_video(VIDEOS / name)
    assert (info.width, info.height, info.n_frames) == (width, height, n_frames)
    assert info.fps == pytest.approx(25.0)


def test_frame_selection_indices_and_timestamps(shared_data):
    frames = list(read_frames(VIDEOS / "wojtek.mp4", FrameSelection(start=10, max_frames=5, stride=7)))
    assert [f.index for f in frames] == [10, 17, 24, 31, 38]
    assert [f.timestamp for f in frames] == pytest.approx([i / 25 for i in (10, 17, 24, 31, 38)])
    assert all(f.rgb.shape == (512, 512, 3) and f.rgb.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0].rgb, frames[1].rgb)


def test_all_frames_decoded_in_order(shared_data):
    frames = list(read_frames(VIDEOS / "0Fi83BHQsMA_00002.mp4"))
    assert [f.index for f in frames] == list(range(41))
    assert np.all(np.diff([f.timestamp for f in frames]) > 0)


def test_tail_of_video_and_budget(shared_data):
    frames = list(read_frames(VIDEOS / "wojtek.mp4", FrameSelection(start=395, max_frames=10)))
    assert [f.index for f in frames] == [395, 396, 397, 398, 399]


def test_variable_frame_rate_timestamps(tmp_path):
    pts_ms = [0, 40, 100, 180, 200, 330]
    levels = write_video(tmp_path / "vfr.mkv", "mpeg4", pts_ms)
    frames = list(read_frames(tmp_path / "vfr.mkv"))
    assert [f.timestamp for f in frames] == pytest.approx([p / 1000 for p in pts_ms])
    # Lossy codec: flat grey levels come back within a few units.
    assert [float(f.rgb.mean()) for f in frames] == pytest.approx(levels, abs=4)


def test_avi_mjpeg_roundtrip(tmp_path):
    # AVI is constant frame rate: its time base is the frame period.
    write_video(tmp_path / "clip.avi", "mjpeg", [0, 1, 2, 3], Fraction(1, 25), (32, 32), "yuvj420p")
    info = probe_video(tmp_path / "clip.avi")
    assert (info.width, info.height, info.fps) == (32, 32, pytest.approx(25.0))
    frames = list(read_frames(tmp_path / "clip.avi", FrameSelection(start=1, stride=2)))
    assert [f.index for f in frames] == [1, 3]
    assert [f.timestamp for f in frames] == pytest.approx([0.04, 0.12])


def test_missing_directory_empty_and_garbage_files(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.touch()
    cases = [(tmp_path / "missing.mp4", ("not found", "missing.mp4")), (tmp_path, ("not a file",)),
             (garbage, ("cannot read", "garbage.mp4")), (empty, ("cannot read", "empty.mp4"))]
    for path, fragments in cases:
        assert_one_line_error(lambda: probe_video(path), *fragments)  # noqa: B023 (called at once)
        assert_one_line_error(lambda: list(read_frames(path)), *fragments)  # noqa: B023


def mux_raw_packets(path: Path, codec: str, payload: bytes, count: int = 5) -> None:
    """A container whose video packets hold `payload` instead of coded pictures."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(count):
            packet = av.Packet(payload)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 25)
            container.mux(packet)


def test_stream_without_decodable_frames(tmp_path):
    # h264 finds no NAL units in zero bytes: no frame, no error from the decoder.
    mux_raw_packets(tmp_path / "silent.mkv", "h264", b"\x00" * 300)
    # The probe decodes the first frame (for its display rotation), so the file is refused before any work.
    assert_one_line_error(lambda: probe_video(tmp_path / "silent.mkv"), "no decodable video frames")
    assert_one_line_error(lambda: list(read_frames(tmp_path / "silent.mkv")), "no decodable video frames")
    # mpeg4 rejects random bytes with an error.
    mux_raw_packets(tmp_path / "noise.mkv", "mpeg4", np.random.default_rng(0).bytes(500))
    assert_one_line_error(lambda: list(read_frames(tmp_path / "noise.mkv")), "cannot decode any frame")


def test_bad_selection(shared_data):
    assert_one_line_error(lambda: list(read_frames(VIDEOS / "wojtek.mp4", FrameSelection(start=400))),
                          "beyond the end", "400 frames")
    assert_one_line_error(lambda: FrameSelection(stride=0), "stride")
    assert_one_line_error(lambda: FrameSelection(start=-1), "start")
    assert_one_line_error(lambda: FrameSelection(max_frames=0), "max_frames")


def test_prefetched_frames_are_read_frames_own():
    """Decoding ahead in a thread changes nothing: the same frames (pixels, indices, times) and decode report."""
    clip, selection = VIDEOS / "QoT0S2vu9m4_00002.mp4", FrameSelection(start=2, max_frames=20, stride=2)
    report, ahead_report = DecodeReport(), DecodeReport()
    plain = list(read_frames(clip, selection, report))
    ahead = list(prefetched(read_frames(clip, selection, ahead_report), depth=2))
    assert [(f.index, f.timestamp) for f in ahead] == [(f.index, f.timestamp) for f in plain] and len(plain) == 20
    for a, b in zip(ahead, plain):
        np.testing.assert_array_equal(a.rgb, b.rgb)
    assert ahead_report == report


def counted_source(n: int, fail_at: int | None = None, state: dict | None = None):
    """A frame source that can fail at one item and records that it was closed."""
    try:
        for i in range(n):
            if i == fail_at:
                raise TrackerError(f"broken frame {i}")
            yield i
    finally:
        state["closed"] = threading.current_thread().name


def test_prefetched_raises_in_order_and_stops_when_left_early():
    state: dict = {}
    frames = prefetched(counted_source(10, fail_at=4, state=state), depth=2)
    assert [next(frames) for _ in range(4)] == [0, 1, 2, 3]  # the items before the error come first
    with pytest.raises(TrackerError, match="broken frame 4"):
        next(frames)
    assert state["closed"] == "decode-ahead"
    state.clear()
    frames = prefetched(counted_source(1000, state=state), depth=2)
    assert next(frames) == 0
    frames.close()  # left early: the thread stops, the source is closed from it
    assert state["closed"] == "decode-ahead"
    assert not any(t.name == "decode-ahead" and t.is_alive() for t in threading.enumerate())
