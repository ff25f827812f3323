"""FLAME's linear blend skinning as small pure functions on tensors.

Notation: B batch (frames), V vertices, J joints (5 for FLAME), D blendshape coefficients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blend_shapes(coeffs: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Linear blendshape offsets.

    coeffs: (B, D); dirs: (V, 3, D) -> offsets (B, V, 3).
    """
    V = dirs.shape[0]
    return (coeffs @ dirs.reshape(V * 3, -1).T).view(-1, V, 3)


def vertices2joints(regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Joint locations regressed from vertices.

    regressor: (J, V); vertices: (B, V, 3) -> joints (B, J, 3).
    """
    return torch.einsum("jv,bvc->bjc", regressor, vertices)


def batch_rodrigues(axis_angle: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rotation matrices from axis-angle vectors.

    axis_angle: (N, 3) -> rotations (N, 3, 3). Smooth at zero (the eps keeps the gradient finite).
    """
    angle = torch.linalg.norm(axis_angle + eps, dim=1, keepdim=True)  # (N, 1)
    axis = axis_angle / angle
    cos = torch.cos(angle)[:, :, None]
    sin = torch.sin(angle)[:, :, None]
    x, y, z = axis.unbind(dim=1)
    zeros = torch.zeros_like(x)
    skew = torch.stack([zeros, -z, y, z, zeros, -x, -y, x, zeros], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)[None]
    return eye + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def matrix_to_axis_angle(rot: torch.Tensor) -> torch.Tensor:
    """Axis-angle vectors from rotation matrices (inverse of batch_rodrigues for angles < pi).

    rot: (N, 3, 3) -> (N, 3).
    """
    cos = ((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1 + 1e-7, 1 - 1e-7)
    angle = torch.acos(cos)
    vec = torch.stack(
        [rot[:, 2, 1] - rot[:, 1, 2], rot[:, 0, 2] - rot[:, 2, 0], rot[:, 1, 0] - rot[:, 0, 1]], dim=1
    )
    sin = torch.sin(angle)
    scale = torch.where(sin.abs() < 1e-6, 0.5 * torch.ones_like(angle), angle / (2 * sin))
    return vec * scale[:, None]


def transform_matrix(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Homogeneous 4x4 transforms from rotations (N, 3, 3) and translations (N, 3, 1) -> (N, 4, 4)."""
    top = torch.cat([rot, trans], dim=2)  # (N, 3, 4)
    return F.pad(top, (0, 0, 0, 1)) + F.pad(torch.ones_like(trans[:, :1, :1]), (3, 0, 3, 0))


def batch_rigid_transform(
    rot_mats: torch.Tensor, joints: torch.Tensor, parents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose a kinematic tree.

    rot_mats: (B, J, 3, 3) local joint rotations; joints: (B, J, 3) rest joint locations;
    parents: (J,) parent index of each joint (-1 for the root, parents before children).
    Returns posed joints (B, J, 3) and relative transforms (B, J, 4, 4) that map rest-pose points
    to posed points for a vertex bound fully to that joint.
    """
    B, J = joints.shape[:2]
    rel_joints = joints.clone()
    rel_joints[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = transform_matrix(rot_mats.reshape(-1, 3, 3), rel_joints.reshape(-1, 3, 1)).view(B, J, 4, 4)
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(torch.matmul(chain[int(parents[j])], local[:, j]))
    world = torch.stack(chain, dim=1)  # (B, J, 4, 4)
    posed_joints = world[:, :, :3, 3]
    # Remove the rest-pose joint location so the transform acts on rest-pose vertices.
    rest = torch.matmul(world[:, :, :3, :3], joints[..., None])[..., 0]
    relative = world.clone()
    relative[:, :, :3, 3] = world[:, :, :3, 3] - rest
    return posed_joints, relative


def skin_vertices(vertices: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning.

    vertices: (B, V, 3) rest-pose vertices; weights: (V, J); transforms: (B, J, 4, 4) -> (B, V, 3).
    """
    B, J = transforms.shape[:2]
    T = (weights @ transforms[:, :, :3].reshape(B, J, 12)).view(B, -1, 3, 4)  # (B, V, 3, 4)
    return (T[..., :3] @ vertices[..., None])[..., 0] + T[..., 3]


def pose_feature(rot_mats: torch.Tensor) -> torch.Tensor:
    """Pose-corrective blendshape coefficients: (R - I) of every non-root joint.

    rot_mats: (B, J, 3, 3) -> (B, 9 * (J - 1)).
    """
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    return (rot_mats[:, 1:] - eye).reshape(rot_mats.shape[0], -1)


def lbs(
    coeffs: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    dirs: torch.Tensor,
    posedirs: torch.Tensor,
    joints_template: torch.Tensor,
    joint_dirs: torch.Tensor,
    parents: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAME forward pass on any subset of vertices.

    The joints come from precomputed regressions of the template and of the blendshape directions
    (J_regressor @ v_template, J_regressor @ dirs), which is exact because the regression is linear;
    this lets callers skin only the vertices they need (e.g. the landmark triangles).

    coeffs: (B, D) blendshape coefficients (shape, expression, eyelids concatenated);
    pose: (B, J * 3) axis-angle per joint; v_template: (V, 3); dirs: (V, 3, D);
    posedirs: (9 * (J - 1), V * 3); joints_template: (J, 3); joint_dirs: (J, 3, D);
    parents: (J,); weights: (V, J).
    Returns vertices (B, V, 3) and posed joints (B, J, 3).
    """
    B = coeffs.shape[0]
    v_shaped = v_template[None] + blend_shapes(coeffs, dirs)
    joints = joints_template[None] + blend_shapes(coeffs, joint_dirs)
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(B, -1, 3, 3)
    v_posed = v_shaped + (pose_feature(rot_mats) @ posedirs).view(B, -1, 3)
    posed_joints, transforms = batch_rigid_transform(rot_mats, joints, parents)
    return skin_vertices(v_posed, weights, transforms), posed_joints
