"""The evaluation harness: synthetic generator (determinism, re-rendering, realism for the detector), scoring
against exact ground truth, ablation configs, and an end-to-end run of `eval.run` on a small subset."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.ablation import AblationConfig, load_ablation, merge, stage_ran
from eval.bench.stages import BenchOptions, run_bench
from eval.photometric import PhotometricOptions
from eval.run import EvalOptions, run_evaluation
from eval.synthetic.dense import DenseOptions
from eval.synthetic.evaluate import score_sequence
from eval.synthetic.generate import (
    build_ground_truth,
    generate_sequence,
    load_assets,
    load_ground_truth,
    render_frames,
)
from eval.synthetic.scenario import Segment, SequenceSpec, build_script
from eval.synthetic.uvmap import uv_atlas
from eval.tracked import TrackedSequence, load_tracked
from tests.conftest import FLAME_ASSETS, FLAME_STANDIN, MEDIAPIPE_TASK, VIDEOS
from tracker.detect.base import make_detector
from tracker.flame.assets import load_flame_bundle
from tracker.flame.landmarks import load_landmark_set
from tracker.io.video import read_frames
from tracker.render.texture import load_obj

# Small frames keep rendering cheap; 256 px still gives MediaPipe a face of about 120 px.
TINY = SequenceSpec("tiny", (Segment("static", 3), Segment("talk", 3)), photo=2, seed=5, image_size=256)


@pytest.fixture(scope="module", autouse=True)
def flame_environment():
    """The tracker finds FLAME and MediaPipe through the environment, as in CI."""
    saved = {k: os.environ.get(k) for k in ("FLAME_MODEL", "TRACKER_FLAME_ASSETS", "TRACKER_MEDIAPIPE_MODEL")}
    os.environ.update(FLAME_MODEL=str(FLAME_STANDIN), TRACKER_FLAME_ASSETS=str(FLAME_ASSETS),
                      TRACKER_MEDIAPIPE_MODEL=str(MEDIAPIPE_TASK))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="module")
def assets(cache_dir):
    return load_assets(cache_dir, str(FLAME_STANDIN), str(FLAME_ASSETS))


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory):
    return generate_sequence(TINY, assets, tmp_path_factory.mktemp("tiny"))


def decoded(video) -> np.ndarray:
    return np.stack([frame.rgb for frame in read_frames(video)])


def test_script_is_deterministic_by_seed():
    spec = SequenceSpec("s", (Segment("turn", 20), Segment("fast", 10), Segment("lighting", 8)), seed=3)
    names = ["mouthSmile_L", "mouthFunnel"]
    first, again = build_script(spec, names, 10), build_script(spec, names, 10)
    other = build_script(replace(spec, seed=4), names, 10)
    assert all(np.array_equal(getattr(first, f), getattr(again, f)) for f in ("pose", "expr", "light", "eyelids"))
    assert not np.allclose(first.pose, other.pose)
    # The turn reaches the configured profile view and comes back.
    assert first.pose[:20, 0].max() == pytest.approx(90.0, abs=1.0)
    assert first.pose[:20, 0].min() == pytest.approx(-90.0, abs=1.0)


def test_static_segments_do_not_move(assets):
    gt = build_ground_truth(replace(TINY, segments=(Segment("static", 5), Segment("talk", 4))), assets)
    assert gt.static_segments() == [(0, 5)]
    static = gt.params.frames(slice(0, 5))
    for name in ("expr", "rotation", "translation", "jaw_pose", "eyes_pose", "eyelids"):
        values = getattr(static, name)
        assert torch.equal(values, values[:1].expand_as(values)), name
    assert gt.params.jaw_pose[5:, 0].abs().max() > 0.01  # the talking part moves the jaw


def test_generator_is_deterministic_and_its_ground_truth_rerenders(assets, tiny, tmp_path):
    frames = decoded(tiny.video)
    assert frames.shape == (TINY.n_frames, 256, 256, 3)
    again = generate_sequence(TINY, assets, tmp_path / "again")
    assert np.array_equal(decoded(again.video), frames)
    rerendered = np.stack(list(render_frames(load_ground_truth(tiny.ground_truth), assets)))
    assert np.array_equal(rerendered, frames)  # lossless video, same seeds: bit-exact
    other = np.stack(list(render_frames(build_ground_truth(replace(TINY, seed=6), assets), assets)))
    assert np.abs(other.astype(int) - frames).mean() > 2.0
    # Sensor noise differs frame to frame even where nothing moves.
    assert not np.array_equal(frames[0], frames[1])
    assert np.abs(frames[0].astype(int) - frames[1]).mean() < 6.0


def test_mediapipe_finds_the_rendered_face_at_the_ground_truth_landmarks(assets, tiny):
    """The frames are realistic enough for the real detector, and the truth is where the face is drawn."""
    gt = load_tracked(tiny.ground_truth, assets.bundle.model.n_shape, assets.bundle.model.n_expr)
    landmarks = load_landmark_set("mediapipe478", assets.bundle.assets_dir, assets.bundle.model.faces.numpy())
    projected = gt.landmarks_2d(gt.vertices(assets.bundle.model), landmarks)
    detector = make_detector("mediapipe", model_path=str(MEDIAPIPE_TASK))
    try:
        for t, frame in enumerate(decoded(tiny.video)):
            found = detector.detect(frame)
            assert found is not None, f"no face found in synthetic frame {t}"
            points = found.points[landmarks.detector_index.numpy()]
            box = np.sqrt(np.prod(projected[t].max(0) - projected[t].min(0)))
            nme = np.linalg.norm(points - projected[t], axis=1).mean() / box
            assert nme < 0.05, f"frame {t}: detections {100 * nme:.1f} % of the face size away from the truth"
    finally:
        detector.close()


def test_scoring_the_truth_against_itself_and_a_shifted_copy(assets, tiny):
    model = assets.bundle.model
    gt = load_ground_truth(tiny.ground_truth)
    atlas = uv_atlas(load_obj(assets.bundle.assets_dir / "head_template.obj"), 128)
    truth = load_tracked(tiny.ground_truth, model.n_shape, model.n_expr)
    face = assets.bundle.masks["face"]
    options = PhotometricOptions(texture_frames=6, eval_frames=6)

    def score(tracked):
        return score_sequence(gt, tracked, model, face, assets.bundle.landmarks, atlas, str(tiny.video), options)

    exact = score(truth)
    for metric in ("v2v_mm", "v2v_rigid_mm", "reproj_px", "nme68", "expr_l2", "rot_deg", "jaw_deg", "gaze_deg"):
        assert np.nanmax(exact.per_frame[metric]) < 1e-3, metric
    assert exact.jitter_mm == pytest.approx(0.0, abs=1e-6)
    assert exact.focal_error_pct == pytest.approx(0.0, abs=1e-4)
    # A track that jumps 4 mm left and right every frame.
    jumpy = truth.params.map(lambda t: t.clone())
    sign = torch.tensor([(-1.0) ** t for t in range(gt.n_frames)])
    jumpy.translation = jumpy.translation + 0.004 * sign[:, None] * torch.tensor([1.0, 0.0, 0.0])
    shaky = score(TrackedSequence(jumpy, truth.camera, truth.frame_index, truth.valid))
    np.testing.assert_allclose(shaky.per_frame["v2v_mm"], 4.0, rtol=1e-4)
    assert np.nanmax(shaky.per_frame["v2v_rigid_mm"]) < 1e-3  # a rigid shift is aligned away
    assert np.nanmin(shaky.per_frame["reproj_px"]) > 2.0  # 4 mm at 0.8 m with f = 478 px: about 2.4 px
    # Acceleration of a +-4 mm zigzag: |4 + 8 + 4| = 16 mm per frame^2 on the static frames.
    assert shaky.jitter_mm == pytest.approx(16.0, rel=1e-3)
    # Frames that disagree blur the unwrapped texture: re-rendering matches the video less well.
    assert np.nanmean(exact.per_frame["psnr_db"]) > 25.0
    assert np.nanmean(exact.per_frame["psnr_db"]) > np.nanmean(shaky.per_frame["psnr_db"]) + 0.5


def test_ablation_file_and_merge():
    ablation = load_ablation()
    names = [c.name for c in ablation.configs]
    assert {"landmarks", "landmarks_dlib", "photometric", "dense_oracle"} <= set(names)
    assert [c.name for c in ablation.select(None, quick=True)] == ["landmarks", "landmarks_dlib"]
    assert [c.name for c in ablation.select(["landmarks_dlib"], quick=True)] == ["landmarks_dlib"]
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_stage_ran_reads_the_run_summary():
    summary = {"seconds": {"fitting": 1.0, "densemarks": 0.01},
               "stages": {"densemarks": {"ran": False, "reason": "weights not found"}, "photometric": {"ran": True}}}
    assert stage_ran(summary, "densemarks") == (False, "weights not found")  # timed, but it did not run
    assert stage_ran(summary, "photometric")[0]
    ran, reason = stage_ran(summary, "global")
    assert not ran and "no 'global' stage" in reason


def test_bench_skips_oracle_configs_without_a_synthetic_sequence(tmp_path):
    oracle = AblationConfig("oracle", {"densemarks": {"oracle": True, "oracle_ground_truth": "{ground_truth}"}},
                            synthetic_only=True)
    data = run_bench([oracle], {}, VIDEOS / "wojtek.mp4", BenchOptions(frames=2, runs=1), tmp_path)
    assert data["configs"] == {} and "synthetic sequence" in data["skipped"]["oracle"]
    assert "oracle skipped" in (tmp_path / "bench.md").read_text()


def test_valid_runs():
    from tracker.fit.sequence import valid_runs

    valid = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], bool)
    assert valid_runs(valid, min_length=3) == [(0, 3), (4, 8)]
    assert valid_runs(valid) == [(0, 3), (4, 8), (9, 10)]


def test_quick_run_end_to_end(tmp_path, cache_dir):
    """eval.run on a cut-down --quick (one config, a short sequence, 4 real frames, one bench run) writes the
    table, plots and report, and skips a config the tracker rejects with the reason."""
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(json.dumps({
        "base": {"output": {"video": False}},
        "configs": [{"name": "landmarks", "overrides": {}, "quick": True},
                    {"name": "future_stage", "overrides": {"future_stage": {"enabled": True}}, "quick": True}],
    }))
    spec = SequenceSpec("e2e", (Segment("static", 4), Segment("talk", 6), Segment("turn", 6)), photo=2, seed=7,
                        image_size=384, max_yaw_deg=40.0)
    options = EvalOptions.preset(
        True, name="e2e", out=tmp_path / "results", cache_dir=cache_dir, ablation=str(ablation),
        videos=[str(VIDEOS / "wojtek.mp4")], real_frames=4, bench_runs=1, bench_frames=3, sequences=(spec,),
        tracker_overrides={"fit": {"keyframes": 3, "shape_iters": 6, "first_frame_iters": 10}},
        photometric=PhotometricOptions(texture_frames=4, eval_frames=4), dense=DenseOptions(frames=1, pixels=500))
    run_dir = run_evaluation(options)
    rows = json.loads((run_dir / "table.json").read_text())
    assert [r["config"] for r in rows] == ["landmarks"]
    row = rows[0]
    assert 0 < row["syn_v2v_rigid_mm"] < 15 and 0 < row["syn_nme68_pct"] < 15
    assert 0 < row["real_nme_heldout_pct"] < 15 and row["real_valid_pct"] == 100
    assert 0 < row["real_nme_vs_mediapipe_pct"] < row["real_nme_vs_dlib_pct"]  # it follows its own detector best
    assert 0 < row["real_jaw_iod"] < 0.3 and 0 < row["real_inner51_iod"] < 0.2  # eval.real.jaw, in IODs
    assert row["s_per_frame"] > 0
    assert (run_dir / "table.md").read_text().count("| landmarks |") == 1
    # Beside the track, on the same frames: its baselines (eval.baselines).
    assert "| exact_landmarks |" in (run_dir / "table.md").read_text().split("**landmarks / e2e**")[1]
    baselines = {r["name"]: r for r in json.loads((run_dir / "results.json").read_text())["configs"][0]["baselines"]
                 ["e2e"]}
    assert list(baselines) == ["tracker", "mean_face", "zero_expression", "exact_landmarks"]
    assert baselines["mean_face"]["v2v_rigid_mm"] > 0.3 and baselines["mean_face"]["focal_error_pct"] == 0
    assert baselines["exact_landmarks"]["lost_pct"] == 0 and baselines["exact_landmarks"]["reproj_px"] < 5
    assert (run_dir / "table.csv").read_text().splitlines()[0].startswith("config,")
    for name in ("error_vs_frame.png", "error_vs_yaw.png", "runtime_per_stage.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    report = (run_dir / "report.md").read_text()
    assert "future_stage" in report and "unknown config key" in report
    assert len(list((run_dir / "overlays").glob("*.png"))) == 4  # worst + median, synthetic + real
    dense = json.loads((run_dir / "results.json").read_text())["dense"]
    exact, calibrated = dense["scores"]["oracle_exact"], dense["scores"]["oracle_calibrated"]
    # An exact predictor finds the pixel's own vertex for most pixels (the rest snap to a neighbour).
    assert exact["median_mm"] == 0.0 and exact["pck_20mm"] > 0.97
    assert calibrated["pck_5mm"] < exact["pck_5mm"] - 0.2
    assert "densemarks" in dense["skipped"]
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    assert {"decode", "detection", "fitting", "render"} <= set(bench["configs"]["landmarks"]["median_s_per_frame"])


def test_embedding_calibration_finds_a_point_without_a_published_position():
    """eval.calibrate_embedding: a detector point with no published position is searched over the whole face
    region; seen exactly in a few posed frames, it lands on its true surface point (within 1 mm), and a point with a
    published position 1 cm off is moved back to the truth."""
    from eval.calibrate_embedding import SEARCH_REGIONS, fit_embedding
    from tracker.camera import Camera
    from tracker.flame.model import FlameParams

    bundle = load_flame_bundle(str(FLAME_STANDIN), str(FLAME_ASSETS), 20, 10, "mediapipe478")
    model, faces = bundle.model, bundle.model.faces.numpy()
    template = model.v_template.numpy().astype(np.float64)
    region = np.unique(np.concatenate([bundle.masks[name] for name in SEARCH_REGIONS]))
    g = torch.Generator().manual_seed(3)
    params = FlameParams.zeros(6, model.n_shape, model.n_expr)
    params.shape = 0.5 * torch.randn(1, model.n_shape, generator=g)
    params.rotation[:, 1] = torch.linspace(-0.5, 0.5, 6)
    params.rotation[:, 0] = torch.tensor([0.1, -0.1, 0.0, 0.15, -0.05, 0.0])
    params.translation[:] = torch.tensor([0.0, 0.0, -0.8])
    with torch.no_grad():
        verts = model(params).vertices.numpy().astype(np.float64)
    camera = Camera.from_image(512, 512, fov_deg=25)

    def project(f, pts):
        return camera.project(torch.from_numpy(np.asarray(pts)).float())[0].numpy()

    truth_faces = np.array([int(np.flatnonzero(np.isin(faces, region).all(1))[k]) for k in (100, 900)])
    truth_bary = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])

    def surface(v):
        return (v[faces[truth_faces]] * truth_bary[..., None]).sum(1)

    points = [project(f, surface(verts[f])) for f in range(len(verts))]
    published = np.stack([np.full(3, np.nan), surface(template)[1] + np.array([0.01, 0.0, 0.0])])
    published_surface = np.stack([np.stack([np.full(3, np.nan), surface(v)[1] + [0.01, 0.0, 0.0]]) for v in verts])
    face_idx, bary, costs, _ = fit_embedding(list(verts), points, published_surface, faces, template, published,
                                             region, project)
    found = (template[faces[face_idx]] * bary[..., None]).sum(1)
    assert np.linalg.norm(found - surface(template), axis=1).max() < 1e-3
    assert np.isnan(costs[0, 0]) and costs[1, 1] < costs[1, 0]


def test_speed_report_puts_each_landmark_run_beside_the_detector():
    """eval.bench's table: landmark mode's time per frame as a ratio of the detector's, for the timed clip and
    for the longer memory run (where the one-off identity fit weighs less), and memory against the shortest run."""
    from eval.bench.suite import SuiteOptions, report

    data = {"machine": "test", "load_average_start": (1.0, 1.0, 1.0), "load_average_end": (1.0, 1.0, 1.0),
            "detector_s": 0.01,
            "landmarks": {"e2e_s": 0.04, "detection_s": 0.01, "identity_s": 0.02, "fitting_s": 0.015, "overlay_s": 0.03},
            "dense": {"frames": 36, "dense_s": 0.25, "landmark_stage_s": 0.1},
            "photometric": {"frames": 20, "photometric_s": 2.0, "landmark_stage_s": 0.1},
            "network": {"eager_s": 1.6, "openvino_s": 1.0, "speedup": 1.6, "max_abs_diff": 1e-7},
            "render_ms": {"rasterise + interpolate fwd+bwd": 15.0},
            "memory": [{"frames": 100, "peak_rss_mb": 700.0, "s_per_frame": 0.04},
                       {"frames": 1000, "peak_rss_mb": 770.0, "s_per_frame": 0.02}]}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in report(data, SuiteOptions()).splitlines()
            if line.startswith("| ")}
    assert rows["landmark mode end to end (default config, no overlay video)"][1] == "4.00x detector"
    assert rows["landmark mode end to end, 1000 frames (looped clip: the memory run)"][:2] == ["0.020 s/frame",
                                                                                            "2.00x detector"]
    assert "landmark mode end to end, 100 frames (looped clip: the memory run)" not in rows
    assert rows["peak memory, landmark mode, 1000 frames (looped clip)"][1] == "1.10x 100 frames"
