"""Bad, hostile and unusual inputs (issues 13 and 17): no data file runs code, numbers are range-checked, videos
are read as they are meant to be seen, outputs never lie, signals stop a run like Ctrl-C, errors are one line.

The readers and writers are tested directly (fast); a few command-line runs on a 224x224 clip check the
whole path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import FLAME_STANDIN, REPO
from tests.hostile import (

    assets_with,
    encode,
    f2py_pickle_bytes,
    face_frames,
    flat_frames,
    hostile_payloads,
    hostile_pickle_bytes,
    pickled_npy_bytes,
    truncated_copy,
)
from tracker.config import load_config, parse_yaml
from tracker.errors import Interrupted, TrackerError, interrupt_on_signals, stop_if_signalled
from tracker.io.export import read_params
from tracker.io.files import RunFolder, atomic_write, safe_name, strict_json
from tracker.io.safe_load import read_npy, read_pickle
from tracker.io.video import DecodeReport, FrameSelection, probe_video, read_frames
from tracker.run import main

FLAME_NPZ = FLAME_STANDIN.with_suffix(".npz")


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity (what any strict JSON reader does)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"summary holds bare {name}"))


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One detection cache for this module's runs (they share clips and selections)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def shared_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """8 frames of the 224x224 face clip."""
    return encode(tmp_path_factory.mktemp("clip") / "clip.mp4", face_frames(8))


# --- No data file runs code ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file_write", "os_system", "numpy_callable"])
def test_hostile_dynamic_embedding_runs_nothing(tmp_path, capsys, clip, kind):
    """flame_dynamic_embedding.npy is a pickled .npy: a crafted one is refused by the restricted unpickler
    (it was np.load(allow_pickle=True)), nothing runs, the exit code is non-zero, nothing is created."""
    sentinel = tmp_path / "pwned"
    payload = hostile_payloads(sentinel)[kind]
    assets = assets_with(tmp_path, {"flame_dynamic_embedding.npy": pickled_npy_bytes(payload, tmp_path)})
    code, _, err = run_cli([clip, "--landmarks", "dlib", "--flame-assets", assets, "--out", tmp_path / "out",
                            "--quiet"], capsys)
    assert code == 1 and "flame_dynamic_embedding.npy" in one_line(err) and "forbidden" in err
    assert not sentinel.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["file_write", "os_system", "numpy_callable"])
def test_hostile_pickles_run_nothing(tmp_path, kind):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "flame_static_embedding_68.pkl"
    path.write_bytes(hostile_pickle_bytes(hostile_payloads(sentinel)[kind]))
    with pytest.raises(TrackerError, match="forbidden"):
        read_pickle(path)
    assert not sentinel.exists()


def test_numpy_submodule_is_never_imported(tmp_path, capsys, clip):
    """A FLAME pickle naming `ndarray` in numpy.f2py.__main__ used to import it (running f2py's command line,
    exit 0); the allow-list is exact (module, name) pairs, so nothing is imported."""
    flame = tmp_path / "generic_model.pkl"
    flame.write_bytes(f2py_pickle_bytes())
    sys.modules.pop("numpy.f2py.__main__", None)
    code, out, err = run_cli([clip, "--flame", flame, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 1 and "forbidden class numpy.f2py.__main__.ndarray" in one_line(err)
    assert "numpy.f2py.__main__" not in sys.modules and "Unknown option" not in out + err


def test_exact_allow_list_still_reads_every_shipped_format(shared_data):
    """The allow-list is exact, yet every asset the tracker reads loads (FLAME 2023-style pickle, npz, the
    Python 2 embedding pickles, the pickled .npy contour embedding, the plain .npy eyelids)."""
    from tests.conftest import FLAME_ASSETS

    assert read_pickle(FLAME_STANDIN)["v_template"].shape == (5023, 3)
    assert set(read_pickle(FLAME_ASSETS / "flame_static_embedding_68.pkl")) == {"lmk_face_idx", "lmk_b_coords"}
    dynamic = read_npy(FLAME_ASSETS / "flame_dynamic_embedding.npy")
    assert np.asarray(dynamic["lmk_face_idx"]).shape == (79, 17)
    assert read_npy(FLAME_ASSETS / "l_eyelid.npy").shape == (5023, 3)


def test_array_header_larger_than_the_file_is_refused_before_allocating(tmp_path):
    """An .npy whose header declares 800 GB of data in a 200-byte file: refused from the header alone."""
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (100000000000,), }"
    header = header.ljust(128 - 10 - 1) + b"\n"
    huge = tmp_path / "huge.npy"
    huge.write_bytes(np.lib.format.magic(1, 0) + len(header).to_bytes(2, "little") + header + b"\x00" * 64)
    with pytest.raises(TrackerError, match="huge.npy.*limit"):
        read_npy(huge)
    small = tmp_path / "small.npy"
    np.save(small, np.zeros(1000))
    truncated_copy(small, tmp_path / "cut.npy", 0.5)
    with pytest.raises(TrackerError, match="cut.npy.*truncated"):
        read_npy(tmp_path / "cut.npy")


# --- Model files are validated when loaded -----------------------------------------------------------------

def flame_variant(tmp_path: Path, **changes) -> Path:
    with np.load(FLAME_NPZ) as stored:
        arrays = {k: stored[k] for k in stored.files}
    for key, change in changes.items():
        arrays[key] = change(arrays[key].copy())
    path = tmp_path / "flame.npz"
    np.savez(path, **arrays)
    return path


def nan_at_first(a):
    a.reshape(-1)[0] = np.nan
    return a


@pytest.mark.parametrize("changes, array, words", [
    ({"v_template": nan_at_first}, "v_template", "non-finite"),
    ({"shapedirs": nan_at_first}, "shapedirs", "non-finite"),
    ({"v_template": lambda a: a[:10]}, "shapedirs", "expected 10x3"),
    ({"f": lambda a: a + 6000}, "f", "outside 0..5022"),
    ({"kintree_table": lambda a: np.array([[-1, 2, 1, 1, 1], [0, 1, 2, 3, 4]])}, "kintree_table", "not a tree"),
    ({"shapedirs": lambda a: a[:, 0]}, "shapedirs", "2 dimensions"),
    ({"weights": lambda a: a[:, :4]}, "weights", "expected 5023x5"),
    ({"J_regressor": lambda a: np.full_like(a, np.inf)}, "J_regressor", "non-finite"),
    ({"posedirs": lambda a: a[:, :, :10]}, "posedirs", "expected 5023x3x36"),
    ({"n_shape": lambda a: np.array(1e9)}, "n_shape", "whole number"),
])
def test_broken_model_arrays_are_one_line_naming_file_and_array(tmp_path, changes, array, words):
    from tracker.flame.loading import load_flame_file

    path = flame_variant(tmp_path, **changes)
    with pytest.raises(TrackerError) as error:
        load_flame_file(path)
    message = str(error.value)
    assert str(path) in message and f"array {array}" in message and words in message and "\n" not in message


def test_broken_model_through_the_cli_is_not_unexpected(tmp_path, capsys, clip):
    path = flame_variant(tmp_path, v_template=lambda a: a[:10])
    code, _, err = run_cli([clip, "--flame", path, "--out", tmp_path / "out", "--quiet"], capsys)
    line = one_line(err)
    assert code == 1 and "unexpected" not in line and "array" in line and not (tmp_path / "out").exists()


def test_asset_index_ranges_are_checked(tmp_path):
    from tests.conftest import FLAME_ASSETS
    from tracker.flame.assets import load_region_masks
    from tracker.flame.landmarks import load_mediapipe

    faces = np.load(FLAME_NPZ)["f"]
    with np.load(FLAME_ASSETS / "mediapipe_landmark_embedding.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["lmk_face_idx"] = arrays["lmk_face_idx"] + 20000
    assets = assets_with(tmp_path, {})
    (assets / "mediapipe_landmark_embedding.npz").unlink()
    np.savez(assets / "mediapipe_landmark_embedding.npz", **arrays)
    with pytest.raises(TrackerError, match="lmk_face_idx holds triangle indices outside"):
        load_mediapipe(assets, faces)
    with pytest.raises(TrackerError, match="outside 0..99"):
        load_region_masks(FLAME_ASSETS, 100)


# --- Numbers from the command line and the config are range-checked ----------------------------------------

@pytest.mark.parametrize("focal, words", [("inf", "finite"), ("nan", "finite"), ("-5", "> 0"),
                                          ("1e30", "is not a focal length"), ("1e-30", "is not a focal length")])
def test_bad_focal_is_refused_before_any_work(tmp_path, capsys, clip, focal, words):
    code, _, err = run_cli([clip, "--focal", focal, "--out", tmp_path / "out", "--quiet"], capsys)
    line = one_line(err)
    assert code == 1 and "focal" in line and words in line and not (tmp_path / "out").exists()


def test_missing_albedo_model_is_refused_before_any_work(tmp_path, capsys, clip):
    config = tmp_path / "albedo.yaml"
    config.write_text(f"photometric:\n  albedo_model: {tmp_path / 'FLAME_texture.npz'}\n")
    code, _, err = run_cli([clip, "--config", config, "--photometric", "on", "--out", tmp_path / "out", "--quiet"],
                           capsys)
    line = one_line(err)
    assert code == 1 and "photometric.albedo_model" in line and "not found" in line
    assert not (tmp_path / "out").exists()


def test_input_refused_during_the_run_leaves_nothing(tmp_path, capsys, clip):
    """A start frame past the end is only found while decoding, after the run folder was made: the folder (and
    the --out it created) is removed again."""
    code, _, err = run_cli([clip, "--start", "500", "--out", tmp_path / "out" / "deeper", "--quiet"], capsys)
    assert code == 1 and "beyond the end" in one_line(err) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, key", [
    ({"fit": {"shape_iters": 0}}, "fit.shape_iters"), ({"fit": {"smooth_rotation": -1}}, "fit.smooth_rotation"),
    ({"energy": {"landmarks": {"scale": 0.0}}}, "energy.landmarks.scale"),
    ({"energy": {"dense_corr": {"scale": -1.0}}}, "energy.dense_corr.scale"),
    ({"energy": {"landmarks": {"weight": float("nan")}}}, "energy.landmarks.weight"),
    ({"energy": {"priors": {"jaw": float("inf")}}}, "energy.priors.jaw"),
    ({"fit": {"lr": float("nan")}}, "fit.lr"), ({"seed": -1}, "seed"), ({"video": {"stream": -1}}, "video.stream"),
    ({"photometric": {"iters": 0}}, "photometric.iters"), ({"densemarks": {"min_inliers": 2.0}},
                                                              "densemarks.min_inliers"),
])
def test_every_config_number_is_range_checked(overrides, key):
    with pytest.raises(TrackerError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_nan_from_yaml_is_refused(tmp_path, capsys, clip):
    cfg = tmp_path / "nan.yaml"
    cfg.write_text("energy:\n  landmarks:\n    weight: .nan\n")
    code, _, err = run_cli([clip, "--config", cfg, "--out", tmp_path / "out", "--quiet"], capsys)
    assert code == 1 and "energy.landmarks.weight must be a finite number" in one_line(err)


def test_alias_bomb_is_refused_cheaply(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, prev in zip("bcdefgh", "abcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nfit: {lr: *h}\n")
    assert bomb.stat().st_size < 400
    started = time.perf_counter()
    with pytest.raises(TrackerError, match="expands to more than") as error:
        load_config(bomb)
    assert time.perf_counter() - started < 1.0 and len(str(error.value)) < 300


def test_wrong_type_message_quotes_a_bounded_value():
    """A shared (alias) structure as a wrong-type value: the message quotes at most ~200 characters of it."""
    value = parse_yaml('a: &a [1, 2, 3, 4, 5, 6, 7, 8]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]',
                       "test")["c"]
    with pytest.raises(TrackerError) as error:
        load_config(overrides={"fit": {"lr": value}})
    assert "fit.lr must be float" in str(error.value) and len(str(error.value)) < 300


def test_oversized_config_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(TrackerError, match="larger than"):
        load_config(big)


# --- Videos: display rotation, main stream, timing, size changes, truncation -------------------------------

def test_display_rotation_is_honoured(tmp_path):
    upright = flat_frames(3, 48, 32)
    for frame in upright:
        frame[:4, :8] = 255  # a marker in the top-left corner
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in upright]  # as a phone stores a portrait clip
    path = encode(tmp_path / "phone.mp4", stored, rotation=90)
    info = probe_video(path)
    assert (info.width, info.height, info.rotation) == (48, 32, 90)
    frames = list(read_frames(path))
    assert frames[0].rgb.shape == (32, 48, 3)
    assert frames[0].rgb[:4, :8].mean() > 200 and frames[0].rgb[-4:, -8:].mean() < 150


def test_main_video_stream_is_chosen_and_stream_flag_picks_another(tmp_path):
    path = tmp_path / "thumb.mkv"
    with av.open(str(path), "w") as container:
        thumb = container.add_stream("mpeg4", rate=25)
        thumb.width = thumb.height = 64
        main_stream = container.add_stream("mpeg4", rate=25)
        main_stream.width, main_stream.height = 160, 96
        for stream in (thumb, main_stream):
            stream.pix_fmt = "yuv420p"
        for i in range(4):
            for stream in (thumb, main_stream):
                rgb = np.full((stream.height, stream.width, 3), 30 * i, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
        for stream in (thumb, main_stream):
            for packet in stream.encode():
                container.mux(packet)
    info = probe_video(path)
    assert (info.stream, info.n_streams, info.width, info.height) == (1, 2, 160, 96)
    assert next(read_frames(path)).rgb.shape == (96, 160, 3)
    assert next(read_frames(path, FrameSelection(stream=0))).rgb.shape == (64, 64, 3)
    with pytest.raises(TrackerError, match="--stream 5: .* has 2 video stream"):
        probe_video(path, 5)


def test_raw_stream_timing_comes_from_the_bitstream(tmp_path):
    """A raw .h264 has no container timing; its demuxer says 25 fps whatever the stream is: the bitstream's rate
    (30000/1001 here) gives the frame rate and times."""
    path = encode(tmp_path / "clip.h264", flat_frames(6, 64, 36), rate=Fraction(30000, 1001),
                  container_format="h264")
    info = probe_video(path)
    assert info.rate == Fraction(30000, 1001) and info.timing == "bitstream"
    times = [f.timestamp for f in read_frames(path)]
    assert times == pytest.approx([i * 1001 / 30000 for i in range(6)])


def test_resolution_change_mid_stream_is_rescaled_or_refused(tmp_path):
    """Two raw h264 segments back to back: 64x36 then 32x18 frames are rescaled to 64x36 (counted in the
    report); 64x36 then 36x64 (another aspect) is refused with the frame index."""
    first = encode(tmp_path / "a.h264", flat_frames(4, 64, 36), container_format="h264").read_bytes()
    smaller = encode(tmp_path / "b.h264", flat_frames(3, 32, 18, start=4), container_format="h264").read_bytes()
    turned = encode(tmp_path / "c.h264", flat_frames(3, 36, 64, start=4), container_format="h264").read_bytes()
    (tmp_path / "shrinks.h264").write_bytes(first + smaller)
    report = DecodeReport()
    frames = list(read_frames(tmp_path / "shrinks.h264", report=report))
    assert [f.rgb.shape for f in frames] == [(36, 64, 3)] * 7 and report.resized == 3
    assert [round(float(f.rgb.mean()) / 40) for f in frames] == list(range(6)) + [6]
    (tmp_path / "turns.h264").write_bytes(first + turned)
    with pytest.raises(TrackerError, match="frame 4 of .* is 36x64 but earlier frames are 64x36"):
        list(read_frames(tmp_path / "turns.h264"))


def test_truncated_stream_is_reported(tmp_path):
    full = encode(tmp_path / "full.mp4", [np.random.default_rng(i).integers(0, 255, (48, 64, 3), np.uint8)
                                          for i in range(20)], options={"movflags": "faststart"})
    cut = truncated_copy(full, tmp_path / "cut.mp4", 0.6)
    report = DecodeReport()
    frames = list(read_frames(cut, report=report))
    assert 0 < len(frames) < 20 and report.decoded == len(frames) and report.declared == 20
    assert not report.complete and "truncated" in report.stopped
    whole = DecodeReport()
    assert len(list(read_frames(full, report=whole))) == 20 and whole.complete
    first_five = DecodeReport()
    list(read_frames(cut, FrameSelection(max_frames=5), first_five))
    assert first_five.complete  # what was asked for was all there


# --- Outputs: folder, names, atomic writes, stale files -----------------------------------------------------

def test_output_names_are_safe_and_never_collide(tmp_path):
    assert safe_name(Path("...mp4")) == "video" and safe_name(Path("..")) == "video"
    assert safe_name(Path(os.fsdecode(b"take\xff.mp4"))) == "take%ff"
    assert safe_name(Path(".hidden.mp4")) == "hidden" and safe_name(Path("a:b.mp4")) == "a_b"
    out = tmp_path / "out"
    (tmp_path / "A").mkdir(), (tmp_path / "B").mkdir()
    a, b = tmp_path / "A" / "take.mp4", tmp_path / "B" / "take.mov"
    a.touch(), b.touch()
    first, second = RunFolder(out, a).open(), RunFolder(out, b).open()
    assert first == out / "take" and second.parent == out and second.name.startswith("take-")
    assert RunFolder(out, a).open() == first  # the same video comes back to its folder
    for video in (tmp_path / "...mp4", tmp_path / os.fsdecode(b"\xff\xfe.mp4")):
        video.touch()
        folder = RunFolder(out, video).open()
        assert folder.resolve().parent == out.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["...mp4", "A", "B", "out", os.fsdecode(b"\xff\xfe.mp4")]


@pytest.mark.parametrize("kind", ["file", "below_a_file", "read_only"])
def test_unusable_output_folder_is_refused_before_any_work(tmp_path, capsys, clip, monkeypatch, kind):
    import tracker.pipeline

    def no_detection(*_args, **_kwargs):
        pytest.fail("detection ran although the output folder is unusable")

    monkeypatch.setattr(tracker.pipeline, "detect_landmarks", no_detection)
    (tmp_path / "a_file").write_text("x")
    out = {"file": tmp_path / "a_file", "below_a_file": tmp_path / "a_file" / "out",
           "read_only": Path("/sys/tracker-test-out")}[kind]
    if kind == "read_only" and os.access("/sys", os.W_OK) and not Path("/sys").is_mount():
        pytest.skip("/sys is writable here")
    code, _, err = run_cli([clip, "--out", out, "--quiet"], capsys)
    line = one_line(err)
    assert code == 1 and "output folder" in line and "--out" in line and "written" not in line


def test_concurrent_atomic_writes_never_collide(tmp_path):
    """Two writers (two runs on one video, one cache) write the same file at once: unique temporary names,
    atomic renames, no crash, a whole file at the end."""
    target, errors = tmp_path / "same.npz", []

    def writer(seed: int) -> None:
        try:
            for _ in range(30):
                atomic_write(target, lambda fh: np.savez(fh, x=np.full(1000, seed)))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and np.load(target)["x"][0] in (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["same.npz"]


def test_unwritable_cache_is_skipped_with_a_warning(tmp_path, capsys):
    from tracker.detect.base import LandmarkTrack
    from tracker.detect.cache import save_track

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    track = LandmarkTrack.from_detections("mediapipe478", [0], [0.0], [None])
    save_track(tmp_path / "cache" / "landmarks" / "x.npz", track, "key")
    assert "warning: cannot write the detection cache" in capsys.readouterr().err


def test_strict_json_has_null_never_nan():
    text = strict_json({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.arange(2), "d": np.bool_(True)})
    assert strict_loads(text) == {"a": None, "b": [None, 1.5], "c": [0, 1], "d": True}


def test_checkpoints_are_time_based(tmp_path):
    """The first finished frame is written at once, then every CHECKPOINT_SECONDS (10 s), whatever the frame
    count; a kill -9 loses seconds of work."""
    from tracker.camera import Camera
    from tracker.detect.base import LandmarkTrack
    from tracker.flame.model import FlameParams
    from tracker.io import params_writer

    now = [0.0]
    T = 12
    track = LandmarkTrack.from_detections("mediapipe478", list(range(T)), [t / 25 for t in range(T)], [None] * T)
    writer = params_writer.OutputWriter(tmp_path, Camera.from_image(64, 64), 25.0, {}, track, params_writer.OnDisk(),
                                        clock=lambda: now[0])
    written = []
    for t in range(T):
        writer.add(t, FlameParams.zeros(1, 3, 2), 1.0, False)
        written.append(writer.on_disk.frames)
        now[0] += 3.0  # 3 s per frame
    assert written == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9]
    arrays, meta = read_params(tmp_path / "flame_params.npz")
    assert len(arrays["frame_index"]) == 9 and meta["complete"] is False


# --- Whole runs -----------------------------------------------------------------------------------------------

def test_nan_results_become_invalid_frames_and_strict_json(tmp_path, capsys, clip, monkeypatch):
    """NaNs written into a run (translation of frame 0, rotation of frame 1, landmark error of frame 2, all
    after the fit): those frames are invalid with a reason, valid rows are finite, summary.json is strict and
    counts what the npz holds."""
    import tracker.pipeline

    real_fit = tracker.pipeline.fit_landmarks

    def poisoned_fit(*args, **kwargs):
        result, focal = real_fit(*args, **kwargs)
        assert result.valid[:3].all()  # MediaPipe finds the face in the first frames of this clip
        result.params.translation[0, 0] = float("nan")
        result.params.rotation[1, 1] = float("inf")
        result.lmk_error_px[2] = np.nan
        return result, focal

    monkeypatch.setattr(tracker.pipeline, "fit_landmarks", poisoned_fit)
    video = tmp_path / os.fsdecode(b"take\xff.mp4")  # a name that is not UTF-8 on the way
    video.write_bytes(clip.read_bytes())
    code, out, err = run_cli([video, "--out", tmp_path / "out", "--no-video", "--densemarks", "off", "--quiet"],
                             capsys)
    assert code == 0, err
    folder = tmp_path / "out" / "take%ff"
    arrays, meta = read_params(folder / "flame_params.npz")
    valid, reasons = arrays["valid"], arrays["invalid_reason"].tolist()
    assert reasons[:3] == ["non-finite translation", "non-finite rotation", "non-finite lmk_error_px"]
    assert not valid[:3].any() and valid[3:].sum() >= 3  # the other frames: a face, or "no face found"
    assert all(reason == ("" if ok else "no face found") for ok, reason in zip(valid[3:], reasons[3:]))
    for key in ("expr", "rotation", "translation", "jaw_pose", "eyes_pose", "K"):
        assert np.isfinite(arrays[key]).all(), key  # invalid rows hold their neighbour's values
    assert np.isfinite(arrays["lmk_error_px"][valid]).all() and meta["complete"] is True
    summary = strict_loads((folder / "summary.json").read_text())
    assert summary["valid_frames"] == int(valid.sum())
    assert summary["invalid_frame_indices"] == arrays["frame_index"][~valid].tolist()
    assert summary["invalid_reasons"] == {reason: reasons.count(reason) for reason in set(reasons) if reason}
    assert f"{int(valid.sum())} tracked" in out


def test_rotated_clip_at_an_exact_rate_with_stride(tmp_path, capsys):
    """A phone clip (display rotation 90, 30000/1001 fps) tracked with --stride 2: frames tracked upright,
    image_size as displayed, the rotation in the summary, the overlay upright at exactly 15000/1001 fps."""
    upright = [np.ascontiguousarray(f[16:176]) for f in face_frames(8, skip=10)]  # 224 wide, 160 high
    stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in upright]
    video = encode(tmp_path / "phone.mp4", stored, rate=Fraction(30000, 1001), rotation=90)
    code, out, err = run_cli([video, "--stride", "2", "--out", tmp_path, "--densemarks", "off", "--no-report", "--quiet"],
                             capsys)
    assert code == 0, err
    arrays, meta = read_params(tmp_path / "phone" / "flame_params.npz")
    assert arrays["image_size"].tolist() == [160, 224] and arrays["valid"].sum() >= 3  # upright: faces found
    assert arrays["frame_index"].tolist() == [0, 2, 4, 6] and np.nanmean(arrays["lmk_error_px"]) < 3
    assert meta["input"]["rotation_deg"] == 90 and "rotated 90 degrees" in out
    with av.open(str(tmp_path / "phone" / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(15000, 1001)
        assert (stream.width, stream.height) == (224, 160) and stream.frames == 4


def test_truncated_video_is_tracked_and_marked_incomplete(tmp_path, capsys, clip):
    """A cut mp4 (moov first): the decodable frames are tracked and written, complete: false with the reason,
    a one-line error and exit 1. A stale overlay and a stale complete summary from an earlier run there go."""
    full = encode(tmp_path / "full.mp4", face_frames(12), options={"movflags": "faststart"})
    video = truncated_copy(full, tmp_path / "cut.mp4", 0.55)
    folder = tmp_path / "out" / "cut"
    folder.mkdir(parents=True)
    (folder / "overlay.mp4").write_bytes(b"an old overlay")
    (folder / "summary.json").write_text('{"complete": true}')
    (folder / ".tracker-video").write_bytes(os.fsencode(str(video.resolve())))
    code, out, err = run_cli([video, "--out", tmp_path / "out", "--no-video", "--no-report", "--densemarks", "off",
                              "--quiet"], capsys)
    line = one_line(err)
    assert code == 1 and "incomplete" in line and "truncated" in line
    arrays, meta = read_params(folder / "flame_params.npz")
    summary = strict_loads((folder / "summary.json").read_text())
    assert meta["complete"] is False and summary["complete"] is False and "truncated" in summary["incomplete_reason"]
    assert 0 < len(arrays["frame_index"]) < 12 == summary["input"]["frames_declared"]
    assert summary["input"]["frames_decoded"] == len(arrays["frame_index"])
    assert not (folder / "overlay.mp4").exists()
    # Again, with the detections from the cache (no decoding during detection): the same verdict.
    code, _, err = run_cli([video, "--out", tmp_path / "out", "--no-video", "--no-report", "--densemarks", "off",
                            "--quiet"], capsys)
    assert code == 1 and one_line(err) == line


def test_interrupted_rerun_leaves_no_stale_complete(tmp_path, capsys, clip, monkeypatch):
    """A re-run into a folder whose earlier run said complete: true, interrupted during detection: the earlier
    files are gone, and the message says no frames were written."""
    import tracker.pipeline

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    code, _, _ = run_cli([clip, "--out", tmp_path, "--no-video", "--densemarks", "off", "--max-frames", "3",
                          "--quiet"], capsys)
    assert code == 0 and read_params(tmp_path / "clip" / "flame_params.npz")[1]["complete"] is True
    monkeypatch.setattr(tracker.pipeline, "LandmarkStream", interrupted)  # detection starts
    code, _, err = run_cli([clip, "--out", tmp_path, "--no-video", "--quiet"], capsys)
    assert code == 130 and one_line(err) == "interrupted by SIGINT: no frames were written"
    assert not (tmp_path / "clip" / "flame_params.npz").exists() and not (tmp_path / "clip" / "summary.json").exists()


def two_frame_windows(folder: Path) -> str:
    """A config fitting two frames at a time, so that an 8-frame run finishes frames in small groups."""
    path = folder / "two_frame_windows.yaml"
    path.write_text("fit:\n  window: 2\n")
    return str(path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, capsys, clip, monkeypatch, signum):
    """The signal arrives while a frame is fitted: the finished frames are written, one line, exit 128 + N."""
    import tracker.fit.sequence as sequence

    real_fit, calls = sequence.fit_lm, {"n": 0}

    def signalled_fit(*args, **kwargs):
        calls["n"] += "reference" in kwargs  # one per window of frames (its last pass)
        if calls["n"] == 2 and "reference" in kwargs:  # frames 2-3, after frames 0-1 were written
            os.kill(os.getpid(), signum)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sequence, "fit_lm", signalled_fit)
    code, _, err = run_cli([clip, "--out", tmp_path, "--no-video", "--no-report", "--densemarks", "off", "--quiet",
                            "--config", two_frame_windows(tmp_path)], capsys)
    arrays, meta = read_params(tmp_path / "clip" / "flame_params.npz")
    written = len(arrays["frame_index"])
    assert code == 128 + signum and 1 < written < 8 and calls["n"] == 2  # stopped at once
    assert one_line(err) == (f"interrupted by {signal.Signals(signum).name}: {written} finished frames were "
                             f"written to {tmp_path / 'clip' / 'flame_params.npz'} (complete: false)")
    assert meta["complete"] is False and np.isfinite(arrays["rotation"]).all()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_signal_lost_in_a_finaliser_still_stops():
    """Python drops an exception raised while a `__del__` runs (as the CI saw: SIGTERM during a library's garbage
    collection, and the run went on to exit 0); the next checkpoint raises it, once."""

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside __del__: its exception is dropped

    with interrupt_on_signals():
        Finalised()  # collected at once
        with pytest.raises(Interrupted) as stopped:
            stop_if_signalled()
        assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_code == 143
        stop_if_signalled()  # raised once only
    stop_if_signalled()  # outside the block: nothing pending


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_signal_lost_in_a_finaliser_stops_the_run(tmp_path, capsys, clip, monkeypatch):
    """The same inside a run: the frames fitted so far are written (complete: false), exit 143, one line."""
    from tracker.fit import sequence

    real_fit, calls = sequence.fit_lm, {"n": 0}

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def fit_dropping_the_signal(*args, **kwargs):
        calls["n"] += "reference" in kwargs  # one per window of frames (its last pass)
        if calls["n"] == 2 and "reference" in kwargs:  # frames 2-3; the next frame's checkpoint stops the run
            Finalised()
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sequence, "fit_lm", fit_dropping_the_signal)
    code, _, err = run_cli([clip, "--out", tmp_path, "--no-video", "--no-report", "--densemarks", "off", "--quiet",
                            "--config", two_frame_windows(tmp_path)], capsys)
    arrays, meta = read_params(tmp_path / "clip" / "flame_params.npz")
    assert code == 143 and 1 < len(arrays["frame_index"]) < 8 and meta["complete"] is False
    assert one_line(err).startswith("interrupted by SIGTERM: ")


def test_sigterm_to_the_command(tmp_path, clip, cache_dir):
    """The real command gets SIGTERM (as from `timeout`, Docker, Slurm) as soon as its run folder exists: exit
    143, one line saying what was written (and a written npz is marked incomplete)."""
    env = {**os.environ, "TRACKER_CACHE_DIR": str(cache_dir / "sigterm")}
    proc = subprocess.Popen([sys.executable, "-m", "tracker.run", str(clip), "--out", str(tmp_path), "--quiet",
                             "--no-video", "--no-report"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "clip" / ".tracker-video").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = one_line(err)
    assert line.startswith("interrupted by SIGTERM: ")
    if "no frames were written" not in line:
        assert read_params(tmp_path / "clip" / "flame_params.npz")[1]["complete"] is False


def test_user_mistakes_are_not_unexpected(tmp_path, capsys, clip):
    code, _, err = run_cli([clip, "--device", "gpu0", "--out", tmp_path / "out"], capsys)
    line = one_line(err)
    assert code == 1 and "not a torch device" in line and "unexpected" not in line
    assert not (tmp_path / "out").exists()


def test_bug_wording_never_claims_frames_were_written(tmp_path, capsys, clip, monkeypatch):
    import tracker.pipeline

    def bug(*_args, **_kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tracker.pipeline, "LandmarkStream", bug)  # detection starts
    code, _, err = run_cli([clip, "--out", tmp_path, "--quiet"], capsys)
    line = one_line(err)
    assert code == 4 and "unexpected ZeroDivisionError (a bug in the tracker)" in line
    assert "no frames were written" in line


def test_eval_rows_of_broken_videos_fail_alone(tmp_path):
    """eval.run on undecodable videos: each fails its own row with a one-line reason, the loop goes on (it used
    to stop the whole evaluation with a TypeError traceback)."""
    from types import SimpleNamespace

    from eval import run as eval_run
    from eval.ablation import Ablation, AblationConfig
    from eval.report import ConfigResults

    garbage, empty = tmp_path / "garbage.mp4", tmp_path / "empty.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    empty.write_bytes(b"")
    result, config = ConfigResults("landmarks", ""), AblationConfig("landmarks")
    ctx = SimpleNamespace(options=SimpleNamespace(device="cpu", real_frames=2), run_dir=tmp_path / "eval")
    eval_run.run_real(result, config, Ablation({}, (config,)), [garbage, empty], ctx)
    assert set(result.failures) == {"garbage", "empty"} and result.skipped is None
    assert all("cannot read" in reason and "\n" not in reason for reason in result.failures.values())


def test_eval_scoring_failure_fails_its_row_only():
    from eval import run as eval_run
    from eval.ablation import AblationConfig
    from eval.report import ConfigResults

    result = ConfigResults("cfg", "")
    for name in ("good1", "broken", "good2"):
        with eval_run.row_failures(result, AblationConfig("cfg"), name):
            if name == "broken":
                raise TrackerError("broken.gt.npz is a damaged ground truth")
            result.real[name] = "scored"
    assert set(result.real) == {"good1", "good2"}
    assert result.failures == {"broken": "broken.gt.npz is a damaged ground truth"}


def test_garbled_ground_truth_cache_is_regenerated_or_one_line(tmp_path):
    from eval.synthetic.generate import _stored_key, load_ground_truth

    garbled = tmp_path / "seq.gt.npz"
    garbled.write_bytes(b"PK\x03\x04 garbled")
    assert _stored_key(garbled) is None  # the generator makes it again
    with pytest.raises(TrackerError, match="seq.gt.npz"):
        load_ground_truth(garbled)
