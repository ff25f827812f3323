"""FLAME layer: loading (incl. chumpy-era pickles without chumpy), LBS, landmark embeddings."""

import pickle
import sys
import types

import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.errors import MissingAssetError, TrackerError
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import contour_bin
from tracker.flame.lbs import batch_rodrigues, matrix_to_axis_angle
from tracker.flame.loading import load_flame_file
from tracker.flame.model import FlameModel, FlameParams


@pytest.fixture(scope="module")
def bundle():
    return load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "ibug68")


def test_standin_loads_with_clipped_dimensions(bundle):
    model = bundle.model
    assert model.n_vertices == 5023 and model.faces.shape == (9976, 3)
    assert (model.n_shape, model.n_expr) == (60, 43)  # clipped to what the file holds
    assert model.has_eyelids
    small = load_flame_file(FLAME_STANDIN, n_shape=10, n_expr=5)
    assert small.shape_dirs.shape == (5023, 3, 10) and small.expr_dirs.shape == (5023, 3, 5)
    assert small.parents.tolist() == [-1, 0, 1, 1, 1]


def test_npz_matches_pickle():
    a = load_flame_file(FLAME_STANDIN, 20, 20)
    b = load_flame_file(FLAME_STANDIN.with_suffix(".npz"), 20, 20)
    np.testing.assert_allclose(a.v_template, b.v_template)
    np.testing.assert_allclose(a.expr_dirs, b.expr_dirs)


def test_zero_parameters_give_template(bundle):
    out = bundle.model(FlameParams.zeros(2, bundle.model.n_shape, bundle.model.n_expr))
    torch.testing.assert_close(out.vertices[1], bundle.model.v_template, atol=1e-6, rtol=0)


def test_jaw_rotation_moves_only_jaw_weighted_vertices(bundle):
    model = bundle.model
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.jaw_pose[0, 0] = 0.3
    moved = (model(params).vertices[0] - model.v_template).norm(dim=-1) > 1e-6
    jaw_weighted = model.weights[:, 2] > 0
    assert moved.sum() > 100
    assert not (moved & ~jaw_weighted).any()
    # A jaw-opening rotation lowers the chin (FLAME's y points up).
    chin = torch.argmin(model.v_template[:, 1] + 10 * (~jaw_weighted).float())
    assert model(params).vertices[0, chin, 1] < model.v_template[chin, 1]


def test_translation_and_global_rotation(bundle):
    model = bundle.model
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.translation[0] = torch.tensor([0.1, -0.2, 0.3])
    torch.testing.assert_close(model(params).vertices[0], model.v_template + params.translation[0])
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.rotation[0, 1] = np.pi / 2  # turn the head to its left about the root joint
    out = model(params)
    root = model.joints_template[0]
    expected = (model.v_template - root) @ batch_rodrigues(params.rotation)[0].T + root
    torch.testing.assert_close(out.vertices[0], expected, atol=1e-5, rtol=0)


def test_subset_forward_matches_full(bundle):
    model = bundle.model
    torch.manual_seed(0)
    params = FlameParams.zeros(3, model.n_shape, model.n_expr)
    params.expr.normal_(0, 0.3)
    params.jaw_pose[:, 0] = 0.2
    params.rotation.normal_(0, 0.3)
    ids = bundle.landmarks.vertex_ids
    full = model(params).vertices[:, ids]
    torch.testing.assert_close(model(params, ids).vertices, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.restricted(ids)(params).vertices, full, atol=1e-6, rtol=0)


def test_rodrigues_round_trip():
    torch.manual_seed(1)
    aa = torch.randn(50, 3).clamp(-1.5, 1.5)
    R = batch_rodrigues(aa)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(50, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix_to_axis_angle(R), aa, atol=1e-4, rtol=0)


def _point_triangle_plane_distance(p, tri):
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n = n / n.norm(dim=-1, keepdim=True)
    return ((p - tri[:, 0]) * n).sum(-1).abs()


@pytest.mark.parametrize("scheme", ["ibug68", "mediapipe478"])
def test_landmarks_lie_on_mesh_surface(scheme):
    b = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, scheme)
    model = b.model
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    params.jaw_pose[0, 0] = 0.2
    verts = model(params).vertices
    lmk = b.landmarks.full_positions(verts)[0]  # static embedding
    sub = verts[0, b.landmarks.vertex_ids]
    assert _point_triangle_plane_distance(lmk, sub[b.landmarks.corners]).max() < 1e-6
    if b.landmarks.contour_corners is not None:  # the dynamic contour of a 20-degree yaw
        turned = b.landmarks.full_positions(verts, torch.tensor([20.0]))[0, :17]
        tri = sub[b.landmarks.contour_corners[contour_bin(torch.tensor([20.0]))[0]]]
        assert _point_triangle_plane_distance(turned, tri).max() < 1e-6
        assert (turned - lmk[:17]).norm(dim=-1).max() > 1e-3  # and it differs from the static contour
    assert (b.landmarks.bary >= -1e-6).all() and torch.allclose(b.landmarks.bary.sum(-1), torch.ones(1))
    # The embedding fits this topology: every landmark lies within 1 cm of a mesh vertex.
    assert torch.cdist(lmk, verts[0]).min(1).values.max() < 0.01


def test_landmark_positions_of_a_batch_match_each_frames_triangles():
    """LandmarkSet.positions on a batch (the row-gather path for fixed triangles) equals each frame's barycentric
    points of its own landmark triangles, and carries forward-mode derivatives (the identity fit uses them)."""
    from tracker.flame.landmarks import barycentric_points

    b = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 20, 10, "mediapipe478")
    marks = b.landmarks
    sub = torch.randn(5, len(marks.vertex_ids), 3, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([barycentric_points(frame[marks.corners], marks.bary) for frame in sub])
    assert torch.allclose(marks.positions(sub, torch.zeros(5)), expected, atol=1e-6)
    tangent = torch.randn_like(sub)
    jvp = torch.func.jvp(lambda v: marks.positions(v, torch.zeros(5)), (sub,), (tangent,))[1]
    assert torch.allclose(jvp, torch.stack([barycentric_points(t[marks.corners], marks.bary) for t in tangent]),
                          atol=1e-6)


def test_ibug68_semantics():
    b = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 300, 100, "ibug68")
    lmk = b.landmarks.full_positions(b.model.v_template[None], torch.zeros(1))[0]
    assert torch.argmax(lmk[:, 2]).item() == 30  # nose tip is the most frontal point
    assert lmk[36, 0] < lmk[45, 0]  # iBUG 36 is the subject's right eye corner: FLAME's -x side
    assert lmk[8, 1] < lmk[30, 1] < lmk[27, 1]  # chin below nose tip below nose bridge


def test_contour_bins_follow_ringnet_convention():
    yaw = torch.tensor([0.0, -10.0, -39.0, -60.0, 10.0, 39.0, 60.0])
    assert contour_bin(yaw).tolist() == [0, 10, 39, 39, 49, 78, 78]


def _chumpy_pickle(path, arrays):
    """Write a pickle whose arrays are instances of a class from a fake `chumpy.ch` module."""
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

        def __getstate__(self):
            return {"x": self.x, "_dirty_vars": set()}

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    ch.Ch = Ch
    sys.modules.update({"chumpy": chumpy, "chumpy.ch": ch})
    try:
        data = {k: (Ch(v) if k in ("v_template", "shapedirs", "posedirs", "weights") else v)
                for k, v in arrays.items()}
        with open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def test_chumpy_pickle_loads_without_chumpy(tmp_path):
    import scipy.sparse

    with open(FLAME_STANDIN, "rb") as fh:
        raw = pickle.load(fh)
    arrays = {k: raw[k] for k in ("v_template", "f", "shapedirs", "posedirs", "weights", "kintree_table")}
    arrays["J_regressor"] = scipy.sparse.csc_matrix(raw["J_regressor"])
    arrays["kintree_table"] = arrays["kintree_table"].astype(np.uint32)
    arrays["kintree_table"][0, 0] = np.iinfo(np.uint32).max  # how FLAME 2020 stores the root's parent
    path = tmp_path / "generic_model.pkl"
    _chumpy_pickle(path, arrays)
    assert "chumpy" not in sys.modules
    data = load_flame_file(path, 300, 100)
    np.testing.assert_allclose(data.v_template, raw["v_template"].astype(np.float32))
    np.testing.assert_allclose(data.j_regressor, raw["J_regressor"].astype(np.float32))
    assert data.parents.tolist() == [-1, 0, 1, 1, 1]
    assert data.shape_dirs.shape == (5023, 3, 300) and data.expr_dirs.shape == (5023, 3, 100)
    FlameModel(data)  # builds


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": Evil()}))
    with pytest.raises(TrackerError, match="forbidden class"):
        load_flame_file(path)


def test_bad_files(tmp_path):
    with pytest.raises(MissingAssetError, match="flame.is.tue.mpg.de"):
        load_flame_file(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(TrackerError, match="not a readable"):
        load_flame_file(tmp_path / "junk.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}))
    with pytest.raises(TrackerError, match="missing f, shapedirs"):
        load_flame_file(tmp_path / "other.pkl")
