"""The FLAME layer: parameters in, posed vertices out (batched over frames, any vertex subset)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from tracker.flame.lbs import SkinningDerivatives, lbs, lbs_derivatives, point_derivatives, vertex_derivatives
from tracker.flame.loading import FLAME_JOINTS, FlameData

N_JOINTS = FLAME_JOINTS
"""global (root), neck, jaw, left eye, right eye."""
POSE_JOINTS = {"rotation": [0], "neck_pose": [1], "jaw_pose": [2], "eyes_pose": [3, 4]}
"""The FLAME joints each pose field rotates."""


@dataclass
class FlameParams:
    """FLAME parameters for B frames; all rotations axis-angle (radians).

    World vertices = FLAME(shape, expr, pose=[rotation, neck_pose, jaw_pose, eyes_pose], eyelids) + translation.
    """

    shape: torch.Tensor
    """(B or 1, n_shape) identity coefficients; a single row is shared by all frames."""
    expr: torch.Tensor
    """(B, n_expr) expression coefficients."""
    rotation: torch.Tensor
    """(B, 3) global head rotation about FLAME's root joint."""
    neck_pose: torch.Tensor
    """(B, 3) neck joint rotation."""
    jaw_pose: torch.Tensor
    """(B, 3) jaw joint rotation."""
    eyes_pose: torch.Tensor
    """(B, 6) left then right eyeball rotation."""
    eyelids: torch.Tensor
    """(B, 2) left and right eyelid closing coefficients."""
    translation: torch.Tensor
    """(B, 3) world translation, metres."""

    @property
    def batch_size(self) -> int:
        return int(self.expr.shape[0])

    @staticmethod
    def zeros(batch: int, n_shape: int, n_expr: int, device: torch.device | str = "cpu") -> FlameParams:
        def z(*s):
            return torch.zeros(*s, device=device)

        return FlameParams(z(1, n_shape), z(batch, n_expr), z(batch, 3), z(batch, 3), z(batch, 3), z(batch, 6),
                           z(batch, 2), z(batch, 3))

    def full_pose(self) -> torch.Tensor:
        """(B, 15) axis-angle pose of FLAME's 5 joints."""
        return torch.cat([self.rotation, self.neck_pose, self.jaw_pose, self.eyes_pose], dim=1)

    def map(self, fn) -> FlameParams:
        """A copy with fn applied to every tensor."""
        return FlameParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def detach(self) -> FlameParams:
        return self.map(lambda t: t.detach().clone())

    @staticmethod
    def cat(parts: Sequence[FlameParams]) -> FlameParams:
        """The frames of `parts` in one batch; the identity is the first part's (shared)."""
        stacked = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(FlameParams)
                   if f.name != "shape"}
        return FlameParams(shape=parts[0].shape, **stacked)

    def frames(self, index) -> FlameParams:
        """Select frames (shape is shared and kept)."""
        selected = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "shape"}
        return FlameParams(shape=self.shape, **selected)


@dataclass
class FlameOutput:
    vertices: torch.Tensor
    """(B, S, 3) world vertices (S = all vertices or the requested subset)."""
    joints: torch.Tensor
    """(B, 5, 3) posed joints in world space."""


class FlameModel(nn.Module):
    """FLAME as a torch module holding the model arrays as buffers.

    Identity, expression and eyelid directions are concatenated into one blendshape basis so the forward
    pass is a single `lbs` call; the joint regressor is applied to the basis once, here, so a forward on a
    vertex subset (landmark fitting) is exact and cheap.
    """

    def __init__(self, data: FlameData, eyelid_dirs: np.ndarray | None = None):
        super().__init__()
        self.n_shape = data.shape_dirs.shape[2]
        self.n_expr = data.expr_dirs.shape[2]
        self.has_eyelids = eyelid_dirs is not None
        self.sha256 = data.sha256
        self.name = data.name
        self.expression_names = list(data.expression_names)
        n_verts = data.v_template.shape[0]
        eyelids = np.zeros((n_verts, 3, 2), np.float32) if eyelid_dirs is None else eyelid_dirs.astype(np.float32)
        dirs = np.concatenate([data.shape_dirs, data.expr_dirs, eyelids], axis=2)
        reg = data.j_regressor
        self.register_buffer("v_template", torch.from_numpy(data.v_template))
        self.register_buffer("faces", torch.from_numpy(data.faces))
        self.register_buffer("dirs", torch.from_numpy(dirs))
        self.register_buffer("posedirs", torch.from_numpy(data.posedirs))
        self.register_buffer("weights", torch.from_numpy(data.weights))
        # Not a buffer: the kinematic tree stays on the CPU, so walking it never waits for the GPU.
        self.parents = torch.from_numpy(data.parents)
        joint_dirs = np.einsum("jv,vcd->jcd", reg, dirs)
        self.register_buffer("joints_template", torch.from_numpy(reg @ data.v_template))
        self.register_buffer("joint_dirs", torch.from_numpy(joint_dirs))
        # What the derivatives may skip (read here, once: on a GPU every later look would wait for it).
        self.moving_coefficients = np.abs(joint_dirs).max(axis=(0, 1)) > 0
        """(D,) bool: the blendshape coefficients that move a joint."""
        self.pose_correctives = bool(np.any(data.posedirs))
        """Whether the model has pose-corrective blendshapes (the stand-in has none)."""

    def restricted(self, vertex_ids: torch.Tensor) -> FlameModel:
        """A copy that computes only `vertex_ids` (joints stay exact); for landmark-only fitting."""
        sub = FlameModel.__new__(FlameModel)
        nn.Module.__init__(sub)
        for attr in ("n_shape", "n_expr", "has_eyelids", "sha256", "name", "expression_names",
                     "moving_coefficients", "pose_correctives"):
            setattr(sub, attr, getattr(self, attr))
        ids = vertex_ids.to(self.v_template.device)
        cols = (ids[:, None] * 3 + torch.arange(3, device=ids.device)).reshape(-1)
        remap = torch.full((self.n_vertices,), -1, dtype=torch.long, device=ids.device)
        remap[ids] = torch.arange(len(ids), device=ids.device)
        keep = (remap[self.faces] >= 0).all(1)
        for name, value in (("v_template", self.v_template[ids]), ("faces", remap[self.faces[keep]]),
                            ("dirs", self.dirs[ids]), ("posedirs", self.posedirs[:, cols]),
                            ("weights", self.weights[ids]),
                            ("joints_template", self.joints_template), ("joint_dirs", self.joint_dirs)):
            sub.register_buffer(name, value.clone())
        sub.parents = self.parents
        return sub

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def coefficients(self, params: FlameParams) -> torch.Tensor:
        """(B, n_shape + n_expr + 2) blendshape coefficients in the order of `dirs`."""
        B = params.batch_size
        return torch.cat([params.shape.expand(B, -1), params.expr, params.eyelids], dim=1)

    def forward(self, params: FlameParams, vertex_ids: torch.Tensor | None = None) -> FlameOutput:
        """Posed world vertices; vertex_ids (S,) restricts the output to those vertices (for repeated
        subset evaluations, `restricted` avoids re-slicing the buffers each call)."""
        model = self if vertex_ids is None else self.restricted(vertex_ids)
        vertices, joints = lbs(
            model.coefficients(params), params.full_pose(), model.v_template, model.dirs, model.posedirs,
            model.joints_template, model.joint_dirs, model.parents, model.weights,
        )
        t = params.translation[:, None, :]
        return FlameOutput(vertices + t, joints + t)

    def derivatives(self, params: FlameParams, fields: Sequence[str]) -> SkinningDerivatives:
        """The factors of the vertices' exact derivatives in the per-frame parameter fields `fields` (FlameParams
        names; `lbs_derivatives`), for `jacobian` and `point_jacobian`."""
        spans = self._coefficient_spans(params)
        blend = [spans[f] for f in fields if f in spans]
        low = min((a for a, _ in blend), default=0)
        high = max((b for _, b in blend), default=0)
        joint_ids = [j for f in fields if f in POSE_JOINTS for j in POSE_JOINTS[f]]
        return lbs_derivatives(
            self.coefficients(params), params.full_pose(), self.v_template, self.dirs, self.posedirs,
            self.joints_template, self.joint_dirs, self.parents, self.weights, slice(low, high), joint_ids,
            bool(self.moving_coefficients[low:high].any()), self.pose_correctives)

    def jacobian(self, params: FlameParams, fields: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed world vertices (B, S, 3) and their exact derivatives (B, S, 3, P) in the per-frame parameter
        fields `fields` (FlameParams names), columns in that order and each field's own order; a shared
        `shape` gives every frame's derivative in the one identity."""
        d = self.derivatives(params, fields)
        d_coeffs, d_pose = vertex_derivatives(d)
        B, S = d.vertices.shape[:2]
        eye = torch.eye(3, dtype=d.vertices.dtype, device=d.vertices.device).expand(B, S, 3, 3)
        return d.vertices + params.translation[:, None, :], self._columns(params, fields, d_coeffs, d_pose, eye)

    def point_jacobian(self, params: FlameParams, d: SkinningDerivatives, fields: Sequence[str],
                       corners: torch.Tensor, bary: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """Derivatives (B, L, R, P) of left (B, L, R, 3) @ p for world points p = sum_t bary_t vertex[corners_t]
        (corners, bary: (L, T) or (B, L, T); `point_derivatives`), columns as `jacobian`'s; d: `derivatives`
        at params for `fields`."""
        moved = left * bary.sum(-1)[..., None, None]  # a translation moves every point with it
        return self._columns(params, fields, *point_derivatives(d, corners, bary, left), moved)

    def _coefficient_spans(self, params: FlameParams) -> dict[str, tuple[int, int]]:
        n_shape, n_expr = params.shape.shape[1], params.expr.shape[1]
        return {"shape": (0, n_shape), "expr": (n_shape, n_shape + n_expr),
                "eyelids": (n_shape + n_expr, n_shape + n_expr + params.eyelids.shape[1])}

    def _columns(self, params: FlameParams, fields: Sequence[str], d_coeffs: torch.Tensor, d_pose: torch.Tensor,
                 d_translation: torch.Tensor) -> torch.Tensor:
        """The fields' columns side by side (..., P) from the coefficient, joint and translation blocks."""
        spans = self._coefficient_spans(params)
        low = min((spans[f][0] for f in fields if f in spans), default=0)
        blocks, pose_at = [], 0
        for f in fields:
            if f in spans:
                blocks.append(d_coeffs[..., spans[f][0] - low:spans[f][1] - low])
            elif f in POSE_JOINTS:
                width = 3 * len(POSE_JOINTS[f])
                blocks.append(d_pose[..., pose_at:pose_at + width])
                pose_at += width
            elif f == "translation":
                blocks.append(d_translation)
            else:
                raise ValueError(f"no derivative for FLAME parameter field {f!r}")
        return torch.cat(blocks, dim=-1)
