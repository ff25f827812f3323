"""python -m tracker.batch: input discovery, local process pool, Ray, failures, resume (tiny clips, few frames)."""

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import VIDEOS
from tracker.batch import RayRunner, check_unique_names, main, run_batch
from tracker.config import load_config
from tracker.errors import TrackerError
from tracker.io.export import read_params
from tracker.io.inputs import find_videos

SOURCE = VIDEOS / "QoT0S2vu9m4_00002.mp4"  # 224x224, a face in every frame
FRAMES = 3
QUICK = {"video": {"max_frames": FRAMES}, "detect": {"landmarks": "dlib"}, "densemarks": {"mode": "off"},
         "fit": {"keyframes": 2, "shape_iters": 4, "first_frame_iters": 5}, "output": {"video": False}}


def write_clip(path: Path, start: int, count: int = 5) -> Path:
    """`count` frames of the shared clip from `start` on, re-encoded (a clip of its own)."""
    with av.open(str(SOURCE)) as source, av.open(str(path), "w") as target:
        stream = target.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        for index, frame in enumerate(source.decode(video=0)):
            if start <= index < start + count:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"))):
                    target.mux(packet)
        for packet in stream.encode():
            target.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two good clips and one that is not a video, in one folder."""
    folder = tmp_path_factory.mktemp("clips")
    write_clip(folder / "first.mp4", 0)
    write_clip(folder / "second.mp4", 10)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / "cache"))


def read_csv(out: Path) -> dict[str, dict]:
    with open(out / "batch_summary.csv") as file:
        return {Path(row["video"]).stem: row for row in csv.DictReader(file)}


def quick_config(tmp_path: Path) -> Path:
    path = tmp_path / "quick.yaml"
    path.write_text(json.dumps(QUICK))  # JSON is YAML
    return path


def test_find_videos_folders_globs_lists(clips, tmp_path):
    (clips / "notes.md").write_text("not a video")
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# the good ones\n{clips / 'first.mp4'}\n\n{clips}/sec*.mp4\n")
    assert [p.name for p in find_videos([clips])] == ["broken.mp4", "first.mp4", "second.mp4"]
    assert [p.name for p in find_videos([listing, clips / "first.mp4"])] == ["first.mp4", "second.mp4"]
    assert [p.name for p in find_videos([str(clips / "*st.mp4")])] == ["first.mp4"]
    (tmp_path / "relative").mkdir()
    (tmp_path / "relative" / "list.txt").write_text("../clip.mov\n")
    (tmp_path / "clip.mov").write_bytes(b"")
    assert find_videos([tmp_path / "relative" / "list.txt"]) == [tmp_path / "relative" / ".." / "clip.mov"]
    with pytest.raises(TrackerError, match="input not found: nowhere.mp4"):
        find_videos(["nowhere.mp4"])
    with pytest.raises(TrackerError, match="no videos match"):
        find_videos([str(clips / "*.mkv")])
    with pytest.raises(TrackerError, match="share the name 'first'"):
        check_unique_names([clips / "first.mp4", tmp_path / "first.mov"])


def test_local_batch_records_failures_and_resumes(clips, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(clips), "--out", str(out), "--config", str(quick_config(tmp_path)), "--workers", "2"]
    assert main(args) == 1  # one video failed
    rows = read_csv(out)
    assert set(rows) == {"first", "second", "broken"}
    for name in ("first", "second"):
        row = rows[name]
        assert row["status"] == "done" and int(row["frames"]) == FRAMES and int(row["failures"]) == 0
        assert int(row["lost_frames"]) == 0 and 0 < float(row["lmk_error_px"]) < 5 and float(row["s_per_frame"]) > 0
        arrays, meta = read_params(out / name / "flame_params.npz")
        assert meta["complete"] and arrays["valid"].all() and len(arrays["frame_index"]) == FRAMES
    broken = rows["broken"]
    assert broken["status"] == "failed" and int(broken["failures"]) == 2  # tried, then retried once
    assert "cannot read" in broken["error"] and "cannot read" in (out / "broken" / "batch.log").read_text()
    assert "failed: " in capsys.readouterr().err

    # An interrupted run leaves no summary.json: only that video runs again, the complete one is skipped.
    params = out / "first" / "flame_params.npz"
    first_mtime = params.stat().st_mtime_ns
    (out / "second" / "summary.json").unlink()
    assert main(args + ["--retries", "0"]) == 1
    rows = read_csv(out)
    assert rows["first"]["status"] == "skipped" and int(rows["first"]["frames"]) == FRAMES
    assert params.stat().st_mtime_ns == first_mtime
    assert rows["second"]["status"] == "done" and rows["broken"]["failures"] == "1"

    # Another configuration is not "complete": the video is tracked again.
    assert main([str(clips / "first.mp4"), *args[1:], "--max-frames", "2"]) == 0
    assert read_csv(out)["first"]["status"] == "done" and read_csv(out)["first"]["frames"] == "2"


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "absent"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: input not found") and err.count("\n") == 1


def test_ray_batch_on_a_local_instance(clips, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="ERROR")
    try:
        cfg = load_config(quick_config(tmp_path), {"output": {"dir": str(tmp_path / "out")}})
        videos = find_videos([clips])
        records = {Path(r.video).stem: r for r in run_batch(videos, cfg, RayRunner(None, cpus=1, gpus=0))}
    finally:
        ray.shutdown()
    assert records["first"].status == records["second"].status == "done"
    assert records["first"].frames == FRAMES and records["first"].lmk_error_px < 5
    assert records["broken"].status == "failed" and records["broken"].failures == 2
    assert "cannot read" in records["broken"].error
    arrays, meta = read_params(tmp_path / "out" / "second" / "flame_params.npz")  # written by a Ray worker
    assert meta["complete"] and np.isfinite(arrays["rotation"]).all()
    assert set(read_csv(tmp_path / "out")) == {"first", "second", "broken"}


def test_a_batch_killed_mid_video_resumes(clips, tmp_path):
    """A real interruption: `python -m tracker.batch` gets SIGTERM while a long video is being tracked. It stops
    its worker, exits with the signal's code, and leaves batch_summary.csv with the finished video done and the
    other interrupted; the same command again skips the finished one and tracks the other."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tracker.errors import Interrupted

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "a_short.mp4").symlink_to(clips / "first.mp4")
    with av.open(str(SOURCE)) as source, av.open(str(folder / "b_long.mp4"), "w") as target:
        stream = target.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        frames = [frame.to_ndarray(format="rgb24") for frame in source.decode(video=0)]
        for _ in range(6):  # 330 frames: far longer than the test waits before the signal
            for rgb in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb)):
                    target.mux(packet)
        for packet in stream.encode():
            target.mux(packet)
    config = tmp_path / "batch.yaml"
    config.write_text(json.dumps({**QUICK, "video": {"max_frames": None}}))
    out = tmp_path / "out"
    args = [str(folder), "--out", str(out), "--config", str(config), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "tracker.batch", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        # The short video is done and the long one has started writing frames: then the signal.
        while not (out / "b_long" / "batch.log").exists() or "done" not in str(read_csv(out).get("a_short")):
            assert process.poll() is None and time.monotonic() < deadline, "the batch ended or stalled"
            time.sleep(0.2)
        time.sleep(2.0)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == Interrupted(signal.SIGTERM).exit_code, err
    assert "run the same command again to resume" in err
    rows = read_csv(out)
    assert rows["a_short"]["status"] == "done" and rows["b_long"]["status"] == "interrupted"
    assert not (out / "b_long" / "summary.json").exists()

    assert main(args) == 0
    rows = read_csv(out)
    assert rows["a_short"]["status"] == "skipped" and rows["b_long"]["status"] == "done"
    arrays, meta = read_params(out / "b_long" / "flame_params.npz")
    assert meta["complete"] and len(arrays["frame_index"]) == 6 * len(frames)
