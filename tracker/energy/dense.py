"""DenseMarks energies: tie the FLAME mesh to per-pixel canonical-cube predictions (uvw maps of a head crop).

Both terms compare against maps precomputed per frame (no gradient reaches the network) and read them from
`Observations.extras` (keys below; frames first):

- `DenseRenderEnergy`, render-and-compare in cube space: the mesh coloured by its canonical map c_v is rendered
  into the crop and compared, robustly, with the predicted uvw wherever the mesh covers a pixel whose prediction
  lies near the head surface. Gradients come from interpolation (visibility is fixed per step).
- `DenseCorrespondenceEnergy`, 2D-3D correspondences as in Pixel3DMM's UV loss: for sampled vertices the pixel
  whose predicted uvw is nearest to c_v (KD-tree over the map), gated by cube distance, visibility and image
  distance, gives a fixed target; the residual is the robust reprojection error. Matches do not depend on the
  pose, so `match_uvw` runs once per frame and only the gates (`correspondence_weights`) are refreshed.

Maps live in crop pixels (tracker convention, centres at +0.5) at the resolution chosen for fitting; a per-frame
affine takes video pixels there. Residuals are scaled by the crop (cube units, or crop sides), so weights do
not depend on the video's resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from tracker.densemarks.canonical import apply_crop_affine, render_attributes
from tracker.energy.base import Evaluation, robust_linear_map, robust_residuals
from tracker.flame.model import FlameModel
from tracker.render import rasterize

UVW = "densemarks_uvw"
"""(B, S, S, 3) predicted cube coordinates in the fitting crop."""
VALID = "densemarks_valid"
"""(B, S, S) 1 where the prediction lies near the head surface in cube space, else 0."""
TO_CROP = "densemarks_to_crop"
"""(B, 2, 3) affine from video pixels to fitting-crop pixels."""
CROP_PX = "densemarks_crop_px"
"""(B,) crop side in video pixels (residual scale)."""
CORR_TARGET = "densemarks_corr_target"
"""(B, K, 2) matched position of each sampled vertex, video pixels."""
CORR_WEIGHT = "densemarks_corr_weight"
"""(B, K) 1 for kept correspondences, 0 for gated ones."""


@dataclass
class DenseRenderConfig:
    weight: float = 1.0
    """Weight of the canonical-cube render-and-compare term (used by the DenseMarks stage; 0 = off)."""
    robust: str = "cauchy"
    """Robust loss on the per-pixel cube difference: l2 | l1 | huber | cauchy | gm."""
    scale: float = 0.02
    """Residual scale of the robust loss, cube units."""
    resolution: int = 128
    """Side of the crop (pixels) in which the mesh is rendered and compared."""
    valid_distance: float = 0.04
    """Predictions farther than this (cube units) from every canonical-map vertex are ignored (background)."""


@dataclass
class DenseCorrespondenceConfig:
    weight: float = 1.0
    """Weight of the nearest-canonical-coordinate correspondence term (used by the DenseMarks stage; 0 = off)."""
    robust: str = "cauchy"
    """Robust loss on the reprojection error: l2 | l1 | huber | cauchy | gm."""
    scale: float = 0.01
    """Residual scale of the robust loss, fraction of the crop side."""
    vertices: int = 2000
    """Vertices sampled for correspondences (eyeballs excluded)."""
    search_resolution: int = 256
    """Side (pixels) of the map searched for the nearest canonical coordinate."""
    max_cube_distance: float = 0.02
    """Gate: matches farther than this from c_v in the cube are dropped."""
    max_image_distance: float = 0.1
    """Gate: matches farther than this (fraction of the crop side) from the vertex's projection are dropped."""
    min_facing: float = 0.05
    """Gate: vertices seen at a grazing angle (normal . view below this) are dropped."""


class DenseRenderEnergy:
    """sum over valid covered pixels rho(|c(pixel) - uvw(pixel)|^2 / scale^2) / #valid pixels, times weight."""

    name = "dense_render"

    def __init__(self, cfg: DenseRenderConfig, canonical: torch.Tensor,
                 rasterizer: Callable = rasterize):
        self.cfg = cfg
        self.canonical = canonical
        """(V, 3) canonical map c_v."""
        self.rasterizer = rasterizer

    def render(self, ev: Evaluation) -> tuple[torch.Tensor, torch.Tensor]:
        """The mesh coloured by c_v in the fitting crop: (B, S, S, 3) and coverage (B, S, S, 1)."""
        extras = ev.obs.extras
        pixels, depth = ev.vertices_2d
        screen = torch.cat([apply_crop_affine(extras[TO_CROP], pixels), depth[..., None]], dim=-1)
        return render_attributes(screen, ev.model.faces, self.canonical[None], extras[UVW].shape[1], self.rasterizer)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        extras = ev.obs.extras
        rendered, covered = self.render(ev)
        valid = extras[VALID][..., None]
        diff = (rendered - extras[UVW]) * (covered * valid)
        count = valid.flatten(1).sum(-1).clamp(min=1.0)
        scale = (self.cfg.weight / count).sqrt()[:, None]
        return robust_residuals(diff, self.cfg.scale, self.cfg.robust).flatten(1) * scale


class DenseCorrespondenceEnergy:
    """weight * sum_k g_k rho(|proj(x_k) - target_k|^2 / (scale * crop)^2) / sum_k g_k over gated matches g."""

    name = "dense_corr"

    def __init__(self, cfg: DenseCorrespondenceConfig, model: FlameModel, vertex_ids: torch.Tensor):
        self.cfg = cfg
        self.vertex_ids = vertex_ids
        """(K,) vertices whose matches are in CORR_TARGET, in that order."""
        self.model = model.restricted(vertex_ids)
        """FLAME evaluated on those vertices only (cheap Jacobians for Levenberg-Marquardt)."""

    def weights(self, ev: Evaluation) -> torch.Tensor:
        """(B, K) each kept correspondence's share of the term's weight."""
        gate = ev.obs.extras[CORR_WEIGHT]
        return self.cfg.weight * gate / gate.sum(-1, keepdim=True).clamp(min=1.0)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        extras = ev.obs.extras
        projected, _ = ev.camera.project(self.model(ev.params).vertices)
        diff = (projected - extras[CORR_TARGET]) / extras[CROP_PX][:, None, None]
        return (robust_residuals(diff, self.cfg.scale, self.cfg.robust) * self.weights(ev)[..., None].sqrt()).flatten(1)

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, 2K, P) derivatives of the residuals in the parameter fields `fields` (matches held): per vertex,
        the robust loss's and the projection's 2 x 3 map applied to its derivatives (FlameModel.point_jacobian,
        without forming them)."""
        extras = ev.obs.extras
        d = self.model.derivatives(ev.params, fields)
        vertices = d.vertices + ev.params.translation[:, None, :]
        crop = extras[CROP_PX][:, None, None, None]
        diff = (ev.camera.project(vertices)[0] - extras[CORR_TARGET]) / crop[..., 0]
        left = robust_linear_map(diff, self.cfg.scale, self.cfg.robust) @ ev.camera.projection_jacobian(vertices)
        left = left * (self.weights(ev)[..., None, None].sqrt() / crop)
        K = vertices.shape[1]
        each = torch.arange(K, device=vertices.device)[:, None]  # every vertex is a point of its own
        return self.model.point_jacobian(ev.params, d, fields, each, vertices.new_ones(K, 1), left).flatten(1, 2)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, 2K) derivatives of the residuals in log focal length with the 3D points held: the image scales
        about the principal point, so each projection moves by its offset from it."""
        extras = ev.obs.extras
        projected, _ = ev.camera.project(self.model(ev.params).vertices)
        crop = extras[CROP_PX][:, None, None]
        diff = (projected - extras[CORR_TARGET]) / crop
        robust = robust_linear_map(diff, self.cfg.scale, self.cfg.robust)  # (B, K, 2, 2)
        moved = robust @ ((projected - ev.camera.center) / crop)[..., None]
        return (moved[..., 0] * self.weights(ev)[..., None].sqrt()).flatten(1)


# ---------------------------------------------------------------------------------------------------------------
# Preparing the observations
# ---------------------------------------------------------------------------------------------------------------


def prediction_validity(uvw: np.ndarray, canonical_tree: cKDTree, max_distance: float) -> np.ndarray:
    """(S, S) float32: 1 where the predicted uvw (S, S, 3) lies within max_distance of a canonical-map vertex."""
    distance, _ = canonical_tree.query(uvw.reshape(-1, 3), distance_upper_bound=max_distance, workers=-1)
    return np.isfinite(distance).reshape(uvw.shape[:2]).astype(np.float32)


def correspondence_vertices(n_vertices: int, count: int, exclude: np.ndarray | None = None,
                            seed: int = 0) -> np.ndarray:
    """(K,) sorted vertex ids drawn without replacement (deterministic), leaving out `exclude`."""
    candidates = np.setdiff1d(np.arange(n_vertices), np.asarray(exclude if exclude is not None else [], np.int64))
    if count >= len(candidates):
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))


def match_uvw(uvw: np.ndarray, valid: np.ndarray, canonical: np.ndarray,
              subpixel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For each canonical coordinate (K, 3), the valid pixel of the map (S, S, 3) with the nearest uvw.

    With `subpixel`, the match moves within a pixel to where the map's local linear model (finite differences
    over valid neighbours) comes nearest to the coordinate: nearest pixel centres alone carry up to half a
    pixel of error, which biases fits near silhouettes. Returns positions (K, 2) in map pixels (centres at
    +0.5; NaN when no pixel is valid) and the cube distances (K,) of the matched pixels.
    """
    rows, cols = np.nonzero(valid > 0)
    if len(rows) == 0:
        return np.full((len(canonical), 2), np.nan, np.float32), np.full(len(canonical), np.inf, np.float32)
    distance, nearest = cKDTree(uvw[rows, cols]).query(canonical)
    row, col = rows[nearest], cols[nearest]
    pixels = np.stack([col + 0.5, row + 0.5], axis=-1)
    if subpixel:
        pixels = pixels + subpixel_offsets(uvw, valid > 0, row, col, canonical)
    return pixels.astype(np.float32), distance.astype(np.float32)


def map_gradient(uvw: np.ndarray, valid: np.ndarray, row: np.ndarray, col: np.ndarray,
                 axis: int) -> np.ndarray:
    """(K, 3) derivative of the map along `axis` (0 rows, 1 columns) at pixels (row, col): central differences
    where both neighbours are valid, one-sided where one is, 0 where none is."""
    size = uvw.shape[axis]
    step = np.array([1, 0]) if axis == 0 else np.array([0, 1])
    ahead = np.stack([row, col]) + step[:, None]
    behind = np.stack([row, col]) - step[:, None]
    ahead_ok = (ahead[axis] < size) & valid[ahead[0].clip(0, size - 1), ahead[1].clip(0, size - 1)]
    behind_ok = (behind[axis] >= 0) & valid[behind[0].clip(0, size - 1), behind[1].clip(0, size - 1)]
    centre = uvw[row, col]
    forward = uvw[ahead[0].clip(0, size - 1), ahead[1].clip(0, size - 1)] - centre
    backward = centre - uvw[behind[0].clip(0, size - 1), behind[1].clip(0, size - 1)]
    both = (ahead_ok & behind_ok)[:, None]
    return np.where(both, (forward + backward) / 2,
                    np.where(ahead_ok[:, None], forward, np.where(behind_ok[:, None], backward, 0.0)))


def subpixel_offsets(uvw: np.ndarray, valid: np.ndarray, row: np.ndarray, col: np.ndarray,
                     target: np.ndarray) -> np.ndarray:
    """(K, 2) x, y offsets (within +-0.5 pixel) from pixel centres (row, col) that bring the map's linear model
    uvw + J d nearest to target (K, 3) (least squares; 0 where the local map is degenerate)."""
    jacobian = np.stack([map_gradient(uvw, valid, row, col, 1), map_gradient(uvw, valid, row, col, 0)], -1)
    normal = np.einsum("kci,kcj->kij", jacobian, jacobian)
    rhs = np.einsum("kci,kc->ki", jacobian, target - uvw[row, col])
    det = normal[:, 0, 0] * normal[:, 1, 1] - normal[:, 0, 1] ** 2
    scale = np.einsum("kii->k", normal)
    ok = det > 1e-6 * scale ** 2 + 1e-20
    inverse = np.stack([np.stack([normal[:, 1, 1], -normal[:, 0, 1]], -1),
                        np.stack([-normal[:, 0, 1], normal[:, 0, 0]], -1)], -2) / np.where(ok, det, 1.0)[:, None, None]
    offset = np.einsum("kij,kj->ki", inverse, rhs)
    return np.where(ok[:, None], offset.clip(-0.5, 0.5), 0.0)


def correspondence_weights(target: torch.Tensor, cube_distance: torch.Tensor, projected: torch.Tensor,
                           visible: torch.Tensor, facing: torch.Tensor, crop_px: float,
                           cfg: DenseCorrespondenceConfig) -> torch.Tensor:
    """(K,) 0/1 gate of each match: close in the cube, near the vertex's current projection, and the vertex is
    visible and not grazing at the current pose. target, projected: (K, 2) video pixels; others (K,)."""
    near = (target - projected).norm(dim=-1) < cfg.max_image_distance * crop_px
    keep = (cube_distance < cfg.max_cube_distance) & near & visible & (facing > cfg.min_facing)
    return keep.to(target.dtype)
