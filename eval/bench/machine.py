"""What the benchmark numbers were measured on."""

from __future__ import annotations

import argparse
import os
import platform

import torch


def machine_description() -> str:
    """CPU model, core count, torch version and current load, for reading the numbers later."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"


def machine_name(device: str) -> str:
    """CPU (and GPU when benchmarking on CUDA), torch version and load, for reading the numbers later."""
    name = machine_description()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        name += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return name


def micro_bench_args(description: str, runs: int, threads: int, size: int) -> argparse.Namespace:
    """--runs/--threads/--size of a micro-benchmark's command line; sets torch's threads and prints the machine."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--size", type=int, default=size)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description(), f"- torch threads {torch.get_num_threads()}")
    return args
