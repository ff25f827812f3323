"""eval.geometry: exact point-to-surface distances, mesh files, the NoW protocol and multi-view metrics,
checked on synthetic scans with known distances and transforms."""

import math
import pickle

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from eval.geometry import mesh_io
from eval.geometry.__main__ import main as now_cli
from eval.geometry.dataset import NowDataset, load_now_prediction, save_now_prediction
from eval.geometry.mesh_distance import closest_points_on_mesh, closest_points_on_triangles
from eval.geometry.multiview import (
    PinholeCamera,
    multiview_reprojection_errors,
    multiview_silhouette_ious,
    project_points,
)
from eval.geometry.now import (
    NowOptions,
    cumulative_error_curve,
    evaluate_now,
    now_face_crop,
    now_scan_to_mesh_errors,
    summarise_errors,
)
from tests.conftest import FLAME_ASSETS
from tracker.errors import MissingAssetError, TrackerError

FLAME_TEMPLATE = FLAME_ASSETS / "template.ply"


def midpoint(i: int, j: int, vertices: list[np.ndarray], cache: dict[tuple[int, int], int]) -> int:
    """Index of the (new or cached) unit-sphere point halfway between vertices i and j."""
    key = (min(i, j), max(i, j))
    if key not in cache:
        m = vertices[i] + vertices[j]
        vertices.append(m / np.linalg.norm(m))
        cache[key] = len(vertices) - 1
    return cache[key]


def icosphere(subdivisions: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Convex polyhedron with vertices on a sphere: (V, 3), (F, 3) outward-facing triangles."""
    p = (1 + 5 ** 0.5) / 2
    vertices = [(-1, p, 0), (1, p, 0), (-1, -p, 0), (1, -p, 0), (0, -1, p), (0, 1, p), (0, -1, -p), (0, 1, -p),
                (p, 0, -1), (p, 0, 1), (-p, 0, -1), (-p, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11),
             (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    vertices = [np.array(v, float) / np.linalg.norm(v) for v in vertices]
    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}
        split = []
        for a, b, c in faces:
            ab, bc, ca = (midpoint(i, j, vertices, cache) for i, j in ((a, b), (b, c), (c, a)))
            split += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = split
    return radius * np.array(vertices), np.array(faces)


def surface_samples(vertices, faces, count, rng):
    """Random points on the surface: (count, 3) points, their face ids and barycentric coordinates."""
    face_ids = rng.integers(0, len(faces), count)
    bary = rng.dirichlet([2.0, 2.0, 2.0], count)  # keeps clear of the edges
    return np.einsum("nc,ncd->nd", bary, vertices[faces[face_ids]]), face_ids


def face_normals(vertices, faces):
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def brute_force_distances(points, vertices, faces):
    tri = vertices[faces]
    weights = closest_points_on_triangles(points[:, None, :], tri[None])
    closest = np.einsum("nfc,fcd->nfd", weights, tri)
    return np.linalg.norm(closest - points[:, None, :], axis=-1).min(axis=1)


# ---------------------------------------------------------------------------------------------- point to triangle

TRIANGLE = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.mark.parametrize("point, closest", [
    ((0.2, 0.3, 0.5), (0.2, 0.3, 0.0)),  # above the interior
    ((0.2, 0.3, -0.7), (0.2, 0.3, 0.0)),  # below the interior
    ((0.5, -0.4, 0.3), (0.5, 0.0, 0.0)),  # beyond edge ab
    ((-0.3, 0.6, 0.0), (0.0, 0.6, 0.0)),  # beyond edge ac
    ((1.0, 1.0, 0.0), (0.5, 0.5, 0.0)),  # beyond edge bc
    ((-1.0, -2.0, 2.0), (0.0, 0.0, 0.0)),  # beyond vertex a
    ((2.0, -1.0, 0.0), (1.0, 0.0, 0.0)),  # beyond vertex b
    ((-0.5, 2.0, 0.0), (0.0, 1.0, 0.0)),  # beyond vertex c
])
def test_closest_point_on_triangle_analytic_cases(point, closest):
    weights = closest_points_on_triangles(np.array(point), TRIANGLE)
    np.testing.assert_allclose(weights @ TRIANGLE, closest, atol=1e-15)
    assert weights.sum() == pytest.approx(1.0) and np.all(weights >= -1e-15)


def test_mesh_distances_equal_brute_force_on_flame_template():
    rng = np.random.default_rng(3)
    vertices, faces = mesh_io.load_ply(FLAME_TEMPLATE)
    near, _ = surface_samples(vertices, faces, 100, rng)
    points = np.concatenate([near + rng.normal(scale=0.004, size=near.shape), rng.normal(scale=0.2, size=(20, 3))])
    projection = closest_points_on_mesh(points, vertices, faces)
    np.testing.assert_allclose(projection.distances, brute_force_distances(points, vertices, faces), atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(projection.points - points, axis=1), projection.distances, atol=1e-15)


def test_mesh_distances_match_libigl():
    """Cross-check with a well-kept library: libigl's AABB-tree point-to-mesh distance."""
    import igl

    rng = np.random.default_rng(5)
    vertices, faces = mesh_io.load_ply(FLAME_TEMPLATE)
    near, _ = surface_samples(vertices, faces, 2000, rng)
    points = np.concatenate([near + rng.normal(scale=0.01, size=near.shape), rng.normal(scale=0.2, size=(200, 3))])
    squared, face_ids, closest = igl.point_mesh_squared_distance(points, vertices.astype(np.float64),
                                                                 faces.astype(np.int64))
    projection = closest_points_on_mesh(points, vertices, faces)
    np.testing.assert_allclose(projection.distances, np.sqrt(squared), atol=1e-9)
    np.testing.assert_allclose(projection.points, closest, atol=1e-7)


def test_outward_offsets_from_a_convex_mesh_are_recovered_exactly():
    rng = np.random.default_rng(4)
    vertices, faces = icosphere(3, radius=0.1)
    on_surface, face_ids = surface_samples(vertices, faces, 2000, rng)
    offsets = rng.uniform(0.0, 0.01, 2000)
    points = on_surface + offsets[:, None] * face_normals(vertices, faces)[face_ids]
    projection = closest_points_on_mesh(points, vertices, faces)
    np.testing.assert_allclose(projection.distances, offsets, atol=1e-15)
    np.testing.assert_allclose(projection.points, on_surface, atol=1e-15)


# ---------------------------------------------------------------------------------------------- files


def test_mesh_and_landmark_files_round_trip(tmp_path):
    vertices, faces = mesh_io.load_ply(FLAME_TEMPLATE)  # binary little-endian
    assert vertices.shape == (5023, 3) and faces.shape == (9976, 3) and faces.max() == 5022
    mesh_io.save_obj(tmp_path / "m.obj", vertices, faces)
    v, f = mesh_io.load_obj(tmp_path / "m.obj")
    np.testing.assert_allclose(v, vertices, rtol=1e-7)
    np.testing.assert_array_equal(f, faces)

    (tmp_path / "quad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1 -1/1\n")
    np.testing.assert_array_equal(mesh_io.load_obj(tmp_path / "quad.obj")[1], [[0, 1, 2], [0, 2, 3]])
    (tmp_path / "a.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                                    "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                    "end_header\n0 0 0\n1 0 0\n0 2 0\n3 0 2 1\n")
    v, f = mesh_io.load_mesh(tmp_path / "a.ply")
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [0, 2, 0]])
    np.testing.assert_array_equal(f, [[0, 2, 1]])

    (tmp_path / "s.pp").write_text('<!DOCTYPE PickedPoints>\n<PickedPoints>\n <DocumentData>\n'
                                   '  <DataFileName name="scan.obj"/>\n </DocumentData>\n'
                                   ' <point x="1.5" y="-2" z="3" active="1" name="0"/>\n'
                                   ' <point z="6" y="5" x="4" active="1" name="1"/>\n</PickedPoints>\n')
    np.testing.assert_array_equal(mesh_io.load_landmarks(tmp_path / "s.pp"), [[1.5, -2, 3], [4, 5, 6]])
    with pytest.raises(MissingAssetError):
        mesh_io.load_mesh(tmp_path / "missing.obj")
    with pytest.raises(TrackerError):
        mesh_io.load_mesh(tmp_path / "s.pp")


# ---------------------------------------------------------------------------------------------- NoW protocol


def sphere_scan_case(rng, count=3000):
    """Prediction: an icosphere in metres. Scan: its surface pushed out by known offsets (mm), moved by a
    known rigid transform into millimetres. Landmarks: 7 points of the front cap, exact on both."""
    vertices, faces = icosphere(3, radius=0.1)
    on_surface, face_ids = surface_samples(vertices, faces, count, rng)
    offsets_mm = rng.uniform(0.0, 2.0, count)
    scan_in_pred = on_surface + offsets_mm[:, None] / 1000.0 * face_normals(vertices, faces)[face_ids]
    directions = np.array([[-0.5, 0.2, 1], [-0.2, 0.2, 1], [0.2, 0.2, 1], [0.5, 0.2, 1], [0, -0.2, 1],
                           [-0.3, -0.5, 1], [0.3, -0.5, 1]])
    pred_landmarks = closest_points_on_mesh(0.1 * directions / np.linalg.norm(directions, axis=1, keepdims=True),
                                            vertices, faces).points
    rotation = Rotation.from_rotvec([0.2, -0.4, 0.1]).as_matrix()
    translation = np.array([5.0, -30.0, 800.0])

    def to_scan(x):
        return 1000.0 * x @ rotation.T + translation

    return dict(vertices=vertices, faces=faces, scan=to_scan(scan_in_pred), scan_landmarks=to_scan(pred_landmarks),
                pred_landmarks=pred_landmarks, offsets_mm=offsets_mm, rotation=rotation, translation=translation)


def test_now_crop_is_the_reference_sphere():
    landmarks = np.array([[-40, 0, 0], [-10, 0, 0], [10, 0, 0], [40, 0, 0], [0, -50, 0], [-20, -70, 0],
                          [20, -70, 0]], float)
    # centre: nose bottom + 0.3 * (bridge - nose bottom) = (0, -35, 0); radius 1.4 * (80 + 50) / 2 = 91.
    points = np.array([[0, -35, 90.9], [0, -35, 91.1], [91.0, -35, 0], [0, 56.5, 0]])
    np.testing.assert_array_equal(now_face_crop(points, landmarks), [True, False, True, False])


def test_now_error_on_a_synthetic_scan_with_known_offsets():
    case = sphere_scan_case(np.random.default_rng(5))
    inside = now_face_crop(case["scan"], case["scan_landmarks"])
    assert 500 < inside.sum() < len(inside)  # the crop keeps the front cap only
    result = now_scan_to_mesh_errors(case["scan"], case["scan_landmarks"], case["vertices"], case["faces"],
                                     case["pred_landmarks"], NowOptions(refine=False))
    np.testing.assert_allclose(result.distances_mm, case["offsets_mm"][inside], atol=1e-9)
    np.testing.assert_allclose(result.transform.rotation, case["rotation"], atol=1e-12)
    assert result.transform.scale == pytest.approx(1000.0)
    # The refinement minimises the same squared distances, so it can only lower them.
    refined = now_scan_to_mesh_errors(case["scan"], case["scan_landmarks"], case["vertices"], case["faces"],
                                      case["pred_landmarks"])
    assert np.mean(refined.distances_mm ** 2) <= np.mean(result.distances_mm ** 2)


def now_landmarks_on_template(vertices, faces):
    """NoW's 7 points on FLAME from the 68-point embedding: eye corners 36 39 42 45, nose 33, mouth 48 54."""
    with open(FLAME_ASSETS / "flame_static_embedding_68.pkl", "rb") as handle:
        embedding = pickle.load(handle, encoding="latin1")
    ids = [36, 39, 42, 45, 33, 48, 54]
    corners = vertices[faces[embedding["lmk_face_idx"][ids].astype(np.int64)]]
    return np.einsum("nc,ncd->nd", embedding["lmk_b_coords"][ids], corners)


def test_now_refinement_recovers_the_transform_from_noisy_landmarks():
    rng = np.random.default_rng(6)
    vertices, faces = mesh_io.load_ply(FLAME_TEMPLATE)
    front = np.flatnonzero(vertices[faces].mean(axis=1)[:, 2] > 0.0)  # face side of the template
    scan_in_pred, _ = surface_samples(vertices, faces[front], 2000, rng)
    landmarks = now_landmarks_on_template(vertices, faces)
    rotation, translation = Rotation.from_rotvec([0.1, 0.3, -0.05]).as_matrix(), np.array([1.0, 2.0, 3.0])
    scan = 1000.0 * scan_in_pred @ rotation.T + translation
    scan_landmarks = 1000.0 * landmarks @ rotation.T + translation
    noisy = landmarks + rng.normal(scale=0.002, size=(7, 3))  # 2 mm landmark noise

    coarse = now_scan_to_mesh_errors(scan, scan_landmarks, vertices, faces, noisy, NowOptions(refine=False))
    refined = now_scan_to_mesh_errors(scan, scan_landmarks, vertices, faces, noisy)
    assert np.median(coarse.distances_mm) > 0.2
    assert refined.distances_mm.max() < 1e-6
    np.testing.assert_allclose(refined.transform.rotation, rotation, atol=1e-9)
    np.testing.assert_allclose(refined.transform.translation, translation, atol=1e-6)
    assert refined.transform.scale == pytest.approx(1000.0, rel=1e-9)


def test_now_metrical_protocol_does_not_fit_scale():
    case = sphere_scan_case(np.random.default_rng(8), count=1500)
    inside = now_face_crop(case["scan"], case["scan_landmarks"])
    args = (case["scan"], case["scan_landmarks"])
    landmarks_only = NowOptions(metrical=True, refine=False)
    exact = now_scan_to_mesh_errors(*args, case["vertices"], case["faces"], case["pred_landmarks"], landmarks_only)
    np.testing.assert_allclose(exact.distances_mm, case["offsets_mm"][inside], atol=1e-9)
    # A prediction 50% too large stays too large (median ~10 mm); the non-metrical protocol scales it back.
    big_vertices, big_landmarks = 1.5 * case["vertices"], 1.5 * case["pred_landmarks"]
    too_big = now_scan_to_mesh_errors(*args, big_vertices, case["faces"], big_landmarks, landmarks_only)
    assert too_big.transform.scale == 1000.0 and np.median(too_big.distances_mm) > 5.0
    rescaled = now_scan_to_mesh_errors(*args, big_vertices, case["faces"], big_landmarks, NowOptions(refine=False))
    np.testing.assert_allclose(rescaled.distances_mm, case["offsets_mm"][inside], atol=1e-9)
    refined = now_scan_to_mesh_errors(*args, big_vertices, case["faces"], big_landmarks, NowOptions(metrical=True))
    assert refined.transform.scale == 1000.0


def test_error_summary_and_cumulative_curve():
    summary = summarise_errors([np.array([1.0, 2.0]), np.array([3.0, 10.0])])
    assert (summary.median, summary.mean, summary.count) == (2.5, 4.0, 4)
    assert summary.std == pytest.approx(np.std([1.0, 2.0, 3.0, 10.0]))
    thresholds, percent = cumulative_error_curve(np.array([1.0, 2.0, 3.0, 10.0]), max_error_mm=4.0, num_thresholds=5)
    np.testing.assert_array_equal(thresholds, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(percent, [0, 25, 50, 75, 75])


def write_fake_now(root, case):
    """A NoW-layout folder with one subject, two images, and the synthetic scan."""
    release = root / "final_release_version"
    root.mkdir()
    images = ["FaMoS_1/multiview_neutral/IMG_0001.jpg", "FaMoS_1/selfie/IMG_0002.jpg"]
    (root / "imagepathsvalidation.txt").write_text("\n".join(images) + "\n")
    for image in images:
        (release / "iphone_pictures" / image).parent.mkdir(parents=True, exist_ok=True)
        (release / "iphone_pictures" / image).write_bytes(b"")
    scan_faces = np.zeros((0, 3), np.int64)  # only the scan's vertices are measured
    mesh_io.save_obj(release / "scans" / "FaMoS_1" / "scan.obj", case["scan"], scan_faces)
    points = "".join(f' <point x="{x:.17g}" y="{y:.17g}" z="{z:.17g}" active="1" name="{i}"/>\n'
                     for i, (x, y, z) in enumerate(case["scan_landmarks"]))
    (release / "scans_lmks_onlypp" / "FaMoS_1").mkdir(parents=True)
    (release / "scans_lmks_onlypp" / "FaMoS_1" / "scan.pp").write_text(
        f"<!DOCTYPE PickedPoints>\n<PickedPoints>\n{points}</PickedPoints>\n")


def test_now_loader_and_evaluation_end_to_end(tmp_path, capsys):
    case = sphere_scan_case(np.random.default_rng(9), count=1500)
    write_fake_now(tmp_path / "now", case)
    dataset = NowDataset(tmp_path / "now", split="val")
    samples = list(dataset)
    assert len(dataset) == 2 and samples[0].sample_id == "FaMoS_1/multiview_neutral/IMG_0001"
    assert samples[0].image_paths[0].parts[-4:] == ("iphone_pictures", "FaMoS_1", "multiview_neutral", "IMG_0001.jpg")
    np.testing.assert_allclose(samples[0].scan_landmarks, case["scan_landmarks"])
    assert len(NowDataset(tmp_path / "now", challenge="selfie")) == 1

    predictions = tmp_path / "pred"
    save_now_prediction(predictions, samples[1].sample_id, case["vertices"], case["faces"], case["pred_landmarks"])
    assert load_now_prediction(predictions, samples[0].sample_id) is None
    report = evaluate_now(dataset, predictions, NowOptions(refine=False))
    inside = now_face_crop(case["scan"], case["scan_landmarks"])
    assert report.missing == [samples[0].sample_id]
    # The OBJ round trip keeps 8 significant digits: about 1e-5 mm at 0.8 m.
    assert report.summary.median == pytest.approx(np.median(case["offsets_mm"][inside]), abs=1e-4)

    assert now_cli([str(tmp_path / "now"), str(predictions), "--challenge", "selfie", "--no-refine"]) == 0
    assert "missing 0" in capsys.readouterr().out
    assert now_cli([str(tmp_path / "nowhere"), str(predictions)]) == MissingAssetError.exit_code


# ---------------------------------------------------------------------------------------------- multi-view


def two_cameras():
    intrinsics = np.array([[100.0, 0.0, 32.0], [0.0, 100.0, 24.0], [0.0, 0.0, 1.0]])
    front = PinholeCamera(intrinsics, np.eye(3), np.zeros(3), 48, 64)
    # Second camera: turned 90 degrees about y, looking at the origin from +x at distance 1.
    rotation = Rotation.from_rotvec([0.0, math.pi / 2, 0.0]).as_matrix()
    side = PinholeCamera(intrinsics, rotation, -rotation @ np.array([1.0, 0.0, 1.0]), 48, 64)
    return front, side


def test_projection_and_multiview_reprojection_errors():
    front, side = two_cameras()
    points = np.array([[0.0, 0.0, 1.0], [0.1, -0.05, 1.0], [0.0, 0.1, 1.1]])
    pixels, depth = project_points(points, front)
    np.testing.assert_allclose(pixels[:2], [[32.0, 24.0], [42.0, 19.0]])
    np.testing.assert_allclose(depth, [1.0, 1.0, 1.1])
    side_pixels, side_depth = project_points(points, side)
    np.testing.assert_allclose(side_pixels[0], [32.0, 24.0])  # the origin of the side view's target
    np.testing.assert_allclose(side_depth[0], 1.0)

    targets = [pixels + [3.0, 4.0], side_pixels.copy()]
    targets[1][2] += 100.0  # one bad annotation, hidden by visibility
    visible = [np.ones(3, bool), np.array([True, True, False])]
    np.testing.assert_allclose(multiview_reprojection_errors(points, [front, side], targets, visible), [5.0, 0.0],
                               atol=1e-12)
    with pytest.raises(TrackerError):
        multiview_reprojection_errors(points, [front, side], targets[:1])


def test_silhouette_iou_of_a_projected_square():
    front, side = two_cameras()
    # A square at depth 1 covering pixels x 22..42, y 19..34 in the front camera.
    vertices = np.array([[-0.1, -0.05, 1.0], [0.1, -0.05, 1.0], [0.1, 0.1, 1.0], [-0.1, 0.1, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    exact = np.zeros((48, 64), bool)
    exact[19:35, 22:43] = True
    shifted = np.roll(exact, 5, axis=1)  # 5 px to the right: overlap 16 x 16 of union 16 x 26
    ious = multiview_silhouette_ious(vertices, faces, [front, front], [exact, shifted])
    assert ious[0] > 0.95
    assert ious[1] == pytest.approx(16 / 26, abs=0.05)
    # Seen edge-on from the side camera the square covers (almost) nothing.
    assert multiview_silhouette_ious(vertices, faces, [side], [exact])[0] < 0.1
