"""Pure-PyTorch triangle rasteriser: screen-space vertices -> per-pixel nearest triangle.

Conventions (OpenCV): x right, y down, in pixels; pixel (i, j) covers x in [j, j+1), y in [i, i+1)
and is sampled at its centre (j + 0.5, i + 0.5). z is the positive depth along the camera axis.
A triangle is front-facing when it appears counter-clockwise on the image, i.e. its signed area
``(v1 - v0) x (v2 - v0)`` is negative in these y-down coordinates. FLAME's faces (counter-clockwise
seen from outside in its y-up model frame) are front-facing when viewed through an OpenCV camera.

The rasteriser is scanline based and fully vectorised: each triangle is cut into the pixel rows
whose centre line it crosses, each (triangle, row) span gives an exact column interval, and spans
are expanded to one entry per covered pixel. A single ``scatter_reduce(amin)`` on an int64 key
``(depth bits << 32) | face index`` then resolves visibility. Work is proportional to the number
of covered pixels rather than to bounding boxes. Every edge is evaluated from its upper endpoint
with the same floating-point operations in both triangles that share it, so closed meshes have
no cracks; a pixel centre exactly on a shared edge belongs to both (the depth test picks one).

Per-pixel work is done on 1D contiguous tensors (one per coordinate): on CPU, broadcasting over
small trailing dimensions and ``torch.where`` are several times slower than plain 1D arithmetic.
Visibility is not differentiable; gradients come from `interpolate`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from tracker.render.barycentric import barycentric_planes, evaluate_plane, face_corner_values, signed_area2

# Sentinel for "no triangle" in the packed visibility key; every real key is smaller.
_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW_HALF = 0 if sys.byteorder == "little" else 1  # int32 half of an int64 holding its low bits
_INT32_MAX = 0x7FFFFFFF


@dataclass(frozen=True)
class RasterSettings:
    """Options shared by all rasteriser backends.

    image_size: (H, W) in pixels.
    cull_backfaces: drop triangles that appear clockwise on the image (see module docstring).
    perspective_correct: screen-space vertices come from a perspective projection, so 1/z (not z)
        is affine across a triangle on the image; set False for orthographic projections.
    z_near: triangles with any vertex at depth <= z_near are dropped (no clipping is done).
    """

    image_size: tuple[int, int]
    cull_backfaces: bool = True
    perspective_correct: bool = True
    z_near: float = 1e-3


@dataclass(frozen=True)
class CoveredPixels:
    """The covered pixels of (B, H, W) images as flat lists of P entries, for per-pixel maths.

    pixel: (P,) flat index into (B, H, W); image: (P,) batch index; face: (P,) face index;
    face_row: (P,) image * F + face, the row of the face in per-face (B*F) tables;
    x, y: (P,) pixel-centre coordinates, in the dtype of the rasterised vertices.
    """

    pixel: Tensor
    image: Tensor
    face: Tensor
    face_row: Tensor
    x: Tensor
    y: Tensor


def covered_pixels(triangle_id: Tensor, num_faces: int, dtype: torch.dtype) -> CoveredPixels:
    """List the covered pixels of a (B, H, W) triangle-id image (-1 = background)."""
    _, height, width = triangle_id.shape
    image, row, col = torch.nonzero(triangle_id >= 0).t().contiguous()
    pixel = (image * height + row) * width + col
    face = triangle_id.reshape(-1).index_select(0, pixel)
    return CoveredPixels(
        pixel=pixel,
        image=image,
        face=face,
        face_row=image * num_faces + face,
        x=col.to(dtype) + 0.5,
        y=row.to(dtype) + 0.5,
    )


@dataclass(frozen=True, eq=False)
class Fragments:
    """Rasteriser output for a batch of B images of size H x W.

    triangle_id: (B, H, W) long, index into ``faces`` of the nearest triangle, -1 on background.
    verts_screen, faces, perspective_correct: the (detached) geometry that was rasterised, from
        which the per-pixel quantities below are derived on first access.
    """

    triangle_id: Tensor
    verts_screen: Tensor
    faces: Tensor
    perspective_correct: bool

    @cached_property
    def mask(self) -> Tensor:
        """(B, H, W) bool, True where a triangle covers the pixel centre."""
        return self.triangle_id >= 0

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.triangle_id.shape[1], self.triangle_id.shape[2])

    @cached_property
    def covered(self) -> CoveredPixels:
        """Flat list of the covered pixels (shared by `bary`, `depth` and interpolation)."""
        return covered_pixels(self.triangle_id, self.faces.shape[0], self.verts_screen.dtype)

    @cached_property
    def bary(self) -> Tensor:
        """(B, H, W, 3) screen-space (affine, not perspective-corrected) barycentric coordinates
        of each pixel centre in its triangle; zeros on background."""
        return self._scatter(torch.stack(self._bary_and_depth[0], dim=-1))

    @cached_property
    def depth(self) -> Tensor:
        """(B, H, W) depth z of the surface at each pixel centre (perspective-correct when the
        geometry came from a perspective projection); zeros on background."""
        return self._scatter(self._bary_and_depth[1])

    @cached_property
    def _bary_and_depth(self) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
        pix = self.covered
        planes, origin = barycentric_planes(self.verts_screen, self.faces, perspective_correct=False)
        x = pix.x - origin[0].index_select(0, pix.face_row)
        y = pix.y - origin[1].index_select(0, pix.face_row)
        bary = tuple(evaluate_plane(planes[:, k], pix.face_row, x, y) for k in range(3))
        # 1/z (perspective) or z (orthographic) is affine on the image: sum_k w_k * s_k is a plane.
        corner_z = face_corner_values(self.verts_screen[..., 2:], self.faces).reshape(1, 3, -1)
        corner_s = 1.0 / corner_z if self.perspective_correct else corner_z
        s = evaluate_plane((planes * corner_s).sum(dim=1), pix.face_row, x, y)
        return bary, (1.0 / s if self.perspective_correct else s)

    def _scatter(self, values: Tensor) -> Tensor:
        """(P, ...) values of the covered pixels -> (B, H, W, ...) image, zeros elsewhere."""
        image = values.new_zeros(self.triangle_id.numel(), *values.shape[1:])
        image[self.covered.pixel] = values
        return image.view(*self.triangle_id.shape, *values.shape[1:])


def _expand(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Segments of the given lengths laid end to end: (segment index, offset within it) per element."""
    total = int(counts.sum())
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts
    return segment, torch.arange(total, device=counts.device) - starts.index_select(0, segment)


def _drawable_triangles(tri: Tensor, settings: RasterSettings) -> Tensor:
    """(B, F) bool: triangles in front of the camera, finite, non-degenerate, facing if culling."""
    area2 = signed_area2(tri[..., :2])
    # A NaN corner makes every comparison False, but NaN x 0 can still reach the row counts: test all corners.
    finite = torch.isfinite(tri).flatten(-2).all(dim=-1)
    keep = (area2 != 0) & (tri[..., 2].amin(dim=-1) > settings.z_near) & finite
    if settings.cull_backfaces:
        keep &= area2 < 0
    return keep


def _sort_by_y(tri: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Corners of (K, 3, 3) triangles sorted top to bottom: x, y, z as (3, K) tensors (row = rank)."""
    order = tri[..., 1].argsort(dim=-1)
    tri = torch.gather(tri, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    soa = tri.permute(2, 1, 0).contiguous()  # (xyz, corner, K)
    return soa[0], soa[1], soa[2]


def _edge_slope(x: Tensor, y: Tensor, top: int, bottom: int) -> Tensor:
    """dx/dy of the edge between sorted corners top and bottom; 0 for horizontal edges."""
    dy = y[bottom] - y[top]
    flat = dy == 0
    return (x[bottom] - x[top]) / dy.masked_fill(flat, 1.0) * ~flat


def rasterize(verts_screen: Tensor, faces: Tensor, settings: RasterSettings) -> Fragments:
    """Rasterise a batch of meshes sharing one topology.

    verts_screen: (B, V, 3) pixel x, pixel y, depth z (see module docstring).
    faces: (F, 3) long vertex indices.
    Returns Fragments with (B, H, W) triangle ids (nearest depth wins), barycentrics and depth.
    No gradients flow through the result.
    """
    height, width = settings.image_size
    batch = verts_screen.shape[0]
    num_faces = faces.shape[0]
    device = verts_screen.device
    with torch.no_grad():
        tri_all = verts_screen.detach().float()[:, faces]  # (B, F, 3, 3)
        drawable = _drawable_triangles(tri_all, settings)
        y_all = tri_all[..., 1]
        row_first = torch.ceil(y_all.amin(dim=-1) - 0.5).clamp_(min=0)
        row_last = torch.floor(y_all.amax(dim=-1) - 0.5).clamp_(max=height - 1)
        rows = (row_last - row_first + 1).clamp_(min=0)
        num_rows = torch.where(drawable, rows, torch.zeros_like(rows)).long().reshape(-1)  # NaN * 0 is NaN
        kept = torch.nonzero(num_rows).squeeze(1)  # flat index b * F + f
        num_rows = num_rows.index_select(0, kept)
        x, y, z = _sort_by_y(tri_all.reshape(-1, 3, 3).index_select(0, kept))

        # Depth ordering: plane of 1/z (perspective) or z over the image, s = sx * x + sy * y + s0.
        s = 1.0 / z if settings.perspective_correct else z
        dx1, dy1, ds1 = x[1] - x[0], y[1] - y[0], s[1] - s[0]
        dx2, dy2, ds2 = x[2] - x[0], y[2] - y[0], s[2] - s[0]
        inv_area2 = 1.0 / (dx1 * dy2 - dy1 * dx2)
        sx = (ds1 * dy2 - ds2 * dy1) * inv_area2
        sy = (ds2 * dx1 - ds1 * dx2) * inv_area2
        slope_long, slope_upper, slope_lower = _edge_slope(x, y, 0, 2), _edge_slope(x, y, 0, 1), _edge_slope(x, y, 1, 2)

        # (triangle, row) spans: the long edge (0-2) bounds one side, edge 0-1 or 1-2 the other.
        span_tri, row_offset = _expand(num_rows)

        def at_span(values: Tensor) -> Tensor:
            return values.index_select(0, span_tri)

        row = at_span(row_first.reshape(-1).index_select(0, kept)) + row_offset
        yc = row + 0.5
        x0, y0, x1, y1 = at_span(x[0]), at_span(y[0]), at_span(x[1]), at_span(y[1])
        x_long = x0 + (yc - y0) * at_span(slope_long)
        x_short = torch.where(
            yc < y1, x0 + (yc - y0) * at_span(slope_upper), x1 + (yc - y1) * at_span(slope_lower)
        )
        col_first = torch.ceil(torch.minimum(x_long, x_short) - 0.5).clamp_(min=0)
        col_last = torch.floor(torch.maximum(x_long, x_short) - 0.5).clamp_(max=width - 1)
        num_cols = (col_last - col_first + 1).clamp_(min=0).long()

        # Pixel entries: every per-pixel value is "span value + offset along the span".
        flat_tri = at_span(kept)
        pixel_base = (flat_tri // num_faces * height + row.long()) * width + col_first.long()
        s_row = at_span(sx) * (col_first + 0.5) + at_span(sy) * yc + at_span(s[0] - sx * x[0] - sy * y[0])
        pix_span, col_offset = _expand(num_cols)
        pixel = pixel_base.index_select(0, pix_span) + col_offset
        depth_key = torch.addcmul(
            s_row.index_select(0, pix_span), at_span(sx).index_select(0, pix_span), col_offset.float()
        )
        depth_bits = depth_key.clamp_(min=0).view(torch.int32).long()  # >= 0 keeps keys ordered
        if settings.perspective_correct:  # larger 1/z is nearer
            depth_bits = _INT32_MAX - depth_bits
        key = (depth_bits << 32) | (flat_tri % num_faces).index_select(0, pix_span)
        zbuffer = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=device)
        zbuffer.scatter_reduce_(0, pixel, key, reduce="amin")

        # The low 32 bits of a key are the face index; those of the empty key read as int32 -1.
        triangle_id = zbuffer.view(torch.int32)[_LOW_HALF::2].long().view(batch, height, width)
    return Fragments(triangle_id, verts_screen.detach(), faces, settings.perspective_correct)
