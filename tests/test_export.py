"""Avatar exports round-trip: FLAME vertices evaluated from the exported files the way GaussianAvatars and VHAP
evaluate them, projected with the exported cameras the way they read them, land on the tracker's own
projection within 0.1 px.

The consumers' conventions are implemented here from scratch in numpy (their FLAME layer: smplx LBS with the
global rotation about the root joint, shapedirs[:, :, :300] shape and [300:400] expression, offsets added
before skinning, then + translation; their cameras), not with the tracker's code.
"""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN, REPO
from tracker.camera import Camera
from tracker.export import main as export_main
from tracker.flame.assets import load_eyelids
from tracker.flame.loading import load_flame_file
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.export import FrameTable, write_params

TOLERANCE_PX = 0.1
FLAME_VERTICES = 5023


# ---- the consumers' conventions, independently -------------------------------------------------------------

def rodrigues(v: np.ndarray) -> np.ndarray:
    """Rotation matrix of an axis-angle vector (3,)."""
    angle = np.linalg.norm(v)
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


class ConsumerFlame:
    """GaussianAvatars' / VHAP's FlameHead(300, 100) on a FLAME-layout model file (first 5023 vertices)."""

    def __init__(self, model_npz: Path):
        with np.load(model_npz, allow_pickle=False) as z:
            m = {k: z[k] for k in z.files}
        self.template = m["v_template"]
        dirs = m["shapedirs"]
        self.shapedirs = np.concatenate([dirs[:, :, :300], dirs[:, :, 300:400]], axis=2)
        self.posedirs = m["posedirs"].reshape(-1, m["posedirs"].shape[-1]).T  # (36, V*3)
        self.J_regressor = m["J_regressor"]
        self.weights = m["weights"]
        self.parents = m["kintree_table"][0].astype(int)
        self.parents[0] = -1

    def __call__(self, p: dict) -> np.ndarray:
        """World vertices (V, 3) of one frame's npz dict (per-frame arrays with a leading 1)."""
        V = self.template.shape[0]
        betas = np.concatenate([p["shape"].reshape(-1), p["expr"].reshape(-1)])
        v_shaped = self.template + self.shapedirs @ betas
        for key in ("static_offset", "dynamic_offset"):
            if key in p:
                v_shaped = v_shaped + p[key][0][:V]
        J = self.J_regressor @ v_shaped
        pose = np.concatenate([p["rotation"].reshape(-1), p["neck_pose"].reshape(-1), p["jaw_pose"].reshape(-1),
                               p["eyes_pose"].reshape(-1)]).reshape(-1, 3)
        Rs = np.stack([rodrigues(r) for r in pose])
        v_posed = v_shaped + ((Rs[1:] - np.eye(3)).reshape(-1) @ self.posedirs).reshape(V, 3)
        G = []
        for j, parent in enumerate(self.parents):
            local = np.eye(4)
            local[:3, :3] = Rs[j]
            local[:3, 3] = J[j] - (J[parent] if parent >= 0 else 0)
            G.append(local if parent < 0 else G[parent] @ local)
        A = np.stack(G)
        A[:, :3, 3] -= np.einsum("jab,jb->ja", A[:, :3, :3], J)  # act on rest-pose vertices
        T = np.einsum("vj,jab->vab", self.weights, A)
        verts = np.einsum("vab,vb->va", T[:, :3, :3], v_posed) + T[:, :3, 3]
        return verts + p["translation"].reshape(1, 3)


def gaussian_avatars_project(frame: dict, verts: np.ndarray) -> np.ndarray:
    """scene/dataset_readers.py: c2w in OpenGL axes -> flip y, z columns -> w2c; FoV from camera_angle_x only,
    symmetric frustum (principal point at the image centre). Pixels with the image spanning [0, w]."""
    c2w = np.array(frame["transform_matrix"], dtype=np.float64)
    c2w[:3, 1:3] *= -1
    w2c = np.linalg.inv(c2w)
    cam = verts @ w2c[:3, :3].T + w2c[:3, 3]
    w, h = frame["w"], frame["h"]
    fov_x = frame["camera_angle_x"]
    fx = w / (2 * np.tan(fov_x / 2))
    fov_y = 2 * np.arctan(h / (2 * fx))  # focal2fov(fov2focal(fovx, width), height)
    fy = h / (2 * np.tan(fov_y / 2))
    return np.stack([fx * cam[:, 0] / cam[:, 2] + w / 2, fy * cam[:, 1] / cam[:, 2] + h / 2], axis=1)


def vhap_project(w2c_gl: np.ndarray, fx: float, fy: float, cx: float, cy: float, h: int,
                 verts: np.ndarray) -> np.ndarray:
    """VHAP's nvdiffrast projection (OpenGL camera, x right, y up, looking along -z), in pixels (y down) with
    the image spanning [0, w]: x_ndc = 2 fx x / (w d) - (w - 2 cx) / w, the y axis flipped."""
    cam = verts @ w2c_gl[:3, :3].T + w2c_gl[:3, 3]
    d = -cam[:, 2]
    return np.stack([fx * cam[:, 0] / d + cx, (h - cy) - fy * cam[:, 1] / d], axis=1)


def load_frame_npz(path: Path) -> dict:
    """readMeshesFromTransforms: dict(np.load(path, allow_pickle=True))."""
    return dict(np.load(path, allow_pickle=True))


def gaussian_avatars_load_meshes(meshes: dict[int, dict], num_verts: int) -> dict:
    """FlameGaussianModel.load_meshes: per-timestep arrays into (T, k) tensors, static_offset padded."""
    T = max(meshes) + 1
    static = torch.from_numpy(meshes[0]["static_offset"])
    static = torch.nn.functional.pad(static, (0, 0, 0, num_verts - meshes[0]["static_offset"].shape[1]))
    params = {"shape": torch.from_numpy(meshes[0]["shape"]), "expr": torch.zeros([T, meshes[0]["expr"].shape[1]]),
              "static_offset": static}
    for key, size in (("rotation", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eyes_pose", 6), ("translation", 3)):
        params[key] = torch.zeros([T, size])
    for i, mesh in meshes.items():
        for key in ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation"):
            params[key][i] = torch.from_numpy(mesh[key])
    return params


# ---- runs to export -------------------------------------------------------------------------------------------

def tracker_pixels(model: FlameModel, camera: Camera, arrays: dict, row: int) -> np.ndarray:
    """The tracker's own projection of row `row` (internal pixels: image spanning [0, W])."""
    p = FlameParams(shape=torch.as_tensor(arrays["shape"])[None],
                    **{k: torch.as_tensor(arrays[k][row:row + 1]) for k in
                       ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "eyelids", "translation")})
    with torch.no_grad():
        return camera.project(model(p).vertices[0])[0].numpy().astype(np.float64)


def write_video(path: Path, n: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(n):
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A run with every joint, the eyelids and pose correctives active, on a model file with random
    posedirs (the stand-in has none), a frame without a face and an off-centre head."""
    root = tmp_path_factory.mktemp("synthetic")
    with np.load(str(FLAME_STANDIN).replace(".pkl", ".npz"), allow_pickle=False) as z:
        model_arrays = {k: z[k] for k in z.files}
    rng = np.random.default_rng(3)
    model_arrays["posedirs"] = rng.normal(0, 2e-3, model_arrays["posedirs"].shape)
    model_file = root / "posed_model.npz"
    np.savez(model_file, **model_arrays)
    data = load_flame_file(model_file, 100, 50)
    model = FlameModel(data, load_eyelids(FLAME_ASSETS))
    T, height, width = 6, 48, 64
    params = FlameParams.zeros(T, model.n_shape, model.n_expr)
    g = torch.Generator().manual_seed(0)
    params.shape = torch.randn(1, model.n_shape, generator=g)
    params.expr = torch.rand(T, model.n_expr, generator=g) * 0.5
    params.rotation = torch.randn(T, 3, generator=g) * 0.3
    params.neck_pose = torch.randn(T, 3, generator=g) * 0.2
    params.jaw_pose = torch.rand(T, 3, generator=g) * torch.tensor([0.3, 0.05, 0.05])
    params.eyes_pose = torch.randn(T, 6, generator=g) * 0.2
    params.eyelids = torch.rand(T, 2, generator=g)
    params.translation = torch.tensor([0.05, -0.03, -0.6]) + torch.randn(T, 3, generator=g) * 0.02
    camera = Camera.from_image(height, width, focal=70.0)
    valid = np.ones(T, bool)
    valid[2] = False
    video = root / "clip.mp4"
    write_video(video, T, height, width)
    run = root / "run"
    metadata = {"flame_file": str(model_file), "flame_sha256": data.sha256, "n_shape": model.n_shape,
                "n_expr": model.n_expr, "eyelid_blendshapes": True, "flame_assets_dir": str(FLAME_ASSETS),
                "video": str(video), "complete": True}
    write_params(run / "flame_params.npz", FrameTable(params, np.arange(T), np.arange(T) / 25.0, valid,
                                                      np.zeros(T, np.float32)), camera, 25.0, metadata)
    return run, model, camera, model_file


def export(run: Path, out: Path, fmt: str, capsys) -> tuple[int, str, str]:
    code = export_main([str(run), "--format", fmt, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- tests ----------------------------------------------------------------------------------------------------

def check_nerf_round_trip(dataset: Path, model_file: Path, own_pixels) -> dict:
    """Every exported frame, read as GaussianAvatars and as VHAP read the dataset, projects onto the tracker's
    own projection (own_pixels(original row) -> (V, 2)); returns the largest errors."""
    flame = ConsumerFlame(model_file)
    transforms = json.loads((dataset / "transforms.json").read_text())
    assert transforms["timestep_indices"] == list(range(len(transforms["frames"])))
    meshes = {f["timestep_index"]: load_frame_npz(dataset / f["flame_param_path"]) for f in transforms["frames"]}
    loaded = gaussian_avatars_load_meshes(meshes, FLAME_VERTICES + 120)
    assert loaded["static_offset"].shape == (1, FLAME_VERTICES + 120, 3)
    worst = {"gaussian_avatars": 0.0, "vhap": 0.0, "without_dynamic_offset": 0.0}
    for frame in transforms["frames"]:
        t = frame["timestep_index"]
        p = meshes[t]
        assert np.allclose(loaded["expr"][t].numpy(), p["expr"][0])
        assert (dataset / frame["file_path"]).is_file()
        verts = flame(p)
        own = own_pixels(frame["timestep_index_original"])
        worst["gaussian_avatars"] = max(worst["gaussian_avatars"],
                                        np.abs(gaussian_avatars_project(frame, verts) - own).max())
        w2c_gl = np.linalg.inv(np.array(frame["transform_matrix"]))  # VHAP's NeRFDataset: extrinsic = c2w^-1
        vhap = vhap_project(w2c_gl, frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"], frame["h"], verts)
        worst["vhap"] = max(worst["vhap"], np.abs(vhap - own).max())
        without = flame({k: v for k, v in p.items() if k != "dynamic_offset"})
        worst["without_dynamic_offset"] = max(worst["without_dynamic_offset"],
                                              np.abs(gaussian_avatars_project(frame, without) - own).max())
    return worst


def test_nerf_export_round_trips_on_a_synthetic_run(synthetic_run, tmp_path, capsys):
    run, model, camera, model_file = synthetic_run
    code, out, err = export(run, tmp_path / "nerf", "nerf", capsys)
    assert code == 0, err
    dataset = tmp_path / "nerf"
    arrays = dict(np.load(run / "flame_params.npz"))
    worst = check_nerf_round_trip(dataset, model_file, lambda r: tracker_pixels(model, camera, arrays, r))
    assert worst["gaussian_avatars"] < TOLERANCE_PX and worst["vhap"] < TOLERANCE_PX, worst
    # the eyelids travel in dynamic_offset only: a consumer that drops it (GaussianAvatars) misses them, as
    # the export warns
    assert worst["without_dynamic_offset"] > 3 * TOLERANCE_PX
    assert "dynamic_offset" in err and "not the official FLAME" in err
    transforms = json.loads((dataset / "transforms.json").read_text())
    assert [f["timestep_index_original"] for f in transforms["frames"]] == [0, 1, 3, 4, 5]  # row 2: no face
    info = json.loads((dataset / "export_info.json").read_text())
    assert info["frames"]["skipped_without_face"] == [2] and info["model"]["sha256"] == model.sha256
    assert info["model"]["vertices"] == FLAME_VERTICES and "ARKit-style" in info["model"]["expression_basis"]
    assert len(info["warnings"]) == 2 and "fg_masks" in info["fg_masks"]


def test_nerf_layout(synthetic_run, tmp_path, capsys):
    """File names, array shapes and the train/val/test split that VHAP writes and GaussianAvatars reads."""
    run, *_ = synthetic_run
    dataset = tmp_path / "nerf"
    assert export(run, dataset, "nerf", capsys)[0] == 0
    frame = load_frame_npz(dataset / "flame_param" / "00000.npz")
    shapes = {k: v.shape for k, v in frame.items()}
    assert shapes == {"translation": (1, 3), "rotation": (1, 3), "neck_pose": (1, 3), "jaw_pose": (1, 3),
                      "eyes_pose": (1, 6), "shape": (300,), "expr": (1, 100), "static_offset": (1, 5143, 3),
                      "dynamic_offset": (1, 5143, 3)}
    assert all(v.dtype == np.float32 for v in frame.values())
    assert np.all(frame["expr"][0, 50:] == 0) and np.all(frame["shape"][60:] == 0)  # padded, not invented
    canonical = load_frame_npz(dataset / "canonical_flame_param.npz")
    assert canonical["jaw_pose"].tolist() == [[pytest.approx(0.3), 0, 0]] and not canonical["expr"].any()
    images = sorted(p.name for p in (dataset / "images").iterdir())
    assert images == [f"{t:05d}_00.png" for t in range(5)]
    splits = {name: json.loads((dataset / f"transforms_{name}.json").read_text()) for name in ("train", "val", "test")}
    assert [f["timestep_index"] for f in splits["train"]["frames"]] == [0, 1, 2, 3]  # ceil(0.7 * 5)
    assert [f["timestep_index"] for f in splits["test"]["frames"]] == [4] and splits["val"]["frames"] == []
    first = splits["train"]["frames"][0]
    for key in ("file_path", "transform_matrix", "fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x",
                "camera_angle_y", "timestep_index", "camera_index", "camera_id", "flame_param_path"):
        assert key in first
    assert "camera_angle_x" in splits["test"]  # the shared intrinsics NeRF readers fall back on
    assert (first["w"], first["h"], first["cx"], first["cy"]) == (64, 48, 32.0, 24.0)


def test_vhap_export_round_trips(synthetic_run, tmp_path, capsys):
    run, model, camera, model_file = synthetic_run
    code, _, err = export(run, tmp_path / "vhap", "vhap", capsys)
    assert code == 0, err
    z = dict(np.load(tmp_path / "vhap" / "tracked_flame_params.npz", allow_pickle=False))
    T = 6
    assert z["expr"].shape == (T, 100) and z["shape"].shape == (300,) and z["rotation"].shape == (T, 3)
    assert z["eyes_pose"].shape == (T, 6) and z["dynamic_offset"].shape == (T, 5143, 3)
    assert z["image_size"].tolist() == [48, 64] and z["timestep_id"].tolist()[:2] == ["00000", "00001"]
    assert z["focal_length"].shape == (1,) and z["focal_length"][0] == pytest.approx(70.0 / 64)
    flame = ConsumerFlame(model_file)
    arrays = dict(np.load(run / "flame_params.npz"))
    h, w = z["image_size"]
    f = float(z["focal_length"][0]) * max(h, w)  # VHAP: fill_cam_params_into_sample
    w2c = np.eye(4)
    w2c[2, 3] = -1  # GlobalTracker.init_params: RT[2, 3] = -1, the camera at (0, 0, 1)
    for t in range(T):
        p = {k: z[k][t:t + 1] for k in ("translation", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "expr",
                                        "dynamic_offset")}
        p.update(shape=z["shape"], static_offset=z["static_offset"])
        pixels = vhap_project(w2c, f, f, w / 2, h / 2, h, flame(p))
        assert np.abs(pixels - tracker_pixels(model, camera, arrays, t)).max() < TOLERANCE_PX


def test_tracked_clip_exports_for_gaussian_avatars(tracked_wojtek, tmp_path, capsys):
    """Done-when: a tracked clip exported with --format nerf loads with GaussianAvatars' conventions and
    projects onto the tracker's own result (tracker.load, OpenCV K) within 0.1 px."""
    import tracker

    code, _, err = export(tracked_wojtek, tmp_path / "nerf", "nerf", capsys)
    assert code == 0, err
    result = tracker.load(tracked_wojtek)
    own = lambda row: result.project(result.vertices(row), row) + 0.5  # noqa: E731  OpenCV -> image [0, w]
    worst = check_nerf_round_trip(tmp_path / "nerf", Path(str(FLAME_STANDIN).replace(".pkl", ".npz")), own)
    assert worst["gaussian_avatars"] < TOLERANCE_PX and worst["vhap"] < TOLERANCE_PX, worst
    transforms = json.loads((tmp_path / "nerf" / "transforms.json").read_text())
    assert len(transforms["frames"]) == int(result.valid.sum()) == 20


def test_refusals(synthetic_run, tmp_path, capsys):
    run, *_ = synthetic_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, _, err = export(run, tmp_path / "full", "nerf", capsys)
    assert code == 1 and "not an empty folder" in err
    code, _, err = export_main([str(run), "--format", "nerf", "--out", str(tmp_path / "a"), "--strict"]), None, None
    assert code == 1 and not (tmp_path / "a").exists()
    assert "--strict" in capsys.readouterr().err
    code = export_main([str(run), "--out", str(tmp_path / "b"), "--flame", str(FLAME_STANDIN)])
    assert code == 1 and "is not the model that produced this run" in capsys.readouterr().err
    code = export_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert code == 1 and "no tracking result" in capsys.readouterr().err


def test_export_help_does_not_import_torch():
    code = ("import sys\nfrom tracker.export import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO-TORCH") and "--format {nerf,vhap}" in proc.stdout
