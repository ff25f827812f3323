"""Fuzz and property tests of the readers and writers: damaged, random and generated inputs give a clear
one-line error or a valid result, never a traceback, a hang, code execution or a non-finite value in a valid row.

Deterministic (fixed seeds, hypothesis derandomized) and small, so the whole file runs in well under a minute."""

from __future__ import annotations

import json
import os
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import FLAME_ASSETS
from tests.hostile import encode, flat_frames, truncated_copy
from tracker.config import CONFIG_DIR, NUMBER_RANGES, TrackerConfig, load_config, parse_yaml
from tracker.detect.base import LandmarkTrack
from tracker.detect.cache import load_track, save_track
from tracker.errors import TrackerError
from tracker.flame.loading import load_flame_file
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.export import FrameTable, read_params, write_params
from tracker.io.files import RunFolder, strict_json
from tracker.io.safe_load import read_npy, read_npz, read_pickle
from tracker.io.video import DecodeReport, probe_video, read_frames

FAST = settings(max_examples=30, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """`count` damaged copies of `data`: a few random bytes flipped, or the file cut short."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        buf = bytearray(data)
        if i % 3 == 2:
            out.append(bytes(buf[: int(rng.integers(0, len(buf)))]))
            continue
        for position in rng.integers(0, len(buf), int(rng.integers(1, 6))):
            buf[position] ^= 1 << int(rng.integers(0, 8))
        out.append(bytes(buf))
    return out


def clear_or_valid(call, check=lambda result: None):
    """Run a reader: a TrackerError must be one short line; anything else must pass `check`."""
    try:
        result = call()
    except TrackerError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 600, message
        return None
    check(result)
    return result


def tiny_flame(V: int = 6, n_dirs: int = 4) -> dict:
    """A FLAME-layout model with V vertices (the real layout: 5 joints, posedirs V x 3 x 36)."""
    rng = np.random.default_rng(V)
    faces = np.array([[i, (i + 1) % V, (i + 2) % V] for i in range(V)], np.int64)
    return {"v_template": rng.normal(size=(V, 3)), "f": faces, "shapedirs": rng.normal(size=(V, 3, n_dirs)) * 0.01,
            "posedirs": np.zeros((V, 3, 36)), "J_regressor": np.full((5, V), 1.0 / V),
            "weights": np.full((V, 5), 0.2), "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
            "n_shape": np.array(2), "n_expr": np.array(2)}


def check_flame(data) -> None:
    """A model the loader accepted is usable: finite arrays, faces in range, a tree, a finite forward pass."""
    V = data.v_template.shape[0]
    assert data.faces.min() >= 0 and data.faces.max() < V
    assert all((0 <= p < j) for j, p in enumerate(data.parents) if j)
    model = FlameModel(data)
    vertices = model(FlameParams.zeros(1, model.n_shape, model.n_expr)).vertices
    assert torch.isfinite(vertices).all()


# --- Fuzz: byte flips and truncations ------------------------------------------------------------------------

def test_fuzz_video(tmp_path):
    sources = [encode(tmp_path / "a.mp4", flat_frames(6, 64, 48)),
               encode(tmp_path / "b.mkv", flat_frames(6, 32, 24), codec="mpeg4")]
    for source in sources:
        for i, data in enumerate(mutations(source.read_bytes(), seed=1, count=12)):
            path = tmp_path / f"m{i}{source.suffix}"
            path.write_bytes(data)
            clear_or_valid(lambda: probe_video(path))  # noqa: B023

            def check(frames):
                assert len({f.rgb.shape for f in frames}) <= 1
                assert all(np.isfinite(f.timestamp) for f in frames)

            report = DecodeReport()
            clear_or_valid(lambda: list(read_frames(path, report=report)), check)  # noqa: B023


def test_fuzz_flame_files(tmp_path):
    arrays = tiny_flame()
    npz = tmp_path / "flame.npz"
    np.savez(npz, **arrays)
    pkl = tmp_path / "flame.pkl"
    pkl.write_bytes(pickle.dumps({**arrays, "J_regressor": scipy.sparse.csc_matrix(arrays["J_regressor"])},
                                 protocol=2))
    for source in (npz, pkl):
        for i, data in enumerate(mutations(source.read_bytes(), seed=2, count=30)):
            path = tmp_path / f"m{i}{source.suffix}"
            path.write_bytes(data)
            clear_or_valid(lambda: load_flame_file(path), check_flame)  # noqa: B023


def test_fuzz_assets(tmp_path, shared_data):
    """Embeddings, masks and eyelids, damaged: a clear error or arrays, and nothing the restricted unpickler
    refuses can run (the originals only name numpy)."""
    readers = {"flame_static_embedding_68.pkl": read_pickle, "flame_dynamic_embedding.npy": read_npy,
               "mediapipe_landmark_embedding.npz": read_npz, "l_eyelid.npy": read_npy}
    for name, reader in readers.items():
        for i, data in enumerate(mutations((FLAME_ASSETS / name).read_bytes(), seed=3, count=12)):
            path = tmp_path / f"{i}-{name}"
            path.write_bytes(data)
            clear_or_valid(lambda: reader(path))  # noqa: B023


def test_fuzz_config(tmp_path):
    text = (CONFIG_DIR / "default.yaml").read_bytes()
    for i, data in enumerate(mutations(text, seed=4, count=30)):
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(data)
        clear_or_valid(lambda: load_config(path), check_config)  # noqa: B023


def test_fuzz_detection_cache(tmp_path, capsys):
    track = LandmarkTrack.from_detections("mediapipe478", [0, 1], [0.0, 0.04], [None, None])
    path = tmp_path / "cache.npz"
    save_track(path, track, "key")
    for i, data in enumerate(mutations(path.read_bytes(), seed=5, count=20)):
        damaged = tmp_path / f"d{i}.npz"
        damaged.write_bytes(data)
        loaded = load_track(damaged, "key")  # never raises: a damaged cache means detecting again
        assert loaded is None or len(loaded) == 2
    capsys.readouterr()


# --- Properties: generated videos, configs, model files, results ---------------------------------------------

@st.composite
def videos(draw):
    codec, suffix = draw(st.sampled_from([("libx264", ".mp4"), ("mpeg4", ".mkv"), ("mjpeg", ".avi"),
                                          ("ffv1", ".mkv")]))
    even = codec == "libx264"
    width = draw(st.integers(1, 24)) * 2 if even else draw(st.integers(2, 48))
    height = draw(st.integers(1, 24)) * 2 if even else draw(st.integers(2, 48))
    return dict(codec=codec, suffix=suffix, width=width, height=height, n=draw(st.integers(1, 5)),
                rate=draw(st.sampled_from([Fraction(25), Fraction(30000, 1001), Fraction(24), Fraction(25, 2)])),
                thumbnail=draw(st.booleans()), cut=draw(st.one_of(st.none(), st.floats(0.2, 0.95))))


@FAST
@given(spec=videos())
def test_generated_videos(tmp_path_factory, spec):
    """Any generated video (sizes, codecs, containers, rates, a second small stream, a cut) is read upright and
    whole, at one size, with finite increasing times and a truthful report; or refused in one line."""
    folder = tmp_path_factory.mktemp("video")
    path = folder / f"v{spec['suffix']}"
    width, height = spec["width"], spec["height"]
    pix_fmt = "yuvj420p" if spec["codec"] == "mjpeg" else "yuv420p"
    if spec["codec"] != "libx264":
        width, height = width + width % 2, height + height % 2  # 4:2:0 sizes
    try:
        write_generated(path, spec, width, height, pix_fmt)
    except av.FFmpegError:
        assume(False)  # an encoder that refuses this size: nothing to read
    if spec["cut"] is not None:
        truncated_copy(path, path, spec["cut"])
    report = DecodeReport()
    info = clear_or_valid(lambda: probe_video(path))

    def check(frames):
        assert frames and len(frames) == report.decoded
        assert info is not None and {f.rgb.shape for f in frames} == {(info.height, info.width, 3)}
        times = [f.timestamp for f in frames]
        assert all(np.isfinite(times)) and all(b > a for a, b in zip(times, times[1:]))
        assert not (report.complete and report.declared) or report.decoded == report.declared
        if spec["cut"] is None:
            assert report.complete and len(frames) == spec["n"]

    frames = clear_or_valid(lambda: list(read_frames(path, report=report)), check)
    if spec["cut"] is None:  # an intact video is never refused, and its main stream is the one read
        assert frames is not None and (info.width, info.height) == (width, height) and info.rate == spec["rate"]


def write_generated(path, spec: dict, width: int, height: int, pix_fmt: str) -> None:
    with av.open(str(path), "w") as container:
        streams = []
        if spec["thumbnail"]:
            thumb = container.add_stream(spec["codec"], rate=spec["rate"])
            thumb.width, thumb.height, thumb.pix_fmt = 2, 2, pix_fmt
            streams.append(thumb)
        main = container.add_stream(spec["codec"], rate=spec["rate"])
        main.width, main.height, main.pix_fmt = width, height, pix_fmt
        streams.append(main)
        for i in range(spec["n"]):
            for stream in streams:
                rgb = np.full((stream.height, stream.width, 3), 40 * i, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)


NUMBER_KEYS = [("fit", "lr"), ("fit", "shape_iters"), ("fit", "global_window"), ("camera", "focal"),
               ("camera", "fov_prior_deg"), ("video", "stride"), ("video", "max_frames"), ("seed",),
               ("energy", "landmarks", "scale"), ("energy", "priors", "weight"), ("photometric", "iters"),
               ("densemarks", "min_inliers"), ("energy", "dense_corr", "min_facing")]
ANY_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20), st.booleans(),
                      st.text(max_size=300), st.none(), st.lists(st.integers(), max_size=400))


def check_config(cfg: TrackerConfig) -> None:
    """Every number of an accepted config is finite and in its range."""
    import dataclasses
    import fnmatch

    def numbers(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from numbers(value, f"{prefix}{f.name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{f.name}", value

    for key, value in numbers(cfg):
        assert np.isfinite(value), key
        low, high, inclusive = next(((lo, hi, inc) for pattern, lo, hi, inc in NUMBER_RANGES
                                     if fnmatch.fnmatchcase(key, pattern)), (0, np.inf, True))
        assert (value >= low if inclusive else value > low) and value <= high, key


@FAST
@given(st.lists(st.tuples(st.sampled_from(NUMBER_KEYS), ANY_VALUE), min_size=1, max_size=4))
def test_generated_configs(items):
    overrides: dict = {}
    for keys, value in items:
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    clear_or_valid(lambda: load_config(overrides=overrides), check_config)


@FAST
@given(st.text(max_size=400))
def test_generated_yaml_text(text):
    clear_or_valid(lambda: parse_yaml(text, "generated"))


@st.composite
def flame_models(draw):
    V = draw(st.integers(3, 10))
    arrays = tiny_flame(V, draw(st.integers(0, 6)))
    damage = draw(st.sampled_from(["none", "nan", "faces", "parents", "shape", "dims", "counts"]))
    key = draw(st.sampled_from(["v_template", "shapedirs", "J_regressor", "weights", "posedirs"]))
    if damage == "nan":
        arrays[key] = arrays[key].astype(float)
        arrays[key].reshape(-1)[draw(st.integers(0, arrays[key].size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    elif damage == "faces":
        arrays["f"][draw(st.integers(0, V - 1)), 0] = draw(st.sampled_from([-1, V, 10**6]))
    elif damage == "parents":
        arrays["kintree_table"][0] = draw(st.lists(st.integers(-2, 6), min_size=5, max_size=5))
    elif damage == "shape":
        arrays[key] = arrays[key][: max(1, arrays[key].shape[0] - draw(st.integers(1, 2)))]
    elif damage == "dims":
        arrays[key] = arrays[key].reshape(-1)
    elif damage == "counts":
        arrays["n_shape"] = np.array(draw(st.sampled_from([-1, 10**6, 2.5, np.nan])))
    return arrays, damage


@FAST
@given(model=flame_models())
def test_generated_model_files(tmp_path_factory, model):
    """A generated model file loads into a usable model or is refused naming the file and the array."""
    arrays, damage = model
    path = tmp_path_factory.mktemp("flame") / "flame.npz"
    np.savez(path, **arrays)
    try:
        data = load_flame_file(path)
    except TrackerError as error:
        message = str(error)
        assert str(path) in message and "array" in message and "\n" not in message
        return
    check_flame(data)
    assert damage in ("none", "parents")  # any other damage is refused, never loaded silently


@st.composite
def frame_tables(draw):
    T = draw(st.integers(1, 6))
    params = FlameParams.zeros(T, 3, 2)
    values = st.sampled_from([0.0, 0.5, np.nan, np.inf, -np.inf])
    for name in ("expr", "rotation", "translation", "jaw_pose"):
        tensor = getattr(params, name)
        for t in range(T):
            tensor[t, 0] = draw(values)
    params.shape[0, 0] = draw(st.sampled_from([0.0, 0.0, 0.0, np.nan]))
    valid = np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T)))
    errors = np.array(draw(st.lists(values, min_size=T, max_size=T)), np.float32)
    focal = draw(st.sampled_from([500.0, 500.0, 500.0, np.nan]))
    return FrameTable(params, np.arange(T), np.arange(T) / 25.0, valid, errors), focal


@FAST
@given(table_focal=frame_tables())
def test_written_results_keep_the_invariants(tmp_path_factory, table_focal):
    """Whatever the tracker produced: valid rows are finite, invalid rows say why and hold no NaN parameters,
    the summary is strict JSON."""
    from tracker.camera import Camera

    table, focal = table_focal
    folder = tmp_path_factory.mktemp("run")
    arrays = write_params(folder / "flame_params.npz", table, Camera.from_image(64, 64, focal=focal), 25.0,
                          {"note": float("nan")})
    stored, meta = read_params(folder / "flame_params.npz")
    assert meta == {"note": None}
    valid = stored["valid"]
    assert (valid <= table.valid).all()
    for key in ("expr", "rotation", "translation", "jaw_pose", "K", "lmk_error_px", "timestamp"):
        assert np.isfinite(stored[key][valid]).all(), key
    for key in ("expr", "rotation", "translation", "jaw_pose"):
        assert np.isfinite(stored[key]).all(), key
    assert all(stored["invalid_reason"][~valid]) and not any(stored["invalid_reason"][valid])
    assert np.array_equal(stored["valid"], arrays["valid"])
    json.loads(strict_json({"mean": float(np.nanmean(stored["lmk_error_px"])) if valid.any() else np.nan}),
               parse_constant=lambda name: pytest.fail(name))


@FAST
@given(name=st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\x00" not in b and b.strip(b".")))
def test_generated_video_names_stay_inside_out(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("names")
    video = root / "videos" / os.fsdecode(name)
    video.parent.mkdir()
    try:
        video.touch()
    except OSError:  # a name the file system refuses (too long, '.', '..')
        return
    folder = RunFolder(root / "out", video).open()
    assert folder.parent == root / "out" and folder.name not in ("", ".", "..")
    assert folder.resolve().parent == (root / "out").resolve()
    folder.name.encode("utf-8")  # printable and storable in JSON
    assert sorted(p.name for p in root.iterdir()) == ["out", "videos"]
