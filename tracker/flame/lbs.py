"""FLAME's linear blend skinning as small pure functions on tensors.

Notation: B batch (frames), V vertices, J joints (5 for FLAME), D blendshape coefficients.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

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
    v_posed, _, posed_joints, transforms = pose_rest_vertices(coeffs, pose, v_template, dirs, posedirs,
                                                              joints_template, joint_dirs, parents)
    return skin_vertices(v_posed, weights, transforms), posed_joints


def pose_rest_vertices(
    coeffs: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    dirs: torch.Tensor,
    posedirs: torch.Tensor,
    joints_template: torch.Tensor,
    joint_dirs: torch.Tensor,
    parents: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything of `lbs` before skinning (arguments as there): the rest-pose vertices with shape, expression
    and pose correctives (B, V, 3), the joint rotations (B, J, 3, 3), the posed joints (B, J, 3) and the
    relative transforms (B, J, 4, 4)."""
    B = coeffs.shape[0]
    v_shaped = v_template[None] + blend_shapes(coeffs, dirs)
    joints = joints_template[None] + blend_shapes(coeffs, joint_dirs)
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(B, -1, 3, 3)
    v_posed = v_shaped + (pose_feature(rot_mats) @ posedirs).view(B, -1, 3)
    return (v_posed, rot_mats, *batch_rigid_transform(rot_mats, joints, parents))


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices [v]_x with [v]_x w = v x w. v: (..., 3) -> (..., 3, 3)."""
    x, y, z = v.unbind(-1)
    zeros = torch.zeros_like(x)
    return torch.stack([zeros, -z, y, z, zeros, -x, -y, x, zeros], dim=-1).view(*v.shape, 3)


def left_jacobian(axis_angle: torch.Tensor) -> torch.Tensor:
    """Left Jacobian of SO(3): R(w + dw) = Exp(J_l(w) dw) R(w) to first order.

    axis_angle: (N, 3) -> (N, 3, 3); J_l = I + (1 - cos t) / t^2 [w]_x + (t - sin t) / t^3 [w]_x^2 (series
    below small angles, where the closed form loses its digits).
    """
    angle = torch.linalg.norm(axis_angle, dim=1)[:, None, None]
    small = angle < 1e-3
    safe = torch.where(small, torch.ones_like(angle), angle)
    a = torch.where(small, 0.5 - angle ** 2 / 24, (1 - torch.cos(safe)) / safe ** 2)
    b = torch.where(small, 1 / 6 - angle ** 2 / 120, (safe - torch.sin(safe)) / safe ** 3)
    k = skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)[None]
    return eye + a * k + b * (k @ k)


@lru_cache(maxsize=8)
def subtree_masks(parents: tuple[int, ...]) -> torch.Tensor:
    """(J, J) bool: [k, j] when joint j is k or one of its descendants (parents before children)."""
    J = len(parents)
    masks = torch.eye(J, dtype=torch.bool)
    for j in range(1, J):
        masks[:, j] |= masks[:, parents[j]]
    return masks


class SkinningDerivatives(NamedTuple):
    """The factors that the derivatives of skinned vertices are composed of (`lbs_derivatives`), so that a
    caller needing only linear combinations of vertices (landmarks on triangles, points on edges) composes
    those without forming every vertex's columns (`point_derivatives`; `vertex_derivatives` forms them).
    K joints are differentiated, Dc coefficients."""

    vertices: torch.Tensor
    """(B, V, 3) posed vertices (before the global translation)."""
    rotation: torch.Tensor
    """(B, V, 3, 3) each vertex's blended skinning rotation."""
    dirs: torch.Tensor
    """(V, 3, Dc) the differentiated coefficients' blendshape directions."""
    shifts: torch.Tensor | None
    """(B, J, 3, Dc) how the coefficients shift the skinning transforms by moving the joints (None: they don't)."""
    weights: torch.Tensor
    """(V, J) skinning weights."""
    axes: torch.Tensor
    """(B, K, 3, 3) column i: the world axis that joint k's axis-angle component i turns about."""
    arms: torch.Tensor
    """(B, V, K, 3) each vertex's part skinned to joint k's subtree, from k's posed location."""
    offsets: torch.Tensor | None
    """(B, V, 3, 3K) rest-pose change of the pose correctives per axis-angle component (None: no correctives)."""


def lbs_derivatives(
    coeffs: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    dirs: torch.Tensor,
    posedirs: torch.Tensor,
    joints_template: torch.Tensor,
    joint_dirs: torch.Tensor,
    parents: torch.Tensor,
    weights: torch.Tensor,
    coeff_range: slice,
    joint_ids: list[int],
    moving_joints: bool = True,
    pose_correctives: bool = True,
) -> SkinningDerivatives:
    """`lbs` and the factors of its exact derivatives in the blendshape coefficients `coeff_range` and the
    axis-angle rotations of the joints `joint_ids` (what a Gauss-Newton solver needs, without differencing).

    Blendshapes: with the pose held the vertices are affine in the coefficients, so a column is the skinning
    rotation applied to the direction, plus the shift of the transforms where the direction moves the joints.
    Joint k: rotating it by dw moves a vertex by (R_parent J_l dw) x m, where m is the vertex's part skinned to
    k's subtree measured from k's posed location and R_parent the world rotation of k's parent, plus the
    pose-corrective blendshapes' change skinned like the vertex.

    Arguments as `lbs`; joint_ids: joints (0 = root); moving_joints / pose_correctives: False when the model
    says those coefficients' joint_dirs / its posedirs are zero (skips their terms, without reading the
    tensors: no device sync).
    """
    B, J = coeffs.shape[0], joints_template.shape[0]
    V = v_template.shape[0]
    axis_angle = pose.reshape(B, J, 3)
    v_posed, rot_mats, posed_joints, transforms = pose_rest_vertices(coeffs, pose, v_template, dirs, posedirs,
                                                                     joints_template, joint_dirs, parents)
    blended = (weights @ transforms[:, :, :3].reshape(B, J, 12)).view(B, V, 3, 4)
    rotation = blended[..., :3]
    vertices = (rotation @ v_posed[..., None])[..., 0] + blended[..., 3]
    world_rot = transforms[..., :3, :3]  # (B, J, 3, 3)
    shifts = None
    if moving_joints:
        # The transforms' translations t_j - R_j J_j are linear in the rest joints: walk the tree with the moves.
        moved = joint_dirs[:, :, coeff_range]  # (J, 3, Dc) how each coefficient moves the rest joints
        shift = [moved[0].expand(B, 3, -1)]
        for j in range(1, J):
            parent = int(parents[j])
            shift.append(world_rot[:, parent] @ (moved[j] - moved[parent]) + shift[parent])
        shifts = torch.stack(shift, dim=1) - world_rot @ moved[None]  # (B, J, 3, Dc)
    K = len(joint_ids)
    ids = torch.tensor(joint_ids, dtype=torch.long, device=pose.device)
    parent_ids = torch.tensor([int(parents[k]) + 1 for k in joint_ids], dtype=torch.long, device=pose.device)
    per_joint = torch.einsum("bjcd,bvd->bvjc", world_rot, v_posed) + transforms[:, None, :, :3, 3]  # (B, V, J, 3)
    sub_weights = weights[None] * subtree_masks(tuple(parents.tolist())).to(weights)[ids][:, None]  # (K, V, J)
    arms = torch.einsum("kvj,bvjc->bvkc", sub_weights, per_joint) \
        - sub_weights.sum(-1).T[None, ..., None] * posed_joints[:, None, ids]
    left = left_jacobian(axis_angle[:, ids].reshape(-1, 3)).view(B, K, 3, 3)
    eye = torch.eye(3, dtype=coeffs.dtype, device=coeffs.device).expand(B, 1, 3, 3)
    parent_rot = torch.cat([eye, world_rot], dim=1)[:, parent_ids]  # the root's parent: the identity
    offsets = None
    if pose_correctives and K:  # d(R_k - I)/dw_i = [J_l e_i]_x R_k (none for the root)
        rows = torch.cat([posedirs.new_zeros(1, 9, V * 3), posedirs.view(J - 1, 9, V * 3)])[ids]  # (K, 9, V * 3)
        d_rot = skew(left.transpose(2, 3)) @ rot_mats[:, ids, None]  # (B, K, 3 (i), 3, 3)
        offsets = torch.einsum("bkix,kxvc->bvcki", d_rot.flatten(-2), rows.view(K, 9, V, 3)).reshape(B, V, 3, 3 * K)
    return SkinningDerivatives(vertices, rotation, dirs[:, :, coeff_range], shifts, weights, parent_rot @ left,
                               arms, offsets)


def rotation_columns(axes: torch.Tensor, arms: torch.Tensor) -> torch.Tensor:
    """How turning the joints moves points: axes (B, K, 3, 3) (column i, the axis component i turns about),
    arms (B, N, K, 3) -> (B, N, 3, 3K), column (k, i) = axis_ki x arm_k."""
    B, N, K, _ = arms.shape
    axes = axes[:, None]  # (B, 1, K, 3 (c), 3 (i))
    # (axis_i x m)_c = a_c1 m_c2 - a_c2 m_c1 for (c, c1, c2) cyclic, written in place -> (B, N, 3 (c), K, 3 (i))
    out = arms.new_empty(B, N, 3, K, 3)
    for c in range(3):
        c1, c2 = (c + 1) % 3, (c + 2) % 3
        torch.mul(axes[..., c1, :], arms[..., c2, None], out=out[:, :, c])
        out[:, :, c].addcmul_(axes[..., c2, :], arms[..., c1, None], value=-1)
    return out.view(B, N, 3, 3 * K)


def vertex_derivatives(d: SkinningDerivatives) -> tuple[torch.Tensor, torch.Tensor]:
    """Every vertex's derivatives: in the coefficients (B, V, 3, Dc) and the joints' axis-angles (B, V, 3, 3K)."""
    B = d.vertices.shape[0]
    d_coeffs = d.rotation @ d.dirs[None]
    if d.shifts is not None:
        d_coeffs = d_coeffs + (d.weights @ d.shifts.reshape(B, d.shifts.shape[1], -1)).view(d_coeffs.shape)
    d_pose = rotation_columns(d.axes, d.arms)
    if d.offsets is not None:
        d_pose = d_pose + d.rotation @ d.offsets
    return d_coeffs, d_pose


def point_derivatives(d: SkinningDerivatives, corners: torch.Tensor, bary: torch.Tensor,
                      left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of left @ p for points p = sum_t bary_t vertex[corners_t] (landmarks on triangles, points on
    edges), composed from the factors without forming each vertex's columns.

    corners: (L, T) vertex indices shared by the frames, or (B, L, T) per frame; bary: the same shape;
    left: (B, L, R, 3). Returns (B, L, R, Dc) and (B, L, R, 3K).
    """
    B, L, R, _ = left.shape
    T = corners.shape[-1]
    shared = corners.dim() == 2
    flat = corners.reshape(-1)

    def at_corners(x: torch.Tensor) -> torch.Tensor:  # (B, V, ...) -> (B, L, T, ...)
        if shared:
            return x.index_select(1, flat).view(B, L, T, *x.shape[2:])
        return x[torch.arange(B, device=x.device)[:, None], corners.view(B, -1)].view(B, L, T, *x.shape[2:])

    w = bary if shared else bary.view(B, L, T)
    w = w.expand(B, L, T)
    # Each corner's rotation seen through left, weighted: (B, L, T, R, 3).
    seen = (left[:, :, None] @ at_corners(d.rotation)) * w[..., None, None]
    Dc = d.dirs.shape[-1]
    if shared:  # one product per point with its corners' directions, all frames at once
        dirs = d.dirs.index_select(0, flat).view(L, T * 3, Dc)
        lhs = seen.permute(1, 0, 3, 2, 4).reshape(L, B * R, T * 3)
        d_coeffs = torch.bmm(lhs, dirs).view(L, B, R, Dc).transpose(0, 1)
    else:
        dirs = d.dirs[corners.view(B, -1)].view(B, L, T * 3, Dc)
        d_coeffs = seen.transpose(2, 3).reshape(B, L, R, T * 3) @ dirs
    if d.shifts is not None:  # sum_j (the points' skinning weight of j) left @ shift_j, as one product
        J = d.shifts.shape[1]
        point_weights = (w[..., None] * at_corners(d.weights[None].expand(B, -1, -1))).sum(2)  # (B, L, J)
        lhs = (point_weights[:, :, None, :, None] * left[:, :, :, None, :]).reshape(B, L * R, J * 3)
        d_coeffs = d_coeffs + torch.bmm(lhs, d.shifts.reshape(B, J * 3, Dc)).view(B, L, R, Dc)
    arms = (w[..., None, None] * at_corners(d.arms)).sum(2)  # (B, L, K, 3): the points' arms
    d_pose = left @ rotation_columns(d.axes, arms)
    if d.offsets is not None:
        d_pose = d_pose + (seen @ at_corners(d.offsets)).sum(2)
    return d_coeffs, d_pose

