"""Time of the photometric stage's building blocks on a synthetic frame (FLAME stand-in, 256 x 256 stage images):
at each pyramid level, taking the surface samples and one Levenberg-Marquardt Jacobian (forward-mode) of the
photometric term alone and with the landmark and prior terms; one appearance-fit step on 8 keyframes; one
identity round on the keyframes; one frame of the default refinement.

    python -m eval.bench.photometric_steps [--runs 20] [--threads 1] [--size 256]

The raw rasteriser (forward + backward at 512 x 512) is timed by eval.bench.render.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from eval import SHARED_DATA
from eval.bench.machine import micro_bench_args
from tracker.camera import Camera
from tracker.config import TrackerConfig
from tracker.energy.base import Observations
from tracker.energy.landmarks import LandmarkEnergy, LandmarkEnergyConfig
from tracker.energy.photometric import region_mesh
from tracker.energy.priors import PriorConfig, PriorEnergy
from tracker.energy.photometric_samples import SampledPhotometricEnergy
from tracker.fit.photometric import (
    downsample,
    estimate_appearance,
    fit_appearance,
    fit_photometric,
    initial_appearance,
    pixel_geometry,
    pyramid_factors,
    render_frames,
    surface_samples,
)
from tracker.fit.solver import LANDMARK_FIELDS, ParamPacker, Problem, block_jacobians
from tracker.flame.assets import load_flame_bundle
from tracker.flame.model import FlameParams



def median_ms(step: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of step() after one warm-up call."""
    step()
    wall, cpu = [], []
    for _ in range(runs):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def bench(size: int, runs: int) -> None:
    cfg = TrackerConfig()
    bundle = load_flame_bundle(str(SHARED_DATA / "assets" / "flame_standin" / "flame_standin.pkl"),
                               str(SHARED_DATA / "assets" / "flame"), 300, 100, "mediapipe478")
    model = bundle.model
    camera = Camera.from_image(size, size, fov_deg=30.0)
    mesh = region_mesh(model, bundle.masks, cfg.energy.photometric.regions)
    params = FlameParams.zeros(8, model.n_shape, model.n_expr)
    params.rotation[:, 1] = torch.linspace(-0.4, 0.4, 8)
    params.translation[:] = torch.tensor([0.0, 0.0, -0.6])
    appearance = initial_appearance(cfg.photometric, bundle, torch.tensor([0.6, 0.45, 0.35]))
    appearance.texture += 0.1 * torch.rand(appearance.texture.shape, generator=torch.Generator().manual_seed(0))
    appearance.sh[1:4] = torch.tensor([0.2, -0.2, 0.1]).unsqueeze(1)
    images, _ = render_frames(appearance, mesh, camera, params, (size, size), 1.0)

    problem = Problem(model, bundle.landmarks, camera,
                      [LandmarkEnergy(LandmarkEnergyConfig()), PriorEnergy(PriorConfig(), model)])
    landmarks = problem.evaluation(params, None).landmarks_2d.detach()
    extent = (landmarks.max(1).values - landmarks.min(1).values).norm(dim=-1)
    obs = Observations(landmarks, torch.ones(landmarks.shape[:2]), extent)
    frame, frame_obs = params.frames(slice(3, 4)), obs.frames(slice(3, 4))
    print(f"stage images {size}x{size}, region mesh {len(mesh.vertex_ids)} vertices / {len(mesh.face_ids)} faces")
    for factor in pyramid_factors(cfg.photometric.pyramid_levels):
        level_images, level_appearance = downsample(images[3:4], factor), appearance.blurred(factor)

        def sample():
            return surface_samples(mesh, level_appearance, model.faces, camera, frame, level_images, 1.0 / factor,
                                   cfg.energy.photometric, cfg.photometric.samples, "torch")

        wall, cpu = median_ms(sample, runs)
        print(f"  level 1/{factor} ({size // factor} px): samples {wall:6.1f} ms wall, {cpu:6.1f} ms CPU")
        term = SampledPhotometricEnergy(cfg.energy.photometric, sample(), level_images,
                                        1.0 / factor)
        packer = ParamPacker(frame, LANDMARK_FIELDS)
        X, shared = packer.pack(frame)
        for name, prob in (("photometric", problem.with_terms([term])),
                           ("+ landmarks, priors", problem.with_terms([*problem.terms, term]))):
            def jacobian():
                return block_jacobians(lambda X_, s_: prob.residuals(packer.unpack(X_, s_)[0], frame_obs), X, shared)

            wall, cpu = median_ms(jacobian, runs)
            print(f"    Jacobian, {name:20s}: {wall:6.1f} ms wall, {cpu:6.1f} ms CPU")

    geometry = pixel_geometry(mesh, camera, params, images, 1.0, "torch")
    cfg.photometric.texture_keyframe_iters = 10
    wall, cpu = median_ms(lambda: fit_appearance(geometry, appearance, model.faces, cfg.energy.photometric,
                                                 cfg.photometric), max(3, runs // 5))
    print(f"  appearance fit step, 8 keyframes ({geometry.face.numel()} pixels): {wall / 10:6.1f} ms wall")
    cfg.photometric.texture_keyframe_iters = TrackerConfig().photometric.texture_keyframe_iters
    frames = (images.numpy() * 255).round().astype("uint8")
    wall, cpu = median_ms(lambda: estimate_appearance(mesh, camera, params, frames, bundle, cfg, list(range(8))), 1)
    print(f"  appearance estimate ({cfg.photometric.texture_keyframe_iters} steps): {wall / 1e3:6.2f} s per sequence")
    wall, cpu = median_ms(lambda: fit_photometric(problem, mesh, appearance, frame, frame_obs, images[3:4], cfg,
                                                  LANDMARK_FIELDS, cfg.photometric.frame_iters), max(3, runs // 5))
    print(f"  one frame ({cfg.photometric.pyramid_levels} levels x {cfg.photometric.frame_iters} iterations): "
          f"{wall / 1e3:6.3f} s wall, {cpu / 1e3:6.3f} s CPU")
    keys = cfg.photometric.keyframes
    wall, cpu = median_ms(lambda: fit_photometric(problem, mesh, appearance, params.frames(slice(0, keys)),
                                                  obs.frames(slice(0, keys)), images[:keys], cfg, LANDMARK_FIELDS,
                                                  cfg.photometric.identity_iters, free_shape=True), 1)
    print(f"  one identity round's fit on {keys} keyframes: {wall / 1e3:6.2f} s wall, {cpu / 1e3:6.2f} s CPU")


def main() -> None:
    args = micro_bench_args(__doc__.split("\n", 1)[0], runs=20, threads=1, size=256)
    bench(args.size, args.runs)


if __name__ == "__main__":
    main()
