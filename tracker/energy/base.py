"""What energy terms see: the observations of a batch of frames and lazily evaluated model quantities.

Each term is a small callable `term(ev: Evaluation) -> (B, N)` of weighted residuals (Ceres-style): the
frame's energy is the sum of their squares over all terms. Robust losses are folded into the residuals
(`robust_residuals`) so the same terms serve Gauss-Newton/Levenberg-Marquardt and gradient descent. Terms pull only what they need from `Evaluation` (landmark vertices,
all vertices, projections), and each quantity is computed once per optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from tracker.camera import Camera
from tracker.flame.landmarks import LandmarkSet, yaw_degrees
from tracker.flame.lbs import SkinningDerivatives, batch_rodrigues
from tracker.flame.model import FlameModel, FlameParams
from tracker.render.interpolate import interpolate
from tracker.render.rasterize import Fragments


@dataclass
class Observations:
    """Per-frame measurements for a batch of B frames (all on the fitting device)."""

    landmarks: torch.Tensor
    """(B, L, 2) detected landmarks matched to the FLAME embedding order, image pixels."""
    landmark_weights: torch.Tensor
    """(B, L) confidence x per-landmark weight; 0 where a frame or point is missing."""
    face_size: torch.Tensor
    """(B,) face scale in pixels (landmark bounding-box diagonal), so energies are resolution independent."""
    images: torch.Tensor | None = None
    """(B, H, W, 3) RGB in [0, 1] for image-based terms (possibly downscaled from the video)."""
    image_scale: float = 1.0
    """Size of `images` pixels relative to video pixels (e.g. 0.5 when images are half-size)."""
    extras: dict = field(default_factory=dict)
    """Term-specific per-frame inputs (DenseMarks uvw maps, ...): tensors with frames first."""

    @staticmethod
    def cat(parts: Sequence[Observations]) -> Observations:
        """The frames of `parts` (same image scale and extras) in one batch."""
        first = parts[0]
        return Observations(
            torch.cat([o.landmarks for o in parts]), torch.cat([o.landmark_weights for o in parts]),
            torch.cat([o.face_size for o in parts]),
            None if first.images is None else torch.cat([o.images for o in parts]), first.image_scale,
            {k: torch.cat([o.extras[k] for o in parts]) if isinstance(v, torch.Tensor) else v
             for k, v in first.extras.items()},
        )

    def frames(self, index) -> Observations:
        return Observations(
            self.landmarks[index], self.landmark_weights[index], self.face_size[index],
            None if self.images is None else self.images[index], self.image_scale,
            {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
        )


class Evaluation:
    """Model quantities for the current parameters, each computed on first use."""

    def __init__(self, model: FlameModel, landmarks: LandmarkSet, camera: Camera, params: FlameParams,
                 obs: Observations, reference: FlameParams | None = None,
                 contour_yaw: torch.Tensor | None = None, landmark_model: FlameModel | None = None,
                 rasterizer: Callable[[torch.Tensor, torch.Tensor], Fragments] | None = None,
                 term_state: dict | None = None, sparse_ids: torch.Tensor | None = None,
                 shared_frames: int | None = None):
        self.model = model
        self.rasterizer = rasterizer
        """rasterizer(verts_screen (B, V, 3), faces) -> Fragments at the size of obs.images."""
        self.landmark_model = landmark_model or model.restricted(landmarks.vertex_ids)
        """The model restricted to `sparse_ids` (callers that evaluate often pass it in)."""
        self.sparse_ids = landmarks.vertex_ids if landmark_model is None or sparse_ids is None else sparse_ids
        """(S,) FLAME vertex ids `landmark_model` computes: the landmarks' first, then others terms read."""
        self.landmark_set = landmarks
        self.camera = camera
        self.params = params
        self.obs = obs
        self.reference = reference
        """Parameters of neighbouring (previous) frames for temporal terms, or None."""
        self.contour_yaw = contour_yaw
        """(B,) yaw (degrees) that picks the jaw contour, held fixed by solvers; None: from params."""
        self.term_state = term_state or {}
        """Per-term state a solver holds fixed for a round ({term name: term.prepare(ev)}), e.g. matches."""
        self.shared_frames = shared_frames or params.batch_size
        """How many frames the terms on shared parameters (the identity's prior, its size) are shared out over:
        the batch, or all frames of a track evaluated a chunk at a time."""

    @cached_property
    def yaw_deg(self) -> torch.Tensor:
        """(B,) head yaw (global + neck), used to pick the dynamic jaw contour."""
        if self.contour_yaw is not None:
            return self.contour_yaw
        rot = batch_rodrigues(self.params.rotation) @ batch_rodrigues(self.params.neck_pose)
        return yaw_degrees(rot.detach())

    @cached_property
    def sparse_vertices(self) -> torch.Tensor:
        """(B, S, 3) world positions of the vertices `sparse_ids`."""
        return self.landmark_model(self.params).vertices

    def sparse_index(self, vertex_ids: torch.Tensor) -> torch.Tensor | None:
        """Where FLAME vertices `vertex_ids` (any shape) sit in `sparse_vertices`; None when some are not there."""
        lookup = torch.full((self.model.n_vertices,), -1, dtype=torch.long, device=vertex_ids.device)
        lookup[self.sparse_ids] = torch.arange(len(self.sparse_ids), device=vertex_ids.device)
        index = lookup[vertex_ids]
        return None if bool((index < 0).any()) else index

    @cached_property
    def landmarks_3d(self) -> torch.Tensor:
        """(B, L, 3) world landmark positions."""
        return self.landmark_set.positions(self.sparse_vertices, self.yaw_deg)

    def sparse_derivatives(self, fields: Sequence[str]) -> SkinningDerivatives:
        """The factors of the derivatives of `sparse_vertices` in the parameter fields `fields`
        (FlameModel.derivatives), computed once per evaluation."""
        key = tuple(fields)
        cache = self.__dict__.setdefault("_sparse_derivatives", {})
        if key not in cache:
            cache[key] = self.landmark_model.derivatives(self.params, key)
            self.__dict__.setdefault("sparse_vertices", cache[key].vertices + self.params.translation[:, None, :])
        return cache[key]

    def points_jacobian(self, fields: Sequence[str], corners: torch.Tensor, bary: torch.Tensor,
                        left: torch.Tensor) -> torch.Tensor:
        """(B, L, R, P) derivatives of left (B, L, R, 3) @ p for points p = sum_t bary_t v_t on the vertices
        `sparse_vertices`[corners] (corners, bary: (L, T) or (B, L, T)) in the fields `fields` (columns in that
        order: FlameModel.jacobian), without forming the vertices' own derivatives."""
        return self.landmark_model.point_jacobian(self.params, self.sparse_derivatives(fields), fields, corners,
                                                  bary, left)

    def landmarks_jacobian(self, fields: Sequence[str], left: torch.Tensor) -> torch.Tensor:
        """(B, L, R, P) derivatives of left (B, L, R, 3) @ landmarks_3d (the jaw contour's triangles stay those
        `yaw_deg` picks)."""
        return self.points_jacobian(fields, *self.landmark_set.triangles(self.yaw_deg), left)

    @cached_property
    def landmarks_2d(self) -> torch.Tensor:
        """(B, L, 2) projected landmarks, pixels."""
        return self.camera.project(self.landmarks_3d)[0]

    @cached_property
    def vertices(self) -> torch.Tensor:
        """(B, V, 3) all world vertices."""
        return self.model(self.params).vertices

    @cached_property
    def vertices_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vertices (B, V, 2) pixels and their depth (B, V)."""
        return self.camera.project(self.vertices)

    @cached_property
    def screen_vertices(self) -> torch.Tensor:
        """(B, V, 3) vertices in the pixels of obs.images (x, y) with depth (z), for the rasteriser."""
        pix, depth = self.vertices_2d
        return torch.cat([pix * self.obs.image_scale, depth[..., None]], dim=-1)

    @cached_property
    def fragments(self) -> Fragments:
        """Visibility of the full mesh in obs.images' pixels (not differentiable; interpolation is)."""
        if self.rasterizer is None:
            raise RuntimeError("an image term needs a rasterizer: build the Problem with one")
        screen = self.screen_vertices  # computed (and cached) with gradients, outside no_grad
        with torch.no_grad():
            return self.rasterizer(screen.detach(), self.model.faces)

    def field_columns(self, fields: Sequence[str]) -> dict[str, slice]:
        """Where each parameter field's derivatives sit among the P columns of a term's `jacobian`."""
        columns, start = {}, 0
        for name in fields:
            size = getattr(self.params, name).shape[1]
            columns[name] = slice(start, start + size)
            start += size
        return columns

    def interpolate(self, attributes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-vertex attributes (B or 1, V, C) -> image (B, H, W, C) and coverage mask (B, H, W, 1),
        differentiable in the attributes and the vertex positions."""
        return interpolate(self.fragments, self.screen_vertices, self.model.faces, attributes)


class EnergyTerm(Protocol):
    name: str

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        """(B, N) weighted residuals; the energy is their sum of squares.

        A term with discrete choices (correspondences) may also define `prepare(ev) -> state`: solvers call
        it at the start of a round and hand the state back through `ev.term_state[name]`. A term may define
        `jacobian(ev, fields) -> (B, N, P)`, the exact derivatives of its residuals in the per-frame parameter
        fields `fields` (columns as `ev.field_columns`): Levenberg-Marquardt then linearises a problem whose
        terms all have one without evaluating it again (Problem.jacobian "analytic")."""


class ScaledTerm:
    """Another term with its energy multiplied by `factor` (a stage re-weighting a shared term without
    touching its configuration)."""

    def __init__(self, term: EnergyTerm, factor: float):
        self.term = term
        self.factor = factor
        self.name = term.name
        if hasattr(term, "jacobian"):
            self.jacobian = lambda ev, fields: term.jacobian(ev, fields) * factor ** 0.5
        if hasattr(term, "focal_jacobian"):
            self.focal_jacobian = lambda ev: term.focal_jacobian(ev) * factor ** 0.5

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        return self.term(ev) * self.factor ** 0.5

    def prepare(self, ev: Evaluation):
        """The wrapped term's round state (None for a term without discrete choices)."""
        return self.term.prepare(ev) if hasattr(self.term, "prepare") else None


def reweighted(terms: Sequence[EnergyTerm], factors: dict[str, float]) -> list[EnergyTerm]:
    """`terms` with the energy of each term named in `factors` multiplied by its factor (how an image stage
    re-weights the landmark stage's terms); a factor of 0 leaves the term out, which also saves its cost."""
    return [ScaledTerm(term, factors[term.name]) if factors.get(term.name, 1.0) != 1.0 else term
            for term in terms if factors.get(term.name, 1.0) > 0]


ROBUST_KINDS = ("l2", "l1", "huber", "cauchy", "gm")


def robust_ratio(u: torch.Tensor, kind: str) -> torch.Tensor:
    """rho(u) / u for squared, scale-normalised residuals u >= 0 (1 at u = 0 for every kind).

    rho: l2 u; l1 2 sqrt(u); huber u below 1 and 2 sqrt(u) - 1 above; cauchy log(1 + u); gm u / (1 + u).
    """
    if kind == "l2":
        return torch.ones_like(u)
    if kind == "cauchy":
        small = u < 1e-6
        return torch.where(small, 1 - u / 2, torch.log1p(u) / torch.where(small, torch.ones_like(u), u))
    if kind == "gm":
        return 1 / (1 + u)
    root = torch.sqrt(u + 1e-12)
    if kind == "l1":
        return 2 / (root + 1e-6)
    if kind == "huber":
        return torch.where(u < 1, torch.ones_like(u), (2 * root - 1) / (u + 1e-12))
    raise ValueError(f"unknown robust kind {kind}")


def robust_ratio_slope(u: torch.Tensor, kind: str) -> torch.Tensor:
    """d(rho(u) / u) / du, the derivative of `robust_ratio` (its series below small u where it has one)."""
    if kind == "l2":
        return torch.zeros_like(u)
    if kind == "cauchy":
        small = u < 1e-6
        safe = torch.where(small, torch.ones_like(u), u)
        return torch.where(small, -0.5 + 2 * u / 3, (safe / (1 + safe) - torch.log1p(safe)) / safe ** 2)
    if kind == "gm":
        return -1 / (1 + u) ** 2
    root = torch.sqrt(u + 1e-12)
    if kind == "l1":
        return -1 / (root * (root + 1e-6) ** 2)
    if kind == "huber":
        return torch.where(u < 1, torch.zeros_like(u), (1 - root) / (u + 1e-12) ** 2)
    raise ValueError(f"unknown robust kind {kind}")


def robust_residuals(residual: torch.Tensor, scale: float, kind: str) -> torch.Tensor:
    """Residual vectors rescaled so their squared norm is rho(|r|^2 / scale^2).

    residual: (..., D) raw residual vectors -> (..., D); smooth through zero, so Gauss-Newton can use it.
    """
    r = residual / scale
    u = (r * r).sum(-1, keepdim=True)
    return r * torch.sqrt(robust_ratio(u, kind))


def robust_linear_map(residual: torch.Tensor, scale: float, kind: str) -> torch.Tensor:
    """The derivative of `robust_residuals(residual, scale, kind)` in the raw residual vector, per vector:
    residual (..., D) -> (..., D, D), d(r sqrt(ratio(u))) = (sqrt(ratio) I + ratio' / sqrt(ratio) r r^T) dr / scale
    with r = residual / scale and u = |r|^2."""
    r = residual / scale
    u = (r * r).sum(-1, keepdim=True)
    root = torch.sqrt(robust_ratio(u, kind))
    gain = robust_ratio_slope(u, kind) / root.clamp(min=1e-12)
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return (root[..., None] * eye + gain[..., None] * r[..., :, None] * r[..., None, :]) / scale


def robust_jacobian(residual: torch.Tensor, d_residual: torch.Tensor, scale: float, kind: str) -> torch.Tensor:
    """Derivatives of `robust_residuals(residual, scale, kind)` from those of the raw residual vectors.

    residual: (..., D); d_residual: (..., D, P) -> (..., D, P).
    """
    return robust_linear_map(residual, scale, kind) @ d_residual
