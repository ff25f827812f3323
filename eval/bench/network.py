"""CPU time of one full-size DenseMarks forward (random weights): eager PyTorch fp32 against the OpenVINO path
(tracker/densemarks/runtime.py), fp32 and the opt-in bf16, with the largest output difference to eager.

    python -m eval.bench.network [--runs 3] [--size 512] [--no-bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers.initialization import no_init_weights

from eval.bench.machine import machine_description
from tracker.densemarks.model import DenseMarksConfig, DenseMarksNet
from tracker.densemarks.runtime import build_forward


def random_net(seed: int = 0) -> DenseMarksNet:
    """The released architecture with N(0, 0.02) weights (outputs unsaturated, as with trained weights)."""
    torch.manual_seed(seed)
    with no_init_weights():  # transformers' own initialisation of 110M parameters is slow and not needed
        net = DenseMarksNet(DenseMarksConfig()).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.02)
    return net


def time_forwards(forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]], images: torch.Tensor,
                  runs: int) -> dict[str, list[float]]:
    """Wall seconds per forward of each, interleaved run by run (a load change on a shared machine hits all
    alike), after one warm-up each."""
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(images)
        for _ in range(runs):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(images)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def bench_network(size: int = 512, runs: int = 3, bf16: bool = True) -> dict:
    """{"eager_s", "openvino_s", ("openvino_bf16_s"), "compile_s", "speedup", "max_abs_diff", ...}: medians."""
    net = random_net()
    images = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(1)).float()
    start = time.perf_counter()
    forwards = {"eager": net, "openvino": build_forward(net, "openvino", "fp32", size)[0]}
    compile_s = time.perf_counter() - start
    if bf16:
        forwards["openvino_bf16"] = build_forward(net, "openvino", "bf16", size)[0]
    with torch.inference_mode():
        reference = net(images)
        diffs = {name: float((forward(images) - reference).abs().max()) for name, forward in forwards.items()
                 if name != "eager"}
    seconds = {name: statistics.median(values) for name, values in time_forwards(forwards, images, runs).items()}
    result = {f"{name}_s": value for name, value in seconds.items()}
    result.update(compile_s=compile_s, speedup=seconds["eager"] / seconds["openvino"], size=size, runs=runs,
                  threads=torch.get_num_threads(), max_abs_diff=diffs["openvino"])
    if bf16:
        result.update(bf16_speedup=seconds["eager"] / seconds["openvino_bf16"], bf16_max_abs_diff=diffs["openvino_bf16"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    result = bench_network(args.size, args.runs, not args.no_bf16)
    print(f"machine: {machine_description()}, torch threads {result['threads']}")
    print(f"DenseMarks forward {args.size}x{args.size}, batch 1, median of {args.runs}: eager fp32 "
          f"{result['eager_s']:.2f} s, OpenVINO fp32 {result['openvino_s']:.2f} s ({result['speedup']:.2f}x, max "
          f"|diff| {result['max_abs_diff']:.1e}, compiled in {result['compile_s']:.0f} s)")
    if "openvino_bf16_s" in result:
        print(f"OpenVINO bf16 (opt-in): {result['openvino_bf16_s']:.2f} s ({result['bf16_speedup']:.2f}x, max |diff| "
              f"{result['bf16_max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
