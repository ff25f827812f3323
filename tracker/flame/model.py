"""The FLAME layer: parameters in, posed vertices out (batched over frames, any vertex subset)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from tracker.flame.lbs import lbs
from tracker.flame.loading import FLAME_JOINTS, FlameData

N_JOINTS = FLAME_JOINTS
"""global (root), neck, jaw, left eye, right eye."""


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
        self.register_buffer("joints_template", torch.from_numpy(reg @ data.v_template))
        self.register_buffer("joint_dirs", torch.from_numpy(np.einsum("jv,vcd->jcd", reg, dirs)))

    def restricted(self, vertex_ids: torch.Tensor) -> FlameModel:
        """A copy that computes only `vertex_ids` (joints stay exact); for landmark-only fitting."""
        sub = FlameModel.__new__(FlameModel)
        nn.Module.__init__(sub)
        for attr in ("n_shape", "n_expr", "has_eyelids", "sha256", "name", "expression_names"):
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
