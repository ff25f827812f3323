"""The shipped flame_assets/: the open default head model and its side files (plain arrays equal to their
sources, within budget, credited), the model lookup order, and the CLI working with no FLAME, no environment
and no shared data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN, MEDIAPIPE_TASK, REPO
from tools.pack_flame_assets import vertex_error_mm
from tracker.errors import MissingAssetError
from tracker.flame import assets as flame_assets
from tracker.flame.assets import DEFAULT_MODEL, DEFAULT_MODEL_NOTE, REPO_ASSETS, find_assets_dir, find_flame_file
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import read_dynamic_contour
from tracker.flame.loading import file_sha256, read_pickle
from tracker.io.export import read_params

BUDGET_BYTES = 15 * 1024 * 1024
COPIED_UNCHANGED = {"l_eyelid.npy": FLAME_ASSETS / "l_eyelid.npy", "r_eyelid.npy": FLAME_ASSETS / "r_eyelid.npy",
                    "head_template.obj": FLAME_ASSETS / "head_template.obj",
                    "face_landmarker_v2_with_blendshapes.task": MEDIAPIPE_TASK}
FLAME_ENV = ("FLAME_MODEL", "TRACKER_FLAME_ASSETS", "TRACKER_MEDIAPIPE_MODEL", "TRACKER_SHARED_DATA")


def tracked_files() -> list[Path]:
    """Files under flame_assets/ that git tracks or would add (a user's own FLAME files are ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "flame_assets"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return sorted(REPO / name for name in out.split("\0") if name and (REPO / name).is_file())


def plain_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_shipped_model_is_the_standin_within_storage_precision():
    """The compact default model computes exactly the stand-in's float32 arrays, and its float64 vertices differ
    from the original's by far less than 0.01 mm over random poses and full expressions."""
    shipped = load_flame_bundle(str(DEFAULT_MODEL), str(REPO_ASSETS), 300, 100, "mediapipe478")
    original = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "mediapipe478")
    for name in ("v_template", "faces", "dirs", "posedirs", "weights", "parents", "joints_template", "joint_dirs"):
        assert torch.equal(getattr(shipped.model, name), getattr(original.model, name)), name
    assert shipped.model.expression_names == original.model.expression_names
    assert len(shipped.model.expression_names) == 43 and shipped.model.expression_names[-1] == "eyelidClose_R"
    assert vertex_error_mm(FLAME_STANDIN.with_suffix(".npz"), DEFAULT_MODEL) < 0.01
    raw = plain_arrays(DEFAULT_MODEL)
    assert raw["expression_names"].dtype.kind == "U" and "CC-BY-4.0" in str(raw["license"])


def test_shipped_side_files_are_plain_arrays_equal_to_their_sources():
    converted = {"flame_static_embedding_68.npz": read_pickle(FLAME_ASSETS / "flame_static_embedding_68.pkl"),
                 "flame_dynamic_embedding.npz": read_dynamic_contour(FLAME_ASSETS / "flame_dynamic_embedding.npy"),
                 "FLAME_masks.npz": read_pickle(FLAME_ASSETS / "FLAME_masks.pkl")}
    for name, source in converted.items():
        shipped = plain_arrays(REPO_ASSETS / name)
        assert shipped.keys() == source.keys(), name
        for key, value in source.items():
            assert np.array_equal(shipped[key], np.asarray(value)), f"{name}: {key}"
            assert shipped[key].dtype == np.asarray(value).dtype, f"{name}: {key}"
    for name, source in COPIED_UNCHANGED.items():
        assert (REPO_ASSETS / name).read_bytes() == source.read_bytes(), name


def test_tracked_assets_are_plain_within_budget_and_credited():
    files = tracked_files()
    names = {p.relative_to(REPO_ASSETS).as_posix() for p in files}
    expected = {"flame_standin.npz", *COPIED_UNCHANGED, "mediapipe_landmark_embedding.npz", "flame_static_embedding_68.npz",
                "flame_dynamic_embedding.npz", "FLAME_masks.npz", "README.md", "NOTICE.md"}
    assert expected <= names
    assert sum(p.stat().st_size for p in files) <= BUDGET_BYTES
    notice = (REPO_ASSETS / "NOTICE.md").read_text()
    for name in names - {"NOTICE.md", "README.md"}:
        assert f"`{name}`" in notice or f"({name})" in notice, f"NOTICE.md does not credit {name}"
    assert not any(p.suffix in (".pkl", ".pickle") for p in files)
    for path in files:
        if path.suffix == ".npz":
            plain_arrays(path)  # raises if anything in it needs unpickling
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
    # A user's own FLAME files in flame_assets/ stay out of git.
    ignored = subprocess.run(["git", "check-ignore", "flame_assets/generic_model.pkl", "flame_assets/flame2023.pkl",
                              "flame_assets/flame2023_Open.pkl", "flame_assets/FLAME_masks.pkl"],
                             cwd=REPO, capture_output=True, text=True).stdout.split()
    assert len(ignored) == 4


def test_shipped_mediapipe_embedding_is_smirks_recalibrated_plus_the_mesh():
    """The shipped MediaPipe embedding starts with SMIRK's 105 points (same points, same order), each moved on
    FLAME's surface to where MediaPipe puts it (eval.calibrate_embedding): within the calibration's search
    radius of the published position, and moved (median over points 1-6 mm) rather than copied; then the rest
    of MediaPipe's face mesh, face oval and irises aside, each on the face region's surface."""
    from eval.calibrate_embedding import MEDIAPIPE_MESH_POINTS, SEARCH_RADIUS_M
    from tracker.flame.landmarks import MEDIAPIPE_FACE_OVAL

    faces = load_flame_bundle(None, None, 10, 10, "mediapipe478").model
    template, tri = faces.v_template.numpy().astype(np.float64), faces.faces.numpy()

    def positions(path):
        with np.load(path, allow_pickle=False) as z:
            return (template[tri[z["lmk_face_idx"]]] * z["lmk_b_coords"][..., None]).sum(1), z["landmark_indices"]

    shipped, shipped_points = positions(REPO_ASSETS / "mediapipe_landmark_embedding.npz")
    published, published_points = positions(FLAME_ASSETS / "mediapipe_landmark_embedding.npz")
    n = len(published_points)
    assert np.array_equal(shipped_points[:n], published_points)
    rest = set(range(MEDIAPIPE_MESH_POINTS)) - set(published_points.tolist()) - set(MEDIAPIPE_FACE_OVAL)
    assert sorted(shipped_points[n:].tolist()) == sorted(rest) and len(rest) > 300
    moved = np.linalg.norm(shipped[:n] - published, axis=1)
    assert moved.max() <= SEARCH_RADIUS_M + 1e-6
    assert 0.001 < np.median(moved) < 0.006, np.median(moved)
    with np.load(REPO_ASSETS / "mediapipe_landmark_embedding.npz", allow_pickle=False) as z:
        assert z["calibrated"].all() and int(z["frames"]) > 500


def test_flame_lookup_order(tmp_path, monkeypatch):
    """--flame, then $FLAME_MODEL, then an official FLAME file in flame_assets/, then the shipped default."""
    folder = tmp_path / "flame_assets"
    folder.mkdir()
    default, official, env_file, given = (folder / "flame_standin.npz", folder / "generic_model.pkl",
                                          tmp_path / "env.pkl", tmp_path / "given.pkl")
    for path in (default, official, env_file, given):
        path.write_bytes(b"")
    monkeypatch.setattr(flame_assets, "REPO_ASSETS", folder)
    monkeypatch.setattr(flame_assets, "DEFAULT_MODEL", default)
    monkeypatch.setenv("FLAME_MODEL", str(env_file))
    assert find_flame_file(str(given)) == given
    assert find_flame_file(None) == env_file
    monkeypatch.delenv("FLAME_MODEL")
    assert find_flame_file(None) == official
    official.unlink()
    assert find_flame_file(None) == default
    default.unlink()
    with pytest.raises(MissingAssetError, match="shipped default"):
        find_flame_file(None)


def test_side_file_folder_lookup(tmp_path, monkeypatch):
    """A folder given wins; else the model's own folder when it holds the side files; else flame_assets/."""
    monkeypatch.delenv("TRACKER_FLAME_ASSETS", raising=False)
    lone = tmp_path / "model.pkl"
    assert find_assets_dir(None, lone) == REPO_ASSETS
    assert find_assets_dir(None, FLAME_ASSETS / "generic_model.pkl") == FLAME_ASSETS  # the official .pkl names
    assert find_assets_dir(str(tmp_path), DEFAULT_MODEL) == tmp_path
    monkeypatch.setenv("TRACKER_FLAME_ASSETS", str(tmp_path))
    assert find_assets_dir(None, DEFAULT_MODEL) == tmp_path


def test_official_flame_in_flame_assets_keeps_precedence(tmp_path, monkeypatch):
    """A user's FLAME file in flame_assets/ with the side files under their published names (pickles) is used,
    read through the restricted reader, and recorded as not the default; the shipped model is the default."""
    for name in ("FLAME_MODEL", "TRACKER_FLAME_ASSETS"):
        monkeypatch.delenv(name, raising=False)
    default = load_flame_bundle(None, None, 300, 100, "ibug68")
    folder = tmp_path / "flame_assets"
    folder.mkdir()
    (folder / "generic_model.pkl").symlink_to(FLAME_STANDIN)  # stands in for the user's official FLAME
    for name in ("flame_static_embedding_68.pkl", "flame_dynamic_embedding.npy", "mediapipe_landmark_embedding.npz",
                 "FLAME_masks.pkl", "l_eyelid.npy", "r_eyelid.npy"):
        (folder / name).symlink_to(FLAME_ASSETS / name)
    monkeypatch.setattr(flame_assets, "REPO_ASSETS", folder)
    user = load_flame_bundle(None, None, 300, 100, "ibug68")
    assert user.flame_file == folder / "generic_model.pkl" and user.assets_dir == folder and not user.is_default
    assert user.model_record["sha256"] == file_sha256(FLAME_STANDIN)
    assert "not stated" in user.model_record["license"]
    assert default.flame_file == DEFAULT_MODEL and default.assets_dir == REPO_ASSETS and default.is_default
    assert default.model_record["sha256"] == file_sha256(DEFAULT_MODEL)
    assert default.model_record["name"] == "flame_standin" and "CC-BY-4.0" in default.model_record["license"]
    # Which embedding a run used is recorded by content: the user's folder's files, not the shipped ones.
    assert user.model_record["assets_dir"] == str(folder)
    assert user.model_record["landmark_embedding"] == {
        "flame_static_embedding_68.pkl": file_sha256(FLAME_ASSETS / "flame_static_embedding_68.pkl"),
        "flame_dynamic_embedding.npy": file_sha256(FLAME_ASSETS / "flame_dynamic_embedding.npy")}
    shipped = default.model_record["landmark_embedding"]
    assert default.model_record["assets_dir"] == str(REPO_ASSETS) and len(shipped) == 2
    assert all(shipped[name] == file_sha256(REPO_ASSETS / name) for name in shipped)
    # The same side data either way (pickles beside the user's model, plain arrays shipped).
    for name in ("corners", "bary", "contour_corners", "contour_bary", "vertex_ids"):
        assert torch.equal(getattr(user.landmarks, name), getattr(default.landmarks, name)), name
    assert all(np.array_equal(user.masks[k], default.masks[k]) for k in default.masks)


def test_cli_tracks_a_synthetic_clip_with_nothing_but_the_clone(tmp_path):
    """The one command on a short synthetic clip (rendered from the shipped model with an FFHQ texture), in a
    subprocess with no FLAME / assets / MediaPipe variables and no shared data folder: a complete export of
    valid frames made with the shipped default model, recorded as such."""
    from eval.synthetic.generate import generate_sequence, load_assets
    from eval.synthetic.scenario import Segment, SequenceSpec

    spec = SequenceSpec("clip", (Segment("static", 2), Segment("talk", 4)), photo=2, seed=5, image_size=256)
    sequence = generate_sequence(spec, load_assets(tmp_path / "cache", str(DEFAULT_MODEL), str(REPO_ASSETS)),
                                 tmp_path / "clips")
    env = {k: v for k, v in os.environ.items() if k not in FLAME_ENV}
    env.update(TRACKER_SHARED_DATA=str(tmp_path / "no_shared_data"), TRACKER_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    work = tmp_path / "work"  # no ../shared from here
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "tracker.run", str(sequence.video), "--out", "out", "--quiet"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines().count(DEFAULT_MODEL_NOTE) == 1
    out = work / "out" / "clip"
    arrays, meta = read_params(out / "flame_params.npz")
    T = spec.n_frames
    assert meta["complete"] and arrays["valid"].all() and arrays["frame_index"].tolist() == list(range(T))
    assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f")
    assert arrays["lmk_error_px"].max() < 1.0  # the fitted head lies on the rendered one (measured ~0.2 px)
    record = {"name": "flame_standin", "file": str(DEFAULT_MODEL), "sha256": file_sha256(DEFAULT_MODEL),
              "shipped_default": True, "assets_dir": str(REPO_ASSETS), "landmark_embedding": {
                  "mediapipe_landmark_embedding.npz": file_sha256(REPO_ASSETS / "mediapipe_landmark_embedding.npz")}}
    assert {k: meta["flame_model"][k] for k in record} == record and "CC-BY-4.0" in meta["flame_model"]["license"]
    assert meta["detector"]["model_path"] == str((REPO_ASSETS / "face_landmarker_v2_with_blendshapes.task").resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flame_model"] == meta["flame_model"] and summary["valid_frames"] == T
    with av.open(str(out / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == T
