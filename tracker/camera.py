"""Pinhole camera shared by all frames of a video.

Conventions: the camera looks along +z with OpenCV axes (x right, y down, z forward). FLAME's world is y-up
with the face looking along +z, so a fixed rotation R = diag(1, -1, -1) turns world into camera coordinates
(t = 0): the head moves, the camera stays. Internally image coordinates are continuous with the image
spanning [0, W] x [0, H] (pixel (i, j) centred at (j + 0.5, i + 0.5)); `opencv_intrinsics` shifts the principal
point by half a pixel for OpenCV's integer-centred pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tracker.errors import TrackerError

WORLD_TO_CAMERA = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
"""Rotation from FLAME's world (y up, face towards +z) to OpenCV camera axes."""


def focal_from_fov(fov_deg: float, size: float) -> float:
    """Focal length in pixels that spans `size` pixels with a field of view of fov_deg."""
    return 0.5 * size / math.tan(math.radians(fov_deg) / 2)


def to_camera(points: torch.Tensor) -> torch.Tensor:
    """World -> camera coordinates. points: (..., 3) -> (..., 3)."""
    return points * WORLD_TO_CAMERA.diagonal().to(points)


def project_points(points_cam: torch.Tensor, focal: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Perspective projection of camera-space points.

    points_cam: (..., 3); focal: () or (..., 1) pixels; center: (2,) principal point -> (..., 2) pixels.
    """
    z = points_cam[..., 2:3].clamp(min=1e-6)
    return points_cam[..., :2] / z * focal + center


FOV_RANGE_DEG = (0.1, 170.0)
"""Fields of view (over the longer image side) a fixed focal length may give: outside, it is a mistake."""


def check_focal(focal: float | None, width: int, height: int) -> None:
    """Refuse a fixed focal length (pixels) whose field of view over the image is outside FOV_RANGE_DEG: a
    focal of 1e30 or 1e-30 px gives NaN parameters, not a result."""
    if focal is None:
        return
    side = max(width, height)
    low, high = (focal_from_fov(fov, side) for fov in reversed(FOV_RANGE_DEG))
    if not low <= focal <= high:
        raise TrackerError(f"camera.focal (--focal) {focal:.6g} px is not a focal length for a {width}x{height} "
                           f"video: give {low:.0f} to {high:.0f} px (a field of view of {FOV_RANGE_DEG[1]:g} to "
                           f"{FOV_RANGE_DEG[0]:g} degrees), or leave it out to estimate it")


@dataclass
class Camera:
    """Intrinsics of one video; focal may be a tensor being optimised."""

    focal: torch.Tensor
    """() focal length in pixels (square pixels)."""
    center: torch.Tensor
    """(2,) principal point in internal image coordinates."""
    height: int
    width: int

    @staticmethod
    def from_image(height: int, width: int, fov_deg: float = 30.0, focal: float | None = None,
                   device: torch.device | str = "cpu") -> "Camera":
        f = focal if focal is not None else focal_from_fov(fov_deg, max(height, width))
        return Camera(torch.tensor(float(f), device=device),
                      torch.tensor([width / 2.0, height / 2.0], device=device), height, width)

    def project(self, points_world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points (..., 3) -> pixels (..., 2) and depth (...,)."""
        cam = to_camera(points_world)
        return project_points(cam, self.focal, self.center), cam[..., 2]

    def projection_jacobian(self, points_world: torch.Tensor) -> torch.Tensor:
        """d pixels / d world point: points (..., 3) -> (..., 2, 3)."""
        cam = to_camera(points_world)
        z = cam[..., 2:3].clamp(min=1e-6)
        scale = (self.focal / z)[..., None]  # (..., 1, 1)
        d_cam = torch.cat([torch.eye(2, dtype=cam.dtype, device=cam.device).expand(*cam.shape[:-1], 2, 2),
                           -(cam[..., :2] / z)[..., None]], dim=-1)  # d pixels / d camera point, over focal / z
        return scale * d_cam * WORLD_TO_CAMERA.diagonal().to(cam)

    def project_jacobian(self, points_world: torch.Tensor, d_points: torch.Tensor) -> torch.Tensor:
        """Derivatives of the projected pixels from those of the world points: points (..., 3) and their
        derivatives (..., 3, P) -> (..., 2, P)."""
        return self.projection_jacobian(points_world) @ d_points

    def intrinsics(self) -> torch.Tensor:
        """(3, 3) K in internal image coordinates."""
        f = self.focal.detach().float()
        K = torch.eye(3, device=f.device)
        K[0, 0] = K[1, 1] = f
        K[:2, 2] = self.center.detach().float()
        return K

    def opencv_intrinsics(self) -> torch.Tensor:
        """(3, 3) K for OpenCV's convention (pixel centres at integer coordinates)."""
        K = self.intrinsics()
        K[:2, 2] -= 0.5
        return K


def rotation_to_camera() -> torch.Tensor:
    """(3, 3) R of the exported extrinsics (world -> camera); the translation t is zero."""
    return WORLD_TO_CAMERA.clone()
