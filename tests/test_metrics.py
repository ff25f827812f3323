"""eval.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from eval import metrics
from tracker.errors import TrackerError


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def grid_mesh(rows: int, cols: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat grid in z = 0, each cell split by its (0,0)-(1,1) diagonal; vertex id = r * cols + c."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    vertices = np.stack([c.ravel() * spacing, r.ravel() * spacing, np.zeros(rows * cols)], axis=1)
    faces = []
    for i in range(rows - 1):
        for j in range(cols - 1):
            a, b, d, e = i * cols + j, i * cols + j + 1, (i + 1) * cols + j, (i + 1) * cols + j + 1
            faces += [(a, b, e), (a, e, d)]
    return vertices, np.array(faces)


# ---------------------------------------------------------------------------------------------- alignment


def test_umeyama_recovers_known_rigid_and_similarity_transforms(rng):
    source = rng.normal(size=(50, 3))
    rotation = Rotation.from_rotvec([0.4, -1.1, 0.7]).as_matrix()
    translation = np.array([0.3, -2.0, 5.0])
    rigid = metrics.umeyama_alignment(source, source @ rotation.T + translation)
    np.testing.assert_allclose(rigid.rotation, rotation, atol=1e-12)
    np.testing.assert_allclose(rigid.translation, translation, atol=1e-12)
    assert rigid.scale == 1.0

    similarity = metrics.umeyama_alignment(source, 2.5 * source @ rotation.T + translation, with_scale=True)
    assert similarity.scale == pytest.approx(2.5, abs=1e-12)
    np.testing.assert_allclose(similarity.apply(source), 2.5 * source @ rotation.T + translation, atol=1e-10)


def test_umeyama_weights_ignore_outliers_and_never_reflect(rng):
    source = rng.normal(size=(30, 3))
    rotation = Rotation.from_rotvec([0.0, 0.5, 0.2]).as_matrix()
    target = source @ rotation.T + 1.0
    target[:5] += rng.normal(scale=10.0, size=(5, 3))
    weights = np.r_[np.zeros(5), np.ones(25)]
    fit = metrics.umeyama_alignment(source, target, weights=weights)
    np.testing.assert_allclose(fit.rotation, rotation, atol=1e-12)
    # A mirrored target: the best proper rotation is returned, not the reflection.
    mirrored = metrics.umeyama_alignment(source, source * [1.0, 1.0, -1.0])
    assert np.linalg.det(mirrored.rotation) == pytest.approx(1.0)


def test_vertex_error_with_and_without_alignment(rng):
    gt = rng.normal(scale=0.1, size=(2, 40, 3))
    rotation = Rotation.from_rotvec([0.0, 0.2, 0.0]).as_matrix()
    pred = gt @ rotation.T + np.array([0.002, 0.0, 0.0])  # rotated and moved 2 mm
    unaligned = metrics.vertex_error_mm(pred, gt)
    assert unaligned.shape == (2,) and np.all(unaligned > 2.0)
    np.testing.assert_allclose(metrics.vertex_error_mm(pred, gt, alignment="rigid"), 0.0, atol=1e-9)
    shifted = gt + np.array([0.0, 0.0, 0.002])
    np.testing.assert_allclose(metrics.vertex_error_mm(shifted, gt), 2.0, rtol=1e-12)
    # Only the region counts: corrupting other vertices changes nothing.
    shifted[:, 20:] += 1.0
    np.testing.assert_allclose(metrics.vertex_error_mm(shifted, gt, vertex_indices=np.arange(20)), 2.0, rtol=1e-12)
    # Torch tensors give the same numbers.
    np.testing.assert_allclose(metrics.vertex_error_mm(torch.from_numpy(pred), torch.from_numpy(gt)), unaligned)
    with pytest.raises(TrackerError):
        metrics.vertex_error_mm(pred, gt, alignment="affine")


def test_temporal_jitter_of_constant_acceleration_is_the_acceleration(rng):
    t = np.arange(12, dtype=np.float64)[:, None, None]
    start, velocity = rng.normal(size=(1, 30, 3)), rng.normal(size=(1, 1, 3)) * 0.01
    acceleration = np.array([0.0, 0.0006, 0.0008])  # 1 mm per frame^2
    vertices = start + velocity * t + 0.5 * acceleration * t ** 2
    assert metrics.temporal_jitter_mm(vertices) == pytest.approx(1.0, rel=1e-9)
    assert metrics.temporal_jitter_mm(start + velocity * t) == pytest.approx(0.0, abs=1e-9)
    # A jump between two static segments is not counted when the segments exclude it.
    jumpy = vertices.copy()
    jumpy[6:] += 0.05
    assert metrics.temporal_jitter_mm(jumpy, segments=[(0, 6), (6, 12)]) == pytest.approx(1.0, rel=1e-9)
    assert metrics.temporal_jitter_mm(jumpy) > 5.0


# ---------------------------------------------------------------------------------------------- 2D and parameters


def test_reprojection_error_of_known_displacement():
    gt = np.zeros((3, 10, 2))
    pred = gt + np.array([3.0, 4.0])
    np.testing.assert_allclose(metrics.reprojection_error_px(pred, gt), [5.0, 5.0, 5.0])
    pred[:, 0] = 1000.0
    visible = np.ones((3, 10), bool)
    visible[:, 0] = False
    np.testing.assert_allclose(metrics.reprojection_error_px(pred, gt, visible), [5.0, 5.0, 5.0])


def test_landmark_nme_uses_outer_eye_corners(rng):
    gt = rng.uniform(0, 200, size=(68, 2))
    gt[36], gt[45] = [50.0, 80.0], [150.0, 80.0]  # inter-ocular distance 100 px
    pred = gt + np.array([3.0, 4.0])  # 5 px everywhere
    assert metrics.landmark_nme(pred, gt)[0] == pytest.approx(0.05)
    assert metrics.landmark_nme(pred, gt, normaliser=50.0)[0] == pytest.approx(0.1)
    batch = metrics.landmark_nme(np.stack([pred, gt]), np.stack([gt, gt]))
    np.testing.assert_allclose(batch, [0.05, 0.0])


def test_rotation_angle_is_the_geodesic_distance():
    assert metrics.rotation_angle_deg([0, 0, 0.3], [0, 0, 0.5])[()] == pytest.approx(math.degrees(0.2))
    # 90 degrees about z then about x compose to a 120 degree rotation.
    assert metrics.rotation_angle_deg([0, 0, math.pi / 2], [math.pi / 2, 0, 0])[()] == pytest.approx(120.0)
    assert metrics.rotation_angle_deg([0.0, 1e-7, 0.0], [0.0, 0.0, 0.0])[()] == pytest.approx(
        math.degrees(1e-7), rel=1e-6)
    batch = metrics.rotation_angle_deg(torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]), torch.zeros(2, 3))
    np.testing.assert_allclose(batch, [math.degrees(3.0), math.degrees(1.0)], rtol=1e-9)


def test_coefficient_error_is_l2_per_frame():
    np.testing.assert_allclose(metrics.coefficient_error([[3.0, 4.0, 0.0]], [[0.0, 0.0, 0.0]]), [5.0])


# ---------------------------------------------------------------------------------------------- photometric


def test_psnr_of_known_mse_inside_mask():
    gt = np.zeros((20, 30, 3))
    pred = gt + 0.1  # MSE 0.01 -> 20 dB
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:25] = True
    pred[~mask] = 1.0  # outside the mask: ignored
    assert metrics.psnr(pred, gt, mask) == pytest.approx(20.0)
    assert metrics.psnr(gt, gt) == math.inf
    with pytest.raises(TrackerError):
        metrics.psnr(pred, gt, np.zeros((20, 30)))


def test_ssim_identical_is_one_and_decreases_with_noise(rng):
    image = rng.uniform(size=(48, 64, 3))
    assert metrics.ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    scores = [metrics.ssim(np.clip(image + rng.normal(scale=s, size=image.shape), 0, 1), image)
              for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_of_constant_images_matches_closed_form():
    a, b = 0.3, 0.6  # no variance: SSIM reduces to the luminance term
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    assert metrics.ssim(np.full((32, 32), a), np.full((32, 32), b), mask) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------- dense correspondence


def test_edge_geodesics_on_a_grid_are_exact_along_rows_and_diagonals():
    vertices, faces = grid_mesh(5, 6, spacing=0.01)
    dist = metrics.geodesic_distances(vertices, faces, sources=[0], targets=[5, 7, 14])
    # (0,0)->(0,5): five edges; (0,0)->(1,1): one diagonal; (0,0)->(2,2): two diagonals.
    np.testing.assert_allclose(dist, [[0.05, 0.01 * math.sqrt(2), 0.02 * math.sqrt(2)]], rtol=1e-12)
    full = metrics.geodesic_distances(vertices, faces, sources=np.arange(30))
    pred, gt = np.array([0, 3, 29, 7]), np.array([5, 3, 0, 20])
    np.testing.assert_allclose(metrics.paired_geodesic_distances(vertices, faces, pred, gt, sources_per_batch=2),
                               full[gt, pred])


def test_geodesics_to_another_component_are_infinite():
    v1, f1 = grid_mesh(2, 2, 1.0)
    vertices, faces = np.concatenate([v1, v1 + 10.0]), np.concatenate([f1, f1 + 4])
    assert np.isinf(metrics.geodesic_distances(vertices, faces, [0], [5])[0, 0])
    errors = metrics.paired_geodesic_distances(vertices, faces, [5], [0])
    assert metrics.geodesic_point_similarity(errors, kappa=1.0) == 0.0


def test_gps_and_correct_point_ratio_for_known_geodesic_errors():
    kappa = 0.02
    errors = np.array([0.0, kappa, 2 * kappa, 3 * kappa])
    expected = (1.0 + math.exp(-0.5) + math.exp(-2.0) + math.exp(-4.5)) / 4
    assert metrics.geodesic_point_similarity(errors, kappa) == pytest.approx(expected)
    np.testing.assert_allclose(metrics.correct_point_ratio(errors, [0.01, 0.02, 0.05, 0.1]), [0.25, 0.5, 0.75, 1.0])


def test_nearest_vertex_maps_canonical_coordinates_to_vertices():
    vertex_coords = np.array([[0.1, 0.1, 0.1], [0.9, 0.1, 0.5], [0.5, 0.9, 0.9]])
    queries = np.array([[0.85, 0.15, 0.5], [0.0, 0.0, 0.0], [0.5, 0.8, 1.0]])
    np.testing.assert_array_equal(metrics.nearest_vertex(queries, vertex_coords), [1, 0, 2])


# ---------------------------------------------------------------------------------------------- summaries


def test_bin_by_abs_yaw_counts_means_and_percentiles():
    values = np.arange(1.0, 21.0)  # 20 frames
    yaw = np.r_[np.full(10, -10.0), np.full(5, 35.0), np.full(4, -60.0), 90.0]
    bins = metrics.bin_by_abs_yaw(values, yaw)
    assert [(b.lower, b.upper, b.count) for b in bins] == [(0, 30, 10), (30, 45, 5), (45, 90, 5)]
    assert bins[0].mean == pytest.approx(5.5) and bins[0].p95 == pytest.approx(1 + 0.95 * 9)
    assert bins[2].mean == pytest.approx(18.0)  # 16..19 and the frame at exactly 90 degrees
    empty = metrics.bin_by_abs_yaw([1.0], [5.0], edges=(0, 30, 45))[1]
    assert empty.count == 0 and math.isnan(empty.mean)


def test_timing_stats():
    stats = metrics.timing_stats([0.1, 0.2, 0.3, 0.4])
    assert (stats.frames, stats.mean_s, stats.median_s, stats.fps) == (4, pytest.approx(0.25),
                                                                        pytest.approx(0.25), pytest.approx(4.0))
    assert stats.p95_s == pytest.approx(0.385)  # linear interpolation at rank 0.95 * 3


def test_track_peak_memory_sees_a_numpy_allocation():
    with metrics.track_peak_memory("cpu") as peak:
        block = np.ones(20 * 1024 * 1024 // 8)  # 20 MiB
        del block
    assert 19.0 < peak.python_heap_mb < 40.0
    assert peak.cuda_mb is None and peak.seconds >= 0.0
    assert peak.process_rss_mb >= 20.0
