"""Time of the pure-PyTorch renderer on the FLAME mesh: rasterise + interpolate, forward + backward.

The FLAME stand-in template (5023 vertices, 9976 faces) is seen by a pinhole camera 0.6 m in front
of the face, filling about 60% of a 512 x 512 image. One run = rasterise, interpolate 3 vertex
attributes, backward from a fixed image gradient into vertex positions and attributes. A second
line times the full MeshRenderer (SH lighting, normals + vertex albedo).

    python -m eval.bench.render [--runs 20] [--threads 2] [--size 512]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from eval import SHARED_DATA
from eval.bench.machine import micro_bench_args
from tracker.flame.loading import read_pickle
from tracker.render import MeshRenderer, RasterSettings, VertexAlbedo, interpolate, rasterize, vertex_normals

STANDIN = SHARED_DATA / "assets" / "flame_standin" / "flame_standin.pkl"


def flame_in_view(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(verts_screen (1, V, 3), faces (F, 3), verts_camera (1, V, 3)) of the template facing the camera."""
    data = read_pickle(STANDIN)  # the restricted unpickler: numpy/scipy arrays only
    verts = torch.tensor(np.asarray(data["v_template"]), dtype=torch.float32)
    faces = torch.tensor(np.asarray(data["f"], dtype=np.int64))
    centre = (verts.min(0).values + verts.max(0).values) / 2
    camera = (verts - centre) * torch.tensor([1.0, -1.0, -1.0]) + torch.tensor([0.0, 0.0, 0.6])  # y-up -> OpenCV
    focal = 2.34 * size  # about 60% of the pixels covered
    screen = torch.stack(
        [focal * camera[:, 0] / camera[:, 2] + size / 2, focal * camera[:, 1] / camera[:, 2] + size / 2, camera[:, 2]],
        dim=-1,
    )
    return screen.unsqueeze(0).to(device), faces.to(device), camera.unsqueeze(0).to(device)


def time_runs(step: Callable[[], None], runs: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per run, after two warm-up runs."""
    for _ in range(2):
        step()
    wall, cpu = [], []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def bench(device: torch.device, size: int, runs: int) -> dict[str, float]:
    """Median wall milliseconds of each renderer step (see the module docstring), and the image coverage."""
    screen, faces, camera = flame_in_view(size, device)
    settings = RasterSettings(image_size=(size, size))
    generator = torch.Generator(device="cpu").manual_seed(0)
    colors = torch.rand(1, screen.shape[1], 3, generator=generator).to(device)
    grad_image = torch.rand(1, size, size, 3, generator=generator).to(device)
    coverage = rasterize(screen, faces, settings).mask.float().mean().item()

    def raster_interpolate() -> None:
        verts = screen.clone().requires_grad_(True)
        attributes = colors.clone().requires_grad_(True)
        image, _ = interpolate(rasterize(verts, faces, settings), verts, faces, attributes)
        image.backward(grad_image)

    renderer = MeshRenderer(settings)
    normals = vertex_normals(camera, faces)
    sh = torch.zeros(1, 9, 3, device=device)
    sh[:, 0] = 3.0

    def full_render() -> None:
        verts = screen.clone().requires_grad_(True)
        albedo = colors.clone().requires_grad_(True)
        renderer(verts, faces, normals, sh, VertexAlbedo(albedo)).image.backward(grad_image)

    steps = {"rasterise + interpolate fwd+bwd": raster_interpolate, "MeshRenderer SH fwd+bwd": full_render}
    timings = {name: statistics.median(time_runs(step, runs, device)[0]) * 1e3 for name, step in steps.items()}
    return {**timings, "coverage": coverage}


def main() -> None:
    args = micro_bench_args(__doc__.split("\n", 1)[0], runs=20, threads=2, size=512)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        result = bench(device, args.size, args.runs)
        print(f"device {device}, {args.size}x{args.size}, FLAME template, coverage {result.pop('coverage'):.0%}")
        for name, ms in result.items():
            print(f"  {name}: median {ms:.1f} ms wall over {args.runs} runs")


if __name__ == "__main__":
    main()
