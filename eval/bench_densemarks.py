"""CPU time of one full-size DenseMarks forward (512x512, random weights, 2 torch threads).

    python -m eval.bench_densemarks [--runs 5] [--threads 2] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eval.bench_render import machine_description
from tracker.densemarks.model import DenseMarksConfig, DenseMarksNet


def time_forward(net: DenseMarksNet, size: int, runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds (all threads) per forward of one (1,3,size,size) image, after one
    warm-up run. CPU seconds are the steadier number on a machine shared with other jobs."""
    images = torch.randint(0, 256, (1, 3, size, size)).float()
    wall, cpu = [], []
    with torch.no_grad():
        net(images)
        for _ in range(runs):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            net(images)
            wall.append(time.perf_counter() - wall_start)
            cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DenseMarksNet(DenseMarksConfig()).eval()
    wall, cpu = time_forward(net, args.size, args.runs)
    print(f"machine: {machine_description()}, torch threads {args.threads}")
    print(f"DenseMarks forward {args.size}x{args.size}, batch 1, {args.runs} runs: wall median "
          f"{statistics.median(wall):.2f} s (min {min(wall):.2f}, max {max(wall):.2f}); "
          f"CPU time median {statistics.median(cpu):.2f} s")


if __name__ == "__main__":
    main()
