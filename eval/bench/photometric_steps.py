"""Time of the photometric stage's building blocks on a synthetic frame (FLAME stand-in, 256 x 256 stage images):
one optimiser step (energy forward + backward) of the photometric term alone and with the landmark and prior
terms, at each pyramid level; one appearance-fit step on 8 keyframes; one frame of the default refinement.

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
from tracker.fit.photometric import (
    estimate_appearance,
    fit_appearance,
    fit_frame,
    initial_appearance,
    level_iters,
    pixel_geometry,
    pyramid_factors,
    pyramid_observations,
    pyramid_problems,
    render_frames,
)
from tracker.fit.solver import LANDMARK_FIELDS, Problem, leaf_params
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
    factors = pyramid_factors(cfg.photometric.pyramid_levels)
    levels = pyramid_problems(problem, cfg.energy.photometric, appearance, mesh, (size, size), factors, "torch")
    frame = params.frames(slice(3, 4))
    level_obs = pyramid_observations(obs.frames(slice(3, 4)), images[3:4], 1.0, factors)
    leaves = leaf_params(frame, LANDMARK_FIELDS)
    print(f"stage images {size}x{size}, region mesh {len(mesh.vertex_ids)} vertices / {len(mesh.face_ids)} faces")
    for factor, level, level_ob in zip(factors, levels, level_obs):
        photometric_only = level.with_terms(level.terms[-1:])
        for name, prob in (("photometric", photometric_only), ("+ landmarks, priors", level)):
            wall, cpu = median_ms(lambda: prob.energy(leaves, level_ob).sum().backward(), runs)
            print(f"  step at 1/{factor} ({size // factor} px), {name:20s}: {wall:6.1f} ms wall, {cpu:6.1f} ms CPU")

    geometry = pixel_geometry(mesh, camera, params, images, 1.0, "torch")
    cfg.photometric.texture_keyframe_iters = 10
    wall, cpu = median_ms(lambda: fit_appearance(geometry, appearance, model.faces, cfg.energy.photometric,
                                                 cfg.photometric), max(3, runs // 5))
    print(f"  appearance fit step, 8 keyframes ({geometry.face.numel()} pixels): {wall / 10:6.1f} ms wall")
    cfg.photometric.texture_keyframe_iters = TrackerConfig().photometric.texture_keyframe_iters
    frames = (images.numpy() * 255).round().astype("uint8")
    wall, cpu = median_ms(lambda: estimate_appearance(mesh, camera, params, frames, bundle, cfg, list(range(8))), 1)
    print(f"  appearance estimate ({cfg.photometric.texture_keyframe_iters} steps): {wall / 1e3:6.2f} s per sequence")
    steps = level_iters(cfg.photometric.iters, len(factors))
    wall, cpu = median_ms(lambda: fit_frame(levels, level_obs, frame, LANDMARK_FIELDS, steps, cfg.photometric.lr,
                                            None, mesh), max(3, runs // 5))
    print(f"  one frame, steps {steps}: {wall / 1e3:6.3f} s wall, {cpu / 1e3:6.3f} s CPU")


def main() -> None:
    args = micro_bench_args(__doc__.split("\n", 1)[0], runs=20, threads=1, size=256)
    bench(args.size, args.runs)


if __name__ == "__main__":
    main()
