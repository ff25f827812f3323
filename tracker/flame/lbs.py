"""FLAME's linear blend skinning as small pure functions on tensors.

Notation: B batch (frames), V vertices, J joints (5 for FLAME), D blendshape coefficients.
"""

from __future__ import annotations

from functools import lru_cache

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


def lbs_jacobian(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lbs` and its exact derivatives in the blendshape coefficients `coeff_range` and the axis-angle rotations
    of the joints `joint_ids` (what a Gauss-Newton solver needs, without differencing the model).

    Blendshapes: with the pose held the vertices are affine in the coefficients, so a column is the skinning
    rotation applied to the direction, plus the shift of the transforms where the direction moves the joints.
    Joint k: rotating it by dw moves a vertex by (R_parent J_l dw) x m, where m is the vertex's part skinned to
    k's subtree measured from k's posed location and R_parent the world rotation of k's parent, plus the
    pose-corrective blendshapes' change skinned like the vertex.

    Arguments as `lbs`; joint_ids: joints (0 = root); moving_joints / pose_correctives: False when the model
    says those coefficients' joint_dirs / its posedirs are zero (skips their terms, without reading the
    tensors: no device sync). Returns vertices (B, V, 3), d_coeffs (B, V, 3, Dc) and
    d_pose (B, V, 3, 3 * len(joint_ids)) (each joint's 3 axis-angle components in turn).
    """
    B, J = coeffs.shape[0], joints_template.shape[0]
    V = v_template.shape[0]
    axis_angle = pose.reshape(B, J, 3)
    v_posed, rot_mats, posed_joints, transforms = pose_rest_vertices(coeffs, pose, v_template, dirs, posedirs,
                                                                     joints_template, joint_dirs, parents)
    blended = (weights @ transforms[:, :, :3].reshape(B, J, 12)).view(B, V, 3, 4)
    rotation = blended[..., :3]  # (B, V, 3, 3) each vertex's blended skinning rotation
    vertices = (rotation @ v_posed[..., None])[..., 0] + blended[..., 3]

    d_coeffs = rotation @ dirs[None, :, :, coeff_range]  # (B, V, 3, Dc)
    moved = joint_dirs[:, :, coeff_range]  # (J, 3, Dc) how each coefficient moves the rest joints
    world_rot = transforms[..., :3, :3]  # (B, J, 3, 3)
    if moving_joints:
        # The transforms' translations t_j - R_j J_j are linear in the rest joints: walk the tree with the moves.
        shift = [moved[0].expand(B, 3, -1)]
        for j in range(1, J):
            parent = int(parents[j])
            shift.append(world_rot[:, parent] @ (moved[j] - moved[parent]) + shift[parent])
        shifts = torch.stack(shift, dim=1) - world_rot @ moved[None]  # (B, J, 3, Dc)
        d_coeffs = d_coeffs + (weights @ shifts.reshape(B, J, -1)).view(d_coeffs.shape)

    if not joint_ids:
        return vertices, d_coeffs, vertices.new_zeros(B, V, 3, 0)
    K = len(joint_ids)
    ids = torch.tensor(joint_ids, device=pose.device)
    parent_ids = torch.tensor([int(parents[k]) + 1 for k in joint_ids], device=pose.device)  # 0: the root's parent
    # m: each vertex's part skinned to joint k's subtree, from k's posed location (B, V, K, 3).
    per_joint = torch.einsum("bjcd,bvd->bvjc", world_rot, v_posed) + transforms[:, None, :, :3, 3]  # (B, V, J, 3)
    sub_weights = weights[None] * subtree_masks(tuple(parents.tolist())).to(weights)[ids][:, None]  # (K, V, J)
    m = torch.einsum("kvj,bvjc->bvkc", sub_weights, per_joint) \
        - sub_weights.sum(-1).T[None, ..., None] * posed_joints[:, None, ids]
    left = left_jacobian(axis_angle[:, ids].reshape(-1, 3)).view(B, K, 3, 3)
    eye = torch.eye(3, dtype=coeffs.dtype, device=coeffs.device).expand(B, 1, 3, 3)
    parent_rot = torch.cat([eye, world_rot], dim=1)[:, parent_ids]  # the root's parent: the identity
    axes = (parent_rot @ left)[:, None]  # (B, 1, K, 3 (c), 3 (i)): column i, the axis component i turns about
    # (axis_i x m)_c = a_c1 m_c2 - a_c2 m_c1 for (c, c1, c2) cyclic, written in place -> (B, V, 3 (c), K, 3 (i))
    d_pose = m.new_empty(B, V, 3, K, 3)
    for c in range(3):
        c1, c2 = (c + 1) % 3, (c + 2) % 3
        torch.mul(axes[..., c1, :], m[..., c2, None], out=d_pose[:, :, c])
        d_pose[:, :, c].addcmul_(axes[..., c2, :], m[..., c1, None], value=-1)
    if pose_correctives:  # d(R_k - I)/dw_i = [J_l e_i]_x R_k (none for the root)
        rows = torch.cat([posedirs.new_zeros(1, 9, V * 3), posedirs.view(J - 1, 9, V * 3)])[ids]  # (K, 9, V * 3)
        d_rot = skew(left.transpose(2, 3)) @ rot_mats[:, ids, None]  # (B, K, 3 (i), 3, 3)
        d_offsets = torch.einsum("bkix,kxvc->bvcki", d_rot.flatten(-2), rows.view(K, 9, V, 3))  # (B, V, 3, K, 3)
        d_pose = d_pose + (rotation @ d_offsets.reshape(B, V, 3, 3 * K)).view(B, V, 3, K, 3)
    return vertices, d_coeffs, d_pose.reshape(B, V, 3, 3 * K)
