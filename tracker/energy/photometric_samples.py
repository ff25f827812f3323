"""Photometric term on fixed surface samples, for Gauss-Newton (Levenberg-Marquardt) solvers.

The render-and-compare term (energy.photometric) compares what the mesh renders at each pixel; its visibility
is not differentiable and its derivatives run through the rasteriser. This term instead fixes, for one round of
a solver, a set of points on the mesh's surface (the region faces and barycentric weights seen at the covered
pixels of a rendering at the round's starting parameters) and compares each point's predicted colour, albedo x
SH shading of its normal, with the frame's colour where the point now projects (bilinear). Both depend smoothly
on the parameters through plain tensor operations, so forward-mode Jacobians work and a few Levenberg-Marquardt
iterations replace many Adam steps. At the starting parameters the residuals are exactly the render-and-compare
ones. A point's normal is its own triangle's normal plus a fixed offset (turning with the head) that makes it
the rendered smooth normal at the start: it follows the jaw, expressions and identity without computing vertex
normals over the mesh, which would make the Jacobians several times dearer. Only the FLAME vertices of the
sampled faces are evaluated (`model`).

Robust loss and outlier rejection follow energy.photometric: Huber (or L1) on the colour residual at scale
`robust_scale`; samples whose residual exceeds `outlier_k` x their frame's median (and the floor) are dropped,
re-decided at every evaluation (an occluder only stands out once the face around it is aligned); each frame's
residuals are a mean over its kept samples, times `weight`. In the Jacobians the robust factor and the
outlier mask are held at their values (iteratively reweighted least squares).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tracker.camera import WORLD_TO_CAMERA
from tracker.energy.base import Evaluation, robust_ratio
from tracker.energy.photometric import PhotometricConfig
from tracker.errors import TrackerError
from tracker.flame.lbs import batch_rodrigues, left_jacobian, skew
from tracker.flame.model import FlameModel, FlameParams
from tracker.render.shading import sh_basis, sh_basis_jacobian


@dataclass(frozen=True)
class SurfaceSamples:
    """N fixed surface points per frame of B frames (padded to the same N: `real` tells the points from padding).

    model: FLAME restricted to the vertices of the sampled faces; corners: (B, N, 3) long, the rows of `model`'s
    vertices at each point's face corners; bary: (B, N, 3) the point's barycentric weights; albedo: (B, N, 3) its
    albedo; normal_offset: (B, N, 3) its smooth (rendered) normal minus its triangle's unit normal, in the head's
    frame (world vectors with the head's rotation undone); real: (B, N) bool, False on padding (and points not
    to compare); sh: (B, 9, 3) each frame's SH lighting in camera coordinates.
    """

    model: FlameModel
    corners: Tensor
    bary: Tensor
    albedo: Tensor
    normal_offset: Tensor
    real: Tensor
    sh: Tensor


def bilinear(images: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Sample images (B, H, W, C) at continuous pixel positions (B, N, 2) (pixel (i, j) centred at
    (j + 0.5, i + 0.5)), bilinearly, clamped at the border.

    Returns the values (B, N, C) and their derivatives with respect to x and y (B, N, C, 2), zero where the
    position is clamped.
    """
    batch, height, width, channels = images.shape
    x_raw, y_raw = pixels[..., 0] - 0.5, pixels[..., 1] - 0.5
    x, y = x_raw.clamp(0, width - 1), y_raw.clamp(0, height - 1)
    x0, y0 = x.floor().clamp(max=width - 2), y.floor().clamp(max=height - 2)
    fx, fy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
    base = (torch.arange(batch, device=images.device).view(-1, 1) * height + y0.long()) * width + x0.long()
    flat = images.reshape(-1, channels)

    def at(offset: int) -> Tensor:
        return flat.index_select(0, (base + offset).reshape(-1)).view(batch, -1, channels)

    a, b, c, d = at(0), at(1), at(width), at(width + 1)
    top, bottom = a + (b - a) * fx, c + (d - c) * fx
    inside_x = ((x_raw >= 0) & (x_raw <= width - 1)).unsqueeze(-1)
    inside_y = ((y_raw >= 0) & (y_raw <= height - 1)).unsqueeze(-1)
    d_dx = ((b - a) + ((d - c) - (b - a)) * fy) * inside_x
    d_dy = (bottom - top) * inside_y
    return top + (bottom - top) * fy, torch.stack([d_dx, d_dy], dim=-1)


@dataclass(frozen=True)
class ColourModel:
    """What a sample's colour residual depends on besides its position, normal and the focal length.

    albedo: (B, N, 3); sh: (B, 9, 3) each frame's lighting in camera coordinates; images: (B, H, W, 3) the frames, whose pixels
    are image_scale x the camera's; real: (B, N) bool, False on padding.
    """

    albedo: Tensor
    sh: Tensor
    images: Tensor
    image_scale: float
    real: Tensor
    cfg: PhotometricConfig

    def residuals(self, points: Tensor, raw_normals: Tensor, focal: Tensor,
                  center: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Colour residuals predicted - observed (B, N, 3) of samples at world points (B, N, 3) with world
        normals raw_normals / |raw_normals|, seen by a camera of focal length `focal` and principal point
        `center` (2,), and their derivatives with respect to the point (B, N, 3, 3), the raw
        normal (B, N, 3, 3) and the focal length (B, N, 3)."""
        flip = WORLD_TO_CAMERA.diagonal().to(points)
        camera = points * flip
        depth = camera[..., 2:].clamp(min=1e-6)
        xy = camera[..., :2] / depth
        observed, gradient = bilinear(self.images, (xy * focal + center) * self.image_scale)
        # d pixel / d camera point = image_scale focal / z [[1, 0, -x/z], [0, 1, -y/z]]
        k = self.image_scale * focal / depth
        zero = torch.zeros_like(k)
        d_pixel = torch.stack([torch.cat([k, zero, -k * xy[..., :1]], -1),
                               torch.cat([zero, k, -k * xy[..., 1:]], -1)], dim=-2) * flip
        d_points = -gradient @ d_pixel
        d_focal = -(gradient @ (xy * self.image_scale).unsqueeze(-1)).squeeze(-1)

        length = raw_normals.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        normal = raw_normals / length
        basis_at = normal.movedim(-1, 0) * flip.view(3, 1, 1)  # camera-frame normal, channels first
        shading = torch.einsum("kbn,bkc->bnc", sh_basis(basis_at), self.sh)
        d_shading = torch.einsum("kjbn,bkc->bncj", sh_basis_jacobian(basis_at), self.sh) * flip  # per world normal
        projector = torch.eye(3, device=points.device) - normal.unsqueeze(-1) * normal.unsqueeze(-2)
        d_normals = self.albedo.unsqueeze(-1) * (d_shading @ (projector / length.unsqueeze(-1)))
        return self.albedo * shading - observed, d_points, d_normals, d_focal

    def robust_weights(self, residual: Tensor) -> Tensor:
        """(B, N, 1) factors turning colour residuals (B, N, 3) into the term's weighted robust residuals: the
        robust loss, outliers (beyond outlier_k x the frame's median, and the floor) and padding dropped, and
        the frame's weight shared out over its kept samples."""
        cfg = self.cfg
        squared = residual.pow(2).sum(-1)
        length = squared.sqrt().masked_fill(~self.real, float("nan"))
        limit = torch.clamp(cfg.outlier_k * length.nanmedian(dim=1, keepdim=True).values, min=cfg.outlier_floor)
        keep = (self.real & (length <= limit)).to(residual.dtype)
        share = cfg.weight * keep / keep.sum(dim=1, keepdim=True).clamp(min=1.0)
        robust = torch.sqrt(robust_ratio(squared / cfg.robust_scale ** 2, cfg.robust)) / cfg.robust_scale
        return (robust * share.sqrt()).unsqueeze(-1)


class _WeightedResiduals(torch.autograd.Function):
    """Weighted colour residuals (B, N, 3) of samples, differentiable in forward and reverse mode through
    Jacobians computed with the values (the robust factor is held at its value, as in iteratively reweighted
    least squares): one pass over the samples instead of one per solver parameter."""

    generate_vmap_rule = True

    @staticmethod
    def forward(points: Tensor, raw_normals: Tensor, focal: Tensor, center: Tensor, model: ColourModel):
        residual, d_points, d_normals, d_focal = model.residuals(points, raw_normals, focal, center)
        weights = model.robust_weights(residual)
        return residual * weights, d_points * weights.unsqueeze(-1), d_normals * weights.unsqueeze(-1), \
            d_focal * weights

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output[1:])
        ctx.save_for_forward(*output[1:])
        ctx.focal_shape = inputs[2].shape
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def jvp(ctx, d_points, d_normals, d_focal, *_):
        j_points, j_normals, j_focal = ctx.saved_tensors
        tangent = torch.zeros_like(j_focal)
        if d_points is not None:
            tangent = tangent + (j_points @ d_points.unsqueeze(-1)).squeeze(-1)
        if d_normals is not None:
            tangent = tangent + (j_normals @ d_normals.unsqueeze(-1)).squeeze(-1)
        if d_focal is not None:
            tangent = tangent + j_focal * d_focal
        return tangent, None, None, None

    @staticmethod
    def backward(ctx, grad, *_):
        j_points, j_normals, j_focal = ctx.saved_tensors
        g = grad.unsqueeze(-2)
        return (g @ j_points).squeeze(-2), (g @ j_normals).squeeze(-2), \
            (grad * j_focal).sum().reshape(ctx.focal_shape), None, None


def gather_corners(values: Tensor, corners: Tensor) -> Tensor:
    """Per-vertex values (B, S, C) at the corners (B, N, 3) of the samples -> (B, N, 3 corners, C)."""
    batch, count, _ = corners.shape
    channels = values.shape[-1]
    index = corners.reshape(batch, -1, 1).expand(-1, -1, channels)
    return torch.gather(values, 1, index).view(batch, count, 3, channels)


def triangle_normals(corners: Tensor) -> Tensor:
    """Unit normals (..., 3) of triangles (..., 3 corners, 3), counter-clockwise seen from their front."""
    normal = torch.linalg.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :])
    return F.normalize(normal, dim=-1, eps=1e-12)


def head_rotation(params: FlameParams) -> Tensor:
    """(B, 3, 3) world orientation of the head: the global rotation, then the neck's."""
    return batch_rodrigues(params.rotation) @ batch_rodrigues(params.neck_pose)


def normal_jacobian(corners: Tensor, d_corners: Tensor) -> Tensor:
    """Derivatives of `triangle_normals` from those of the corners: corners (..., 3 corners, 3), d_corners
    (..., 3 corners, 3, P) -> (..., 3, P)."""
    e1, e2 = corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :]
    d1, d2 = d_corners[..., 1, :, :] - d_corners[..., 0, :, :], d_corners[..., 2, :, :] - d_corners[..., 0, :, :]
    cross = torch.linalg.cross(e1, e2)
    # d(e1 x e2) = de1 x e2 + e1 x de2 = [e1]_x de2 - [e2]_x de1
    d_cross = skew(e1) @ d2 - skew(e2) @ d1
    length = cross.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    unit = cross / length
    projector = torch.eye(3, dtype=corners.dtype, device=corners.device) - unit[..., :, None] * unit[..., None, :]
    return (projector / length[..., None]) @ d_cross


def offset_jacobian(params: FlameParams, offset: Tensor, columns: dict[str, slice]) -> Tensor | None:
    """Derivatives of the samples' world normal offsets R_head offset (B, N, 3) in the head's rotation fields
    (`rotation`, `neck_pose` among `columns`): (B, N, 3, P), or None when neither is free."""
    if "rotation" not in columns and "neck_pose" not in columns:
        return None
    B, N = offset.shape[:2]
    P = max(s.stop for s in columns.values())
    d = offset.new_zeros(B, N, 3, P)
    rot, neck = batch_rodrigues(params.rotation), batch_rodrigues(params.neck_pose)
    if "rotation" in columns:  # d(R_rot R_neck o) = (J_l dw) x (R_head o)
        world = offset @ (rot @ neck).transpose(1, 2)
        d[..., columns["rotation"]] = -skew(world) @ left_jacobian(params.rotation)[:, None]
    if "neck_pose" in columns:  # d(R_rot R_neck o) = R_rot ((J_l dw) x (R_neck o))
        turned = offset @ neck.transpose(1, 2)
        d[..., columns["neck_pose"]] = rot[:, None] @ -skew(turned) @ left_jacobian(params.neck_pose)[:, None]
    return d


def sample_geometry(ev: Evaluation, samples: SurfaceSamples) -> tuple[Tensor, Tensor]:
    """World positions (B, N, 3) and raw (unnormalised) world normals (B, N, 3) of the samples under ev's
    parameters."""
    corners = gather_corners(samples.model(ev.params).vertices, samples.corners)  # (B, N, 3, 3)
    points = (corners * samples.bary.unsqueeze(-1)).sum(2)
    offset = samples.normal_offset @ head_rotation(ev.params).transpose(1, 2)
    return points, triangle_normals(corners) + offset


class SampledPhotometricEnergy:
    """Colour residuals (B, N * 3) of fixed surface samples against one batch of frames (see the module
    docstring); `images` are the frames the samples were taken in, in the same order as ev's parameters."""

    name = "photometric"

    def __init__(self, cfg: PhotometricConfig, samples: SurfaceSamples, images: Tensor, image_scale: float):
        if cfg.robust not in ("l1", "huber"):
            raise TrackerError(f"energy.photometric.robust must be l1 or huber, got {cfg.robust!r}")
        self.samples = samples
        self.colours = ColourModel(samples.albedo, samples.sh, images, image_scale, samples.real, cfg)

    def __call__(self, ev: Evaluation) -> Tensor:
        points, raw_normals = sample_geometry(ev, self.samples)
        return _WeightedResiduals.apply(points, raw_normals, ev.camera.focal, ev.camera.center, self.colours)[0].flatten(1)

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> Tensor:
        """(B, 3N, P) derivatives of the residuals in the parameter fields `fields`: the samples' point and
        normal derivatives (through FLAME's analytic ones) times the colour residuals' (the robust factor and
        outliers held, as in the forward-mode path)."""
        samples = self.samples
        vertices, d_vertices = samples.model.jacobian(ev.params, list(fields))
        B, N = samples.corners.shape[:2]
        P = d_vertices.shape[-1]
        corners = gather_corners(vertices, samples.corners)  # (B, N, 3, 3)
        d_corners = gather_corners(d_vertices.flatten(2), samples.corners).view(B, N, 3, 3, P)
        bary = samples.bary[..., None, None]
        points = (corners * samples.bary.unsqueeze(-1)).sum(2)
        d_points = (d_corners * bary).sum(2)
        offset = samples.normal_offset @ head_rotation(ev.params).transpose(1, 2)
        d_normals = normal_jacobian(corners, d_corners)
        d_offset = offset_jacobian(ev.params, samples.normal_offset, ev.field_columns(fields))
        if d_offset is not None:
            d_normals = d_normals + d_offset
        residual, j_points, j_normals, _ = self.colours.residuals(points, triangle_normals(corners) + offset,
                                                                    ev.camera.focal, ev.camera.center)
        weights = self.colours.robust_weights(residual).unsqueeze(-1)  # (B, N, 1, 1)
        return ((j_points @ d_points + j_normals @ d_normals) * weights).flatten(1, 2)
