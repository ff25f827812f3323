"""Camera effects applied to a rendered frame: occluding object, defocus and motion blur, sensor noise.

All functions take and return (H, W, 3) float32 RGB in [0, 1] (values may leave [0, 1] after noise; the
writer clips and rounds to 8 bits).
"""

from __future__ import annotations

import cv2
import numpy as np

OCCLUDER_SUPERSAMPLE = 4
"""The occluder's edge is drawn at this many times the resolution, then averaged (antialiasing)."""


def draw_occluder(image: np.ndarray, ellipse: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Composite a softly shaded ellipse (a hand or an object held in front of the face).

    ellipse: (6,) visible (0/1), centre x, y (pixels, pixel centres at +0.5), radii x, y, angle (degrees).
    rgb: (3,) base colour.
    """
    visible, cx, cy, rx, ry, angle = ellipse
    if visible < 0.5 or rx < 1 or ry < 1:
        return image
    height, width = image.shape[:2]
    k = OCCLUDER_SUPERSAMPLE
    big = np.zeros((height * k, width * k), np.uint8)
    cv2.ellipse(big, (int(round((cx - 0.5) * k)), int(round((cy - 0.5) * k))),
                (int(round(rx * k)), int(round(ry * k))), float(angle), 0, 360, 255, thickness=-1)
    alpha = cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    ys = (np.arange(height, dtype=np.float32) + 0.5 - cy) / max(ry, 1.0)
    shade = np.clip(1.05 - 0.25 * ys, 0.7, 1.1)[:, None, None]  # lit from above
    return image * (1 - alpha[..., None]) + (rgb[None, None] * shade) * alpha[..., None]


def motion_blur(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Average of the image shifted along `displacement` (2,) pixels (the path during the exposure)."""
    length = float(np.hypot(*displacement))
    if length < 1.0:
        return image
    size = int(np.ceil(length)) * 2 + 1
    kernel = np.zeros((size, size), np.float32)
    centre = size // 2
    half = displacement / 2
    cv2.line(kernel, (int(round(centre - half[0])), int(round(centre - half[1]))),
             (int(round(centre + half[0])), int(round(centre + half[1]))), 1.0, thickness=1)
    return cv2.filter2D(image, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)


def defocus(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of standard deviation sigma_px (none below 0.2 px)."""
    return image if sigma_px < 0.2 else cv2.GaussianBlur(image, (0, 0), sigma_px)


def sensor_noise(image: np.ndarray, sigma_levels: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of sigma_levels 8-bit levels."""
    return image + rng.normal(0.0, sigma_levels / 255.0, image.shape).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
