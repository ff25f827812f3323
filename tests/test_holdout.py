"""The hold-out benchmark: its rasteriser on cases whose pixels can be counted by hand, its renders as the real
detectors see them, the baseline rows on a known identity (eval.baselines), and the jaw-outline metric of real
clips (eval.real.jaw) validated on a render: the true mesh scores at dlib's floor, a widened jaw worse."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.baselines import SequenceScorer, exact_landmark_track, mean_face
from eval.holdout.__main__ import main as holdout_main
from eval.holdout.generate import build_ground_truth, generate_holdout, load_holdout_assets
from eval.holdout.raster import Light, rasterize, shade
from eval.holdout.scenes import holdout_suite
from eval.identity_probe import STEPS, identity_error_mm, probe_track
from eval.identity_probe import main as identity_probe_main
from eval.metrics import vertex_error_mm
from eval.real.jaw import ContourMesh, jaw_scores, point_to_segments
from eval.synthetic.generate import load_ground_truth
from eval.tracked import TrackedSequence, load_tracked, resized_params
from tests.conftest import FLAME_ASSETS, FLAME_STANDIN, MEDIAPIPE_TASK
from tracker.config import load_config
from tracker.detect.base import make_detector
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import load_landmark_set
from tracker.io.video import read_frames

QUICK = {s.name: s for s in holdout_suite(quick=True)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return load_holdout_assets(tmp_path_factory.mktemp("holdout_cache"), str(FLAME_STANDIN), str(FLAME_ASSETS))


def test_a_triangle_covers_the_pixel_centres_inside_it():
    # Right triangle with legs of 8.5 px: centres (j + 0.5, i + 0.5) lie inside when i + j <= 7 (none on an edge).
    fragments = rasterize(np.array([[0.0, 0.0, 2.0], [8.5, 0.0, 2.0], [0.0, 8.5, 2.0]]), np.array([[0, 1, 2]]), 12, 12)
    rows, cols = np.mgrid[0:12, 0:12]
    np.testing.assert_array_equal(fragments.mask, rows + cols <= 7)
    assert fragments.mask.sum() == 36
    np.testing.assert_array_equal(fragments.depth[fragments.mask], 2.0)
    assert np.isinf(fragments.depth[~fragments.mask]).all()
    # Pixel (row 0, col 2): centre (2.5, 0.5) = 5/17 of the way to corner 1 and 1/17 to corner 2.
    np.testing.assert_allclose(fragments.bary[0, 2], [11 / 17, 5 / 17, 1 / 17])


def test_a_cube_shows_its_front_face_at_its_depth():
    """A cube 0.2 m wide, 0.9-1.1 m in front of a camera with f = 100 px: only the front face is seen, over the
    pixel centres its projection contains, at depth 0.9 exactly; the sides and back lie behind it."""
    corners = np.array([[x, y, z] for x in (-0.1, 0.1) for y in (-0.1, 0.1) for z in (0.9, 1.1)])
    quads = [(0, 2, 6, 4), (1, 3, 7, 5), (0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6)]  # z=0.9 first
    faces = np.array([tri for a, b, c, d in quads for tri in ((a, b, c), (a, c, d))])
    focal, centre = 100.0, 32.0
    screen = np.c_[corners[:, :2] / corners[:, 2:] * focal + centre, corners[:, 2]]
    fragments = rasterize(screen, faces, 64, 64)
    # The front face spans 32 +- 100 * 0.1 / 0.9 = [20.89, 43.11]: centres 21.5 .. 42.5, 22 columns and rows.
    inside = (np.arange(64) >= 21) & (np.arange(64) <= 42)
    np.testing.assert_array_equal(fragments.mask, inside[:, None] & inside[None, :])
    np.testing.assert_allclose(fragments.depth[fragments.mask], 0.9, rtol=1e-12)
    assert set(np.unique(fragments.triangle_id[fragments.mask])) == {0, 1}


def test_depth_is_perspective_correct_on_a_slanted_plane():
    # A triangle on the plane z = 1 + 0.5 x: along the ray (u, v, 1) its depth is 1 / (1 - 0.5 u).
    normalised = np.array([[-0.2, -0.2], [0.3, -0.1], [0.0, 0.3]])
    depth = 1.0 / (1.0 - 0.5 * normalised[:, 0])
    fragments = rasterize(np.c_[normalised * 100 + 50, depth], np.array([[0, 1, 2]]), 100, 100)
    rows, cols = np.nonzero(fragments.mask)
    u = (cols + 0.5 - 50) / 100
    assert len(rows) > 500
    np.testing.assert_allclose(fragments.depth[rows, cols], 1.0 / (1.0 - 0.5 * u), rtol=1e-12)


def test_shading_is_textured_lambert_plus_ambient():
    """A square facing the camera, lit from the camera: albedo x (ambient + diffuse); its UVs put the texture's
    left (red) half on the left and its right (blue) half on the right; seen from behind it is the cavity."""
    corners = np.array([[-0.1, -0.1, 1.0], [0.1, -0.1, 1.0], [0.1, 0.1, 1.0], [-0.1, 0.1, 1.0]])
    faces = np.array([[0, 2, 1], [0, 3, 2]])  # normals towards the camera (-z)
    uv = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    texture = np.zeros((8, 8, 3))
    texture[:, :4, 0], texture[:, 4:, 2] = 0.8, 0.6
    screen = np.c_[corners[:, :2] / corners[:, 2:] * 100 + 16, corners[:, 2]]
    fragments = rasterize(screen, faces, 32, 32)
    light = Light(np.array([0.0, 0.0, -1.0]), ambient=0.25, diffuse=0.5)
    image = shade(fragments, corners, faces, uv[faces], texture, light)
    np.testing.assert_allclose(image[16, 8], [0.8 * 0.75, 0, 0], atol=1e-6)
    np.testing.assert_allclose(image[16, 23], [0, 0, 0.6 * 0.75], atol=1e-6)
    assert (image[~fragments.mask] == 0).all()
    behind = shade(fragments, corners, faces[:, ::-1], uv[faces[:, ::-1]], texture, light)
    assert np.allclose(behind[16, 16], [0.10, 0.04, 0.04])


def test_mean_face_baseline_on_a_known_identity(assets):
    """The truth scores 0; the mean face with the true pose and expression scores what the identity alone
    displaces: on the still frames (no expression, jaw or gaze) the rest-pose error of shape = 0 against the
    known identity, computed here from the blendshape basis."""
    model, face = assets.model, assets.synthetic.bundle.masks["face"]
    gt, _ = build_ground_truth(QUICK["yaw_sweep"], assets)
    identity = torch.zeros(1, model.n_shape)
    identity[0, :3] = torch.tensor([2.0, -1.5, 1.0])
    gt.params.shape = identity
    scorer = SequenceScorer(gt, model, face)
    truth = scorer.score("truth", TrackedSequence(gt.params, gt.camera, np.arange(gt.n_frames),
                                                  np.ones(gt.n_frames, bool)))
    assert truth.v2v_rigid_mm < 1e-3 and truth.v2v_mm < 1e-3 and truth.reproj_px < 1e-3
    assert truth.focal_error_pct == 0 and truth.jitter_mm == pytest.approx(truth.truth_jitter_mm)
    rest_mean = model.v_template.double().numpy()
    rest_identity = rest_mean + model.dirs[..., :model.n_shape].double().numpy() @ identity[0].double().numpy()
    expected = vertex_error_mm(rest_mean[face], rest_identity[face], alignment="rigid")[0]
    assert expected > 1.0
    baseline = scorer.score("mean_face", mean_face(gt))
    still = QUICK["yaw_sweep"].still_frames
    np.testing.assert_allclose(baseline.per_frame["v2v_rigid_mm"][:still], expected, atol=1e-3)
    assert baseline.v2v_rigid_mm > 0.5 and baseline.v2v_mm > baseline.v2v_rigid_mm and baseline.reproj_px > 0.5


@pytest.fixture(scope="module")
def short_sequence(assets, tmp_path_factory):
    """Three frames of the talking head at 320 x 320 (the face about 150 px wide)."""
    spec = replace(QUICK["talking_head"], frames=3, image_size=320, focal_px=875.0)
    return generate_holdout(spec, assets, tmp_path_factory.mktemp("holdout"))


def test_holdout_frames_show_the_truth_to_the_detector(assets, short_sequence):
    """A short rendered sequence round-trips through the ground-truth reader, and MediaPipe finds the face where
    the truth projects it."""
    sequence = short_sequence
    gt = load_ground_truth(sequence.ground_truth)
    assert gt.n_frames == 3 and float(gt.camera.focal) == pytest.approx(875.0)
    truth = load_tracked(sequence.ground_truth, assets.model.n_shape, assets.model.n_expr)
    landmarks = load_landmark_set("mediapipe478", assets.synthetic.bundle.assets_dir, assets.model.faces.numpy())
    projected = truth.landmarks_2d(truth.vertices(assets.model), landmarks)
    detector = make_detector("mediapipe", model_path=str(MEDIAPIPE_TASK))
    try:
        for t, frame in enumerate(read_frames(sequence.video)):
            found = detector.detect(frame.rgb)
            assert found is not None, f"no face found in hold-out frame {t}"
            box = np.sqrt(np.prod(projected[t].max(0) - projected[t].min(0)))
            error = np.linalg.norm(found.points[landmarks.detector_index.numpy()] - projected[t], axis=1).mean()
            assert error / box < 0.05, f"frame {t}: detections {100 * error / box:.1f} % of the face size off"
    finally:
        detector.close()


def test_point_to_curve_distance():
    segments = np.array([[[-1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 2.0]]])
    points = np.array([[0.0, 1.0], [3.0, -1.0], [0.5, 0.25], [0.0, -2.0]])
    np.testing.assert_allclose(point_to_segments(points, segments), [1.0, np.sqrt(5.0), 0.25, 2.0])
    assert np.isinf(point_to_segments(points, np.zeros((0, 2, 2)))).all()


def test_jaw_metric_true_mesh_at_the_floor_and_a_widened_jaw_worse(assets, short_sequence):
    """dlib's jaw points on a render lie close to the true mesh's jaw outline (dlib's own error); widening the
    lower face by 15 % moves the outline away from them, while the inner points barely change."""
    model, bundle = assets.model, assets.synthetic.bundle
    truth = load_tracked(short_sequence.ground_truth, model.n_shape, model.n_expr)
    detector = make_detector("dlib")
    detected = []
    for frame in read_frames(short_sequence.video):
        found = detector.detect(frame.rgb)
        assert found is not None
        detected.append(found.points)
    vertices = truth.vertices(model)
    outline = ContourMesh.build(model, bundle.masks)
    exact = jaw_scores(truth, vertices, outline, bundle.landmarks, np.stack(detected))
    lower = torch.clamp(-model.v_template[:, 1] / 0.03, 0, 1)[None, :, None]  # 0 above the nose tip, 1 below
    centre = vertices[..., :1].mean(1, keepdim=True)
    widened = vertices.clone()
    widened[..., :1] = centre + (vertices[..., :1] - centre) * (1 + 0.15 * lower)
    wide = jaw_scores(truth, widened, outline, bundle.landmarks, np.stack(detected))
    assert np.isfinite(exact["jaw_iod"]).all() and np.isfinite(wide["jaw_iod"]).all()
    assert 0.005 < np.median(exact["jaw_iod"]) < 0.06
    assert np.median(wide["jaw_iod"]) > np.median(exact["jaw_iod"]) + 0.02
    assert np.median(exact["inner51_iod"]) < 0.07


def test_bad_override_is_one_line_error(capsys):
    assert holdout_main(["--set", "no_equals_sign"]) != 0
    assert holdout_main(["--set", "fit.no_such_key=1"]) != 0
    assert capsys.readouterr().err.count("\n") == 2


def test_identity_probe_reads_the_identity_the_points_carry(assets):
    """eval.identity_probe on exact landmarks of the quick fast-motion head (its own random identity): with
    everything else true the fitted identity lands far closer than the mean face, and stays closer as expression,
    pose and focal length are freed; landmarks drawn from the mean face (the same poses and expressions) carry no
    identity, and the probe gives back about the mean face's error."""
    cfg = load_config(None, {})
    bundle = load_flame_bundle(cfg.flame.path, cfg.flame.assets_dir, cfg.flame.n_shape, cfg.flame.n_expr,
                               "mediapipe478", cfg.flame.eyelids)
    gt, _ = build_ground_truth(QUICK["fast_motion"], assets)
    scorer = SequenceScorer(gt, assets.model, assets.synthetic.bundle.masks["face"])
    mean_mm = identity_error_mm(scorer, gt, torch.zeros(1, 1))
    truth = resized_params(gt.params, bundle.model.n_shape, bundle.model.n_expr)
    informed = probe_track(gt, exact_landmark_track(replace(gt, params=truth), bundle.model, bundle.landmarks),
                           scorer, cfg, keyframes=6)
    assert [r.step for r in informed] == [s.name for s in STEPS]
    assert mean_mm > 1.0
    assert informed[0].identity_mm < 0.6 * mean_mm and informed[0].focal_error_pct == 0
    assert all(r.identity_mm < 0.85 * mean_mm for r in informed) and abs(informed[-1].focal_error_pct) < 5
    mean_points = exact_landmark_track(replace(gt, params=replace(truth, shape=torch.zeros_like(truth.shape))),
                                       bundle.model, bundle.landmarks)
    blind = probe_track(gt, mean_points, scorer, cfg, keyframes=6)
    assert blind[0].identity_mm > 0.9 * mean_mm


def test_identity_probe_bad_options_are_one_line_errors(capsys):
    assert identity_probe_main(["--keyframes", "0"]) != 0
    assert identity_probe_main(["--detectors", "nope"]) != 0
    assert capsys.readouterr().err.count("\n") == 2


def test_holdout_table_names_the_tracker_embedding():
    """The table's header says which model and landmark embedding the tracker ran with (from the summaries), and
    says so when sequences ran with different ones."""
    from eval.holdout.benchmark import SequenceResult, tracker_assets

    record = {"name": "flame_standin", "file": "/x/flame_standin.npz", "shipped_default": True, "assets_dir": "/x",
              "landmark_embedding": {"mediapipe_landmark_embedding.npz": "ab" * 32}}
    spec = QUICK["fast_motion"]
    same = [SequenceResult(spec, [], {"tracker_flame_model": dict(record)}) for _ in range(2)]
    assert tracker_assets(same) == ("flame_standin (shipped default), side files /x: "
                                    "mediapipe_landmark_embedding.npz abababababab")
    other = {**record, "assets_dir": "/shared", "landmark_embedding": {"mediapipe_landmark_embedding.npz": "cd" * 32}}
    assert tracker_assets([*same, SequenceResult(spec, [], {"tracker_flame_model": other})]) == \
        "differs between sequences"
    assert tracker_assets([SequenceResult(spec, [], {"tracker_flame_model": {}}, "failed")]) == "unknown (no track)"
