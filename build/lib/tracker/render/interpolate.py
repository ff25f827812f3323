"""Differentiable interpolation of mesh attributes over rasterised pixels.

Given Fragments (which triangle covers each pixel), the barycentric weights of each pixel centre
are recomputed from the screen-space vertex positions, so gradients reach both the attributes
and the vertex positions (x, y, and z when perspective-correct). Visibility itself is fixed (no
silhouette gradients), as in nvdiffrast without its antialiasing pass.

Classic homogeneous interpolation: over one face, sum_k a_k w_k / z_k and sum_k w_k / z_k are
both planes on the image, and the perspective-correct attribute is their ratio (z = 1 for affine
interpolation). The planes are built per face with plain autograd (F faces, cheap); the
per-pixel part, evaluating C + 1 planes and dividing, is `_PlaneRatio`, whose backward pass is
written out by hand so that each pixel costs a few 1D tensor operations.

Two levels: `interpolate` / `interpolate_face_corners` return (B, H, W, C) images;
`interpolate_covered` returns channels-first (C, P) values on the covered pixels only
(`Fragments.covered` order), for shading without touching background pixels, and
`pixels_to_image` turns such values into an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tracker.render.barycentric import barycentric_planes, face_corner_values
from tracker.render.rasterize import Fragments


@dataclass(frozen=True)
class _PixelSamples:
    """Covered pixels (P entries): row of the face in per-face tables and the pixel centre
    relative to the face's plane origin."""

    face_row: Tensor
    x: Tensor
    y: Tensor


def interpolate(
    fragments: Fragments,
    verts_screen: Tensor,
    faces: Tensor,
    attributes: Tensor,
    perspective_correct: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Interpolate per-vertex attributes to the covered pixels.

    fragments: rasteriser output for verts_screen / faces (images B x H x W).
    verts_screen: (B, V, 3) pixel x, y and depth z; gradients flow into it.
    faces: (F, 3) long.
    attributes: (B, V, C) or (V, C) per-vertex values.
    perspective_correct: interpolate linearly in 3D (True, perspective projections) or on the
        image (False, e.g. orthographic); None = as the fragments were rasterised.
    Returns (image (B, H, W, C), zero on background; mask (B, H, W, 1) in the attributes' dtype).
    """
    corner_values = face_corner_values(attributes, faces)  # (3, C, [B,] F)
    values = interpolate_covered(fragments, verts_screen, faces, corner_values, perspective_correct)
    return pixels_to_image(fragments, values), fragments.mask.unsqueeze(-1).to(values.dtype)


def interpolate_face_corners(
    fragments: Fragments,
    verts_screen: Tensor,
    faces: Tensor,
    corner_attributes: Tensor,
    perspective_correct: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Interpolate attributes stored per face corner (e.g. UVs with seams) to the covered pixels.

    corner_attributes: (F, 3, C) or (B, F, 3, C), the value at each face's k-th corner.
    Other arguments and the return value are as in `interpolate`.
    """
    corner_values = corner_attributes.movedim((-2, -1), (0, 1))  # (3, C, [B,] F)
    values = interpolate_covered(fragments, verts_screen, faces, corner_values, perspective_correct)
    return pixels_to_image(fragments, values), fragments.mask.unsqueeze(-1).to(values.dtype)


def interpolate_covered(
    fragments: Fragments,
    verts_screen: Tensor,
    faces: Tensor,
    corner_values: Tensor,
    perspective_correct: bool | None = None,
) -> Tensor:
    """Interpolated values at the covered pixels only.

    corner_values: (3, C, B, F) or (3, C, F) value at each face corner (see
    `barycentric.face_corner_values`). Returns (C, P) in `fragments.covered` order.
    """
    if perspective_correct is None:
        perspective_correct = fragments.perspective_correct
    batch = verts_screen.shape[0]
    if corner_values.dim() == 3:
        corner_values = corner_values.unsqueeze(2).expand(-1, -1, batch, -1)
    corner_values = corner_values.reshape(3, corner_values.shape[1], -1)  # (3, C, B*F)
    planes, origin = barycentric_planes(verts_screen, faces, perspective_correct)  # (3 coef, 3, B*F)
    numerators = (planes.unsqueeze(2) * corner_values.unsqueeze(0)).sum(dim=1)  # (3 coef, C, B*F)
    denominator = planes.sum(dim=1, keepdim=True)  # (3 coef, 1, B*F)
    pixels = fragments.covered
    samples = _PixelSamples(
        face_row=pixels.face_row,
        x=pixels.x - origin[0].index_select(0, pixels.face_row),
        y=pixels.y - origin[1].index_select(0, pixels.face_row),
    )
    return _PlaneRatio.apply(torch.cat([numerators, denominator], dim=1), samples)


def pixels_to_image(fragments: Fragments, values: Tensor) -> Tensor:
    """(C, P) values at `fragments.covered` pixels -> (B, H, W, C) image, zero elsewhere."""
    return _PixelsToImage.apply(values, fragments.covered.pixel, tuple(fragments.triangle_id.shape))


def _evaluate(plane: Tensor, samples: _PixelSamples) -> Tensor:
    """(3, N) plane (A, B, C) at the samples -> (P,)."""
    a, b, c = (plane[i].index_select(0, samples.face_row) for i in range(3))
    return torch.addcmul(torch.addcmul(c, a, samples.x), b, samples.y)


class _PlaneRatio(torch.autograd.Function):
    """values[c] = plane_c / plane_C at the samples.

    planes: (3 coefficients, C + 1, N), the last one being the denominator. Output (C, P).
    """

    @staticmethod
    def forward(ctx, planes: Tensor, samples: _PixelSamples) -> Tensor:
        num_channels = planes.shape[1] - 1
        planes = planes.contiguous()
        inv_denominator = 1.0 / _evaluate(planes[:, num_channels], samples)
        values = torch.stack([_evaluate(planes[:, c], samples) * inv_denominator for c in range(num_channels)])
        ctx.samples, ctx.planes_shape = samples, planes.shape
        ctx.save_for_backward(inv_denominator, values)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None]:
        samples: _PixelSamples = ctx.samples
        inv_denominator, values = ctx.saved_tensors
        # value_c = N_c / D: dL/dN_c = g_c / D, dL/dD = -sum_c g_c value_c / D.
        grad_numerators = grad_values * inv_denominator
        grad_denominator = -(grad_numerators * values).sum(dim=0)
        grad_planes = inv_denominator.new_zeros(ctx.planes_shape)
        for c, grad_c in enumerate([*grad_numerators, grad_denominator]):
            grad_planes[0, c].scatter_add_(0, samples.face_row, grad_c * samples.x)
            grad_planes[1, c].scatter_add_(0, samples.face_row, grad_c * samples.y)
            grad_planes[2, c].scatter_add_(0, samples.face_row, grad_c)
        return grad_planes, None


class _PixelsToImage(torch.autograd.Function):
    """Scatter (C, P) values into a zero (B, H, W, C) image at flat pixel indices (P,)."""

    @staticmethod
    def forward(ctx, values: Tensor, pixel: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
        num_channels = values.shape[0]
        image = values.new_zeros(math.prod(image_shape), num_channels)
        for c in range(num_channels):
            image[:, c].scatter_(0, pixel, values[c])
        ctx.save_for_backward(pixel)
        return image.view(*image_shape, num_channels)

    @staticmethod
    def backward(ctx, grad_image: Tensor) -> tuple[Tensor, None, None]:
        (pixel,) = ctx.saved_tensors
        grad_flat = grad_image.reshape(-1, grad_image.shape[-1])
        return torch.stack([grad_flat[:, c].index_select(0, pixel) for c in range(grad_flat.shape[1])]), None, None
