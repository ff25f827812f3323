"""How the DenseMarks network is executed: eager PyTorch, or the same graph compiled by OpenVINO for the CPU.

The OpenVINO path exports the network with `torch.export` for the one input size the predictor uses (its crop
size, batch 1), converts it in memory (nothing is written to disk) and compiles it for the CPU (about half a
minute, once per run). In fp32 its outputs equal the eager network's to float rounding (the parity test checks
1e-4); it fuses the element-wise work around the matrix products and runs the DPT convolutions in blocked
layouts, which saves 1.3-2.6x over eager PyTorch at 512 x 512 depending on the CPU and its load (`python -m
eval.bench.network`; the least where eager PyTorch's own matrix products and convolutions are already fast, as
on CPUs with AVX-512). `precision="bf16"` is an opt-in for CPUs with bf16 units (AMX, AVX512-BF16): faster still,
but its accuracy cannot be validated without the released weights.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch

from tracker.densemarks.model import DenseMarksNet
from tracker.errors import TrackerError

BACKENDS = ("auto", "eager", "openvino")
PRECISIONS = ("fp32", "bf16")

Forward = Callable[[torch.Tensor], torch.Tensor]
"""(B,3,S,S) RGB in [0,255] -> uvw (B,3,S,S) float32 on the input's device."""


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: `auto` is OpenVINO on the CPU when it is installed, else eager."""
    if backend not in BACKENDS:
        raise TrackerError(f"unknown DenseMarks backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "eager"
    if backend == "openvino":
        if device.type != "cpu":
            raise TrackerError(f"the DenseMarks OpenVINO backend runs on the CPU, not on {device}")
        if not openvino_available():
            raise TrackerError("DenseMarks backend openvino asked for, but OpenVINO is not installed "
                               "(pip install openvino)")
    return backend


def eager_forward(net: DenseMarksNet, precision: str) -> Forward:
    """The network itself (bf16: under CPU/CUDA autocast)."""
    if precision == "fp32":
        return net
    device_type = net.pixel_mean.device.type

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            return net(images).float()

    return forward


def openvino_forward(net: DenseMarksNet, size: int, precision: str = "fp32", threads: int | None = None) -> Forward:
    """`net` compiled by OpenVINO for (1,3,size,size) inputs on the CPU; larger batches run frame by frame."""
    import openvino as ov

    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices
        converted = ov.convert_model(torch.export.export(net.eval(), (example,)))
    properties = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    compiled = ov.Core().compile_model(converted, "CPU", properties)
    request = compiled.create_infer_request()

    def forward(images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"this compiled DenseMarks net takes (B,3,{size},{size}), got {tuple(images.shape)}")
        outputs = [torch.from_numpy(request.infer({0: image[None].float().cpu().numpy()})[0].copy()) for image in images]
        return torch.cat(outputs)

    return forward


def build_forward(net: DenseMarksNet, backend: str, precision: str, size: int) -> tuple[Forward, str]:
    """The forward of `net` (on its device) for `size` x `size` crops, and the backend that runs it."""
    if precision not in PRECISIONS:
        raise TrackerError(f"unknown DenseMarks precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    backend = resolve_backend(backend, net.pixel_mean.device)
    if backend == "openvino":
        return openvino_forward(net, size, precision), backend
    return eager_forward(net, precision), backend
