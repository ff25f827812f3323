"""Time of the pure-PyTorch renderer on the FLAME mesh: rasterise + interpolate, forward + backward.

The FLAME stand-in template (5023 vertices, 9976 faces) is seen by a pinhole camera 0.6 m in front
of the face, filling about 60% of a 512 x 512 image. One run = rasterise, interpolate 3 vertex
attributes, backward from a fixed image gradient into vertex positions and attributes. A second
line times the full MeshRenderer (SH lighting, normals + vertex albedo).

    python -m eval.bench_render [--runs 20] [--threads 2] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from eval import SHARED_DATA
from tracker.render import MeshRenderer, RasterSettings, VertexAlbedo, interpolate, rasterize, vertex_normals

STANDIN = SHARED_DATA / "assets" / "flame_standin" / "flame_standin.pkl"


def machine_description() -> str:
    """CPU model, core count, torch version and current load, for reading the numbers later."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"


def flame_in_view(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(verts_screen (1, V, 3), faces (F, 3), verts_camera (1, V, 3)) of the template facing the camera."""
    with open(STANDIN, "rb") as file:
        data = pickle.load(file)
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


def bench(device: torch.device, size: int, runs: int) -> None:
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

    mesh = f"FLAME {screen.shape[1]} verts, {faces.shape[0]} faces"
    print(f"device {device}, {size}x{size}, {mesh}, coverage {coverage:.0%}")
    steps = {"rasterise + interpolate fwd+bwd": raster_interpolate, "MeshRenderer SH fwd+bwd": full_render}
    for name, step in steps.items():
        wall, cpu = time_runs(step, runs, device)
        print(
            f"  {name}: median {statistics.median(wall) * 1e3:.1f} ms wall (min {min(wall) * 1e3:.1f}), "
            f"median {statistics.median(cpu) * 1e3:.1f} ms process CPU over {runs} runs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description(), f"- torch threads {torch.get_num_threads()}")
    bench(torch.device("cpu"), args.size, args.runs)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name())
        bench(torch.device("cuda"), args.size, args.runs)


if __name__ == "__main__":
    main()
