"""The canonical map of FLAME: where each mesh vertex lives in DenseMarks' canonical cube [0, 1]^3.

DenseMarks predicts, for every pixel of a head crop, a point uvw of a canonical head cube that is consistent
across poses and people. Tying the mesh to those predictions needs the cube coordinate c_v of every FLAME
vertex. `estimate_canonical_map` learns it from tracked frames: project the visible vertices of well-fitted
frames into their crops, read the predicted uvw there, and take a weighted median per vertex (reliability from
view angle, distance to the silhouette and the frame's fit quality); vertices never seen get values by
harmonic diffusion over the mesh graph, so the map is complete. A map is saved as an .npz with metadata and
serves any video tracked with the same FLAME topology.

Crop geometry: `UvwPrediction.frame_to_crop` uses OpenCV's pixel convention (integer = pixel centre) while the
tracker projects into continuous coordinates (pixel centres at +0.5); `crop_affine` bridges the two and scales
to the resolution a map is used at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

from tracker.camera import Camera, to_camera
from tracker.errors import TrackerError
from tracker.flame.model import FlameModel, FlameParams
from tracker.render import RasterSettings, interpolate, rasterize, vertex_normals
from tracker.render.shading import lambert_headlight

if TYPE_CHECKING:  # the predictor module imports transformers: keep it out of config loading
    from tracker.densemarks.predict import UvwPrediction

MAP_FORMAT = "densemarks_canonical_map"
MAP_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Crop geometry and sampling
# ---------------------------------------------------------------------------------------------------------------


def crop_affine(frame_to_crop: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(2, 3) affine from tracker pixel coordinates (centres at +0.5) of the frame to those of the crop.

    frame_to_crop: (2, 3) OpenCV-convention affine of `UvwPrediction`; scale: map side / prediction side, for
    using the crop at another resolution (internal coordinates simply scale).
    """
    linear, offset = frame_to_crop[:, :2], frame_to_crop[:, 2]
    shift = offset + 0.5 - linear @ np.array([0.5, 0.5])
    return scale * np.concatenate([linear, shift[:, None]], axis=1)


def apply_crop_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points through per-frame affines. affine: (B, 2, 3); points: (B, N, 2) -> (B, N, 2)."""
    return points @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]


def sample_map(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (B, S, S, C) images at (B, N, 2) points in their pixel coordinates (centres at
    +0.5) -> (B, N, C); border values outside."""
    size = torch.tensor(image.shape[2:0:-1], dtype=points.dtype, device=points.device)
    grid = (points / size * 2 - 1)[:, None]  # (B, 1, N, 2)
    sampled = F.grid_sample(image.permute(0, 3, 1, 2), grid.to(image.dtype), mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled[:, :, 0].transpose(1, 2)


def crop_screen_vertices(vertices: torch.Tensor, camera: Camera, affine: torch.Tensor) -> torch.Tensor:
    """World vertices (B, V, 3) -> crop pixel x, y and depth (B, V, 3) for the rasteriser."""
    pixels, depth = camera.project(vertices)
    return torch.cat([apply_crop_affine(affine, pixels), depth[..., None]], dim=-1)


def render_attributes(screen: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor, size: int,
                      rasterizer=rasterize) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vertex attributes (B or 1, V, C) rendered into (B, size, size, C) images with coverage (B, size,
    size, 1); differentiable in the attributes and the screen vertices (B, V, 3)."""
    fragments = rasterizer(screen.detach(), faces, RasterSettings((size, size)))
    return interpolate(fragments, screen, faces, attributes)


# ---------------------------------------------------------------------------------------------------------------
# The map and its file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CanonicalMap:
    """Per-vertex canonical cube coordinates of one FLAME topology."""

    coords: np.ndarray
    """(V, 3) float32 cube coordinates c_v."""
    support: np.ndarray
    """(V,) float32 total reliability weight of the observations behind each vertex (0: filled by diffusion)."""
    metadata: dict = field(default_factory=dict)
    """Where the map came from (source, predictor, frames used, FLAME model, ...)."""

    @property
    def observed(self) -> np.ndarray:
        """(V,) bool: vertices whose value was measured rather than diffused."""
        return self.support > 0

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V, 3) float32 coordinates on a device."""
        return torch.as_tensor(self.coords, dtype=torch.float32, device=device)


def save_canonical_map(path: str | Path, cmap: CanonicalMap) -> Path:
    """Write the map as .npz (coords, support, metadata as JSON); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": MAP_FORMAT, "version": MAP_VERSION, "n_vertices": len(cmap.coords), **cmap.metadata}
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, coords=cmap.coords.astype(np.float32), support=cmap.support.astype(np.float32),
             metadata=np.array(json.dumps(metadata, default=str)))
    partial.replace(path)
    return path


def load_canonical_map(path: str | Path, n_vertices: int | None = None) -> CanonicalMap:
    """Read a map written by `save_canonical_map` (or a bare (V, 3) .npy); checks the vertex count."""
    path = Path(path)
    if not path.is_file():
        raise TrackerError(f"canonical map {path} does not exist: pass a map saved by an earlier run, or leave "
                           "densemarks.canonical_map empty to estimate one from the video")
    try:
        if path.suffix == ".npy":
            coords = np.load(path, allow_pickle=False)
            cmap = CanonicalMap(coords.astype(np.float32), np.ones(len(coords), np.float32), {"source": str(path)})
        else:
            with np.load(path, allow_pickle=False) as stored:
                metadata = json.loads(str(stored["metadata"])) if "metadata" in stored.files else {}
                cmap = CanonicalMap(stored["coords"].astype(np.float32), stored["support"].astype(np.float32),
                                    metadata)
    except (OSError, ValueError, KeyError) as error:
        raise TrackerError(f"canonical map {path} is unreadable ({error}): write it with save_canonical_map") from None
    if cmap.coords.ndim != 2 or cmap.coords.shape[1] != 3:
        raise TrackerError(f"canonical map {path} holds an array of shape {cmap.coords.shape}, expected (V, 3)")
    if n_vertices is not None and len(cmap.coords) != n_vertices:
        raise TrackerError(f"canonical map {path} has {len(cmap.coords)} vertices but the FLAME model has "
                           f"{n_vertices}: it was made for another mesh topology")
    return cmap


# ---------------------------------------------------------------------------------------------------------------
# Estimation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanonicalMapOptions:
    """Which vertex observations count, and how much."""

    min_facing: float = 0.15
    """Smallest cosine between the vertex normal and the ray to the camera (grazing views smear)."""
    depth_tolerance_m: float = 0.001
    """Depth mismatch allowed between a vertex and the pixels around it, beyond the surface's own slope."""
    silhouette_fraction: float = 0.03
    """Distance from the silhouette (fraction of the crop side) below which the weight ramps down to 0."""
    error_scale: float = 1.0
    """Frame weight 1 / (1 + (err / (error_scale * median err))^2): badly fitted frames count less."""
    map_resolution: int = 256
    """Side at which predictions are sampled (larger predictions are area-downsampled to it)."""
    affine_prior: float = 20.0
    """Pull towards an affine image of the FLAME template: a vertex keeps support / (support + affine_prior) of
    its measured departure from it (0: free per-vertex map)."""


def frame_fit_weights(lmk_error_px: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(N,) reliability of each frame's fit from its landmark error (N,), relative to the median error."""
    errors = np.nan_to_num(np.asarray(lmk_error_px, np.float64), nan=np.inf)
    reference = scale * max(float(np.median(errors[np.isfinite(errors)])) if np.isfinite(errors).any() else 1.0,
                            1e-3)
    return (1.0 / (1.0 + (errors / reference) ** 2)).astype(np.float32)


def resize_uvw(uvw: np.ndarray, size: int) -> np.ndarray:
    """(3, S, S) prediction -> (size, size, 3) float32 (area-averaged when shrinking)."""
    image = np.ascontiguousarray(np.moveaxis(uvw, 0, -1), dtype=np.float32)
    if image.shape[0] == size:
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def surface_neighbourhood(faces: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """Sorted keys v * F + f of the faces that touch vertex v or one of its mesh neighbours: what the pixels
    around v may show when v is visible. faces: (F, 3) -> (M,) long on the faces' device."""
    faces_np = faces.cpu().numpy()
    n_faces = len(faces_np)
    incidence = sp.csr_matrix((np.ones(3 * n_faces), (faces_np.reshape(-1), np.repeat(np.arange(n_faces), 3))),
                              shape=(n_vertices, n_faces))
    adjacency = (incidence @ incidence.T).astype(bool).astype(np.float64)  # includes the diagonal
    near = (adjacency @ incidence).tocoo()
    keys = np.sort(near.row.astype(np.int64) * n_faces + near.col)
    return torch.from_numpy(keys).to(faces.device)


def shows_neighbourhood(neighbourhood: torch.Tensor, vertex: torch.Tensor, face: torch.Tensor,
                        n_faces: int) -> torch.Tensor:
    """(N,) bool: face[i] (-1 = background) is in the surface neighbourhood of vertex[i]."""
    keys = vertex * n_faces + face
    position = torch.searchsorted(neighbourhood, keys).clamp(max=len(neighbourhood) - 1)
    return (neighbourhood[position] == keys) & (face >= 0)


@torch.no_grad()
def vertex_visibility(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, affine: torch.Tensor, size: int,
                      depth_tolerance_m: float, neighbourhood: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which vertices of one mesh a size x size crop shows.

    vertices: (V, 3) world; affine: (2, 3) frame -> crop pixels; depth_tolerance_m: allowed depth mismatch on
    top of the surface's own slope; neighbourhood: `surface_neighbourhood` keys, to also require that the pixels
    around a vertex show faces next to it (stricter, for sampling). Returns visible (V,) bool (the four pixels
    around the vertex show its surface), facing (V,) cosine between normal and the ray to the camera, crop
    positions (V, 2) and the coverage (size, size) bool.
    """
    screen = crop_screen_vertices(vertices[None], camera, affine[None])[0]
    fragments = rasterize(screen[None], faces, RasterSettings((size, size)))
    covered, surface_depth = fragments.mask[0], fragments.depth[0]
    xy, depth = screen[:, :2], screen[:, 2]
    normals = vertex_normals(to_camera(vertices)[None], faces)[0]
    facing = -(normals * F.normalize(to_camera(vertices), dim=-1)).sum(-1)
    # Depth change of this surface over one crop pixel: footprint z / f times the slope tan(view angle).
    footprint = depth / (camera.focal * affine[0, 0])
    slope = (1 - facing.square()).clamp(min=0).sqrt() / facing.clamp(min=0.5)
    tolerance = depth_tolerance_m + footprint * slope
    # The four pixels a bilinear read at the vertex blends must all show this surface: covered (not background)
    # and at the vertex's depth (not an occluder in front, nor a farther surface beside an occluding edge).
    corner = (xy - 0.5).floor().long()
    visible = ((xy >= 0.5) & (xy <= size - 0.5)).all(-1)
    vertex_ids = torch.arange(len(vertices), device=vertices.device)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        col = (corner[:, 0] + dx).clamp(0, size - 1)
        row = (corner[:, 1] + dy).clamp(0, size - 1)
        visible &= covered[row, col] & ((depth - surface_depth[row, col]).abs() <= tolerance)
        if neighbourhood is not None:
            face = fragments.triangle_id[0][row, col]
            visible &= shows_neighbourhood(neighbourhood, vertex_ids, face, len(faces))
    return visible, facing, xy, covered


@torch.no_grad()
def vertex_observations(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, affine: torch.Tensor,
                        uvw: torch.Tensor, options: CanonicalMapOptions,
                        neighbourhood: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted uvw at each vertex of one frame and how much to trust it.

    vertices: (V, 3) world; affine: (2, 3) frame -> map pixels; uvw: (S, S, 3) map.
    Returns samples (V, 3) and weights (V,) (0 for hidden, grazing or off-crop vertices).
    """
    size = uvw.shape[0]
    visible, facing, xy, covered = vertex_visibility(vertices, faces, camera, affine, size, options.depth_tolerance_m,
                                                     neighbourhood)
    # Near the silhouette a bilinear sample mixes in the background and small pose errors move the edge.
    to_edge = cv2.distanceTransform(covered.cpu().numpy().astype(np.uint8), cv2.DIST_L2, 3)
    col = xy[:, 0].floor().long().clamp(0, size - 1)
    row = xy[:, 1].floor().long().clamp(0, size - 1)
    edge_distance = torch.from_numpy(to_edge).to(vertices)[row, col]
    edge_weight = (edge_distance / (options.silhouette_fraction * size)).clamp(max=1.0)
    weight = torch.where(visible & (facing > options.min_facing), facing * edge_weight, torch.zeros_like(facing))
    return sample_map(uvw[None], xy[None])[0], weight


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-row, per-channel weighted median. values: (V, N, C); weights: (V, N) >= 0 -> (V, C).

    Rows with zero total weight give 0. The median is the lower weighted median (the first sorted value whose
    cumulative weight reaches half the total).
    """
    order = np.argsort(values, axis=1)
    sorted_values = np.take_along_axis(values, order, axis=1)
    sorted_weights = np.take_along_axis(np.broadcast_to(weights[..., None], values.shape), order, axis=1)
    cumulative = np.cumsum(sorted_weights, axis=1)
    half = 0.5 * cumulative[:, -1:]
    index = np.argmax(cumulative >= half, axis=1)[:, None]  # (V, 1, C)
    median = np.take_along_axis(sorted_values, index, axis=1)[:, 0]
    return np.where(cumulative[:, -1] > 0, median, 0.0)


def vertex_graph(vertices: np.ndarray, faces: np.ndarray, spatial_neighbours: int = 4) -> sp.csr_matrix:
    """(V, V) symmetric 0/1 adjacency: mesh edges plus each vertex's nearest template neighbours, which link
    separate components (eyeballs) to the surface around them."""
    n = len(vertices)
    rows = [faces[:, [0, 1, 2]].reshape(-1), faces[:, [1, 2, 0]].reshape(-1)]
    cols = [faces[:, [1, 2, 0]].reshape(-1), faces[:, [0, 1, 2]].reshape(-1)]
    if spatial_neighbours:
        _, near = cKDTree(vertices).query(vertices, k=spatial_neighbours + 1)
        rows += [np.repeat(np.arange(n), spatial_neighbours), near[:, 1:].reshape(-1)]
        cols += [near[:, 1:].reshape(-1), np.repeat(np.arange(n), spatial_neighbours)]
    graph = sp.coo_matrix((np.ones(sum(len(r) for r in rows)), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, n)).tocsr()
    graph.data[:] = 1.0
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def diffuse_unknown(values: np.ndarray, known: np.ndarray, graph: sp.csr_matrix, screening: float = 1e-6) -> np.ndarray:
    """Harmonic fill of the unknown rows of values (V, C) over a graph: each unknown vertex becomes the mean of
    its neighbours (known rows stay). A tiny pull to the known mean keeps components without data solvable."""
    if known.all() or not known.any():
        return values
    laplacian = sp.diags(np.asarray(graph.sum(1)).ravel()) - graph
    unknown = ~known
    system = laplacian[unknown][:, unknown] + screening * sp.identity(int(unknown.sum()))
    rhs = -laplacian[unknown][:, known] @ values[known] + screening * values[known].mean(0)
    filled = values.copy()
    filled[unknown] = np.asarray(spsolve(system.tocsc(), rhs)).reshape(-1, values.shape[1])
    return filled


def fit_affine(points: np.ndarray, targets: np.ndarray, weights: np.ndarray, scale: float = 0.01,
               iters: int = 10) -> np.ndarray:
    """Robust weighted least squares targets (V, 3) ~ [points, 1] (V, 4) @ M (4, 3) with Cauchy reweighting of
    residuals at `scale`; returns M."""
    design = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    robust = weights.astype(np.float64)
    for _ in range(iters):
        root = np.sqrt(robust)[:, None]
        matrix = np.linalg.lstsq(design * root, targets * root, rcond=None)[0]
        residual = np.linalg.norm(design @ matrix - targets, axis=1)
        robust = weights / (1.0 + (residual / scale) ** 2)
    return matrix


def regularise_to_template(coords: np.ndarray, support: np.ndarray, template: np.ndarray, prior: float,
                           graph: sp.csr_matrix) -> np.ndarray:
    """Measured coordinates (V, 3) with support (V,) -> a complete map: a robust affine image of the template
    (V, 3) plus each measured vertex's departure from it, shrunk by support / (support + prior) and diffused
    over the graph to the unmeasured vertices.

    The canonical cube is the same for every head, so an affine image of the template explains most of it; the
    prior keeps fit errors of single frames (which move samples over the surface) out of the map and gives the
    unseen back of the head sensible values.
    """
    known = support > 0
    affine = np.concatenate([template, np.ones((len(template), 1))], axis=1) @ fit_affine(template, coords, support)
    residual = np.where(known[:, None], coords - affine, 0.0) * (support / (support + prior + 1e-12))[:, None]
    return affine + diffuse_unknown(residual, known, graph)


def estimate_canonical_map(model: FlameModel, camera: Camera, params: FlameParams,
                           predictions: Sequence[UvwPrediction], frame_weights: np.ndarray | None = None,
                           options: CanonicalMapOptions = CanonicalMapOptions(),
                           metadata: dict | None = None) -> CanonicalMap:
    """Canonical map from tracked frames and their predictions.

    params: N frames (stacked); predictions: their N uvw maps; frame_weights: (N,) fit reliability (see
    `frame_fit_weights`), ones when None. Returns a complete map (see `regularise_to_template`).
    """
    device = model.v_template.device
    count = params.batch_size
    if len(predictions) != count:
        raise ValueError(f"{len(predictions)} predictions for {count} frames")
    weights_per_frame = np.ones(count, np.float32) if frame_weights is None else np.asarray(frame_weights, np.float32)
    n_vertices = model.n_vertices
    samples = np.zeros((n_vertices, count, 3), np.float32)
    weights = np.zeros((n_vertices, count), np.float32)
    neighbourhood = surface_neighbourhood(model.faces, n_vertices)
    for i, prediction in enumerate(predictions):
        side = prediction.uvw.shape[-1]
        size = min(options.map_resolution, side)  # upsampling would blend background into edge pixels
        uvw = resize_uvw(prediction.uvw, size)
        affine = crop_affine(prediction.frame_to_crop, size / side)
        with torch.no_grad():
            vertices = model(params.frames(slice(i, i + 1))).vertices[0]
        frame_samples, frame_weight = vertex_observations(
            vertices, model.faces, camera, torch.as_tensor(affine, dtype=torch.float32, device=device),
            torch.from_numpy(uvw).to(device), options, neighbourhood)
        samples[:, i] = frame_samples.cpu().numpy()
        weights[:, i] = frame_weight.cpu().numpy() * weights_per_frame[i]
    support = weights.sum(1)
    known = support > 0
    template = model.v_template.cpu().numpy()
    coords = regularise_to_template(weighted_median(samples, weights), support, template, options.affine_prior,
                                    vertex_graph(template, model.faces.cpu().numpy()))
    info = {"source": "estimated", "frames_used": count, "observed_fraction": float(known.mean()),
            "affine_prior": options.affine_prior,
            "flame_name": model.name, "flame_sha256": model.sha256, **(metadata or {})}
    return CanonicalMap(coords.astype(np.float32), support.astype(np.float32), info)


# ---------------------------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def render_canonical_views(model: FlameModel, coords: torch.Tensor, shape: torch.Tensor | None = None,
                           size: int = 256, yaws_deg: Sequence[float] = (-70.0, 0.0, 70.0)) -> np.ndarray:
    """FLAME (neutral pose, given identity) coloured by its canonical coordinates, seen from several yaws with
    a soft headlight, side by side: (size, size * len(yaws), 3) uint8 RGB."""
    device = model.v_template.device
    views = []
    for yaw in yaws_deg:
        params = FlameParams.zeros(1, model.n_shape, model.n_expr, device)
        if shape is not None:
            params.shape = shape.to(device)
        params.rotation[0, 1] = float(np.radians(yaw))
        vertices = model(params).vertices
        centre = (vertices[0].amax(0) + vertices[0].amin(0)) / 2
        extent = float((vertices[0].amax(0) - vertices[0].amin(0)).max())
        camera = Camera.from_image(size, size, fov_deg=20.0, device=device)
        distance = 1.15 * extent / (2 * np.tan(np.radians(10.0)))
        placed = vertices - centre + torch.tensor([0.0, 0.0, -distance], device=device)
        pixels, depth = camera.project(placed)
        screen = torch.cat([pixels, depth[..., None]], dim=-1)
        normals = vertex_normals(to_camera(placed), model.faces)
        attributes = torch.cat([coords.to(device)[None], normals], dim=-1)
        image, mask = render_attributes(screen, model.faces, attributes, size)
        shade = lambert_headlight(F.normalize(image[0, ..., 3:], dim=-1), ambient=0.55, diffuse=0.45)
        colour = image[0, ..., :3].clamp(0, 1) * shade[..., None] * mask[0] + (1 - mask[0]) * 0.15
        views.append((colour.cpu().numpy() * 255).round().astype(np.uint8))
    return np.concatenate(views, axis=1)


def write_canonical_png(path: str | Path, model: FlameModel, cmap: CanonicalMap, shape: torch.Tensor | None = None,
                        size: int = 256) -> Path:
    """Save `render_canonical_views` as a PNG for inspection."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = render_canonical_views(model, cmap.tensor(model.v_template.device), shape, size)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise TrackerError(f"cannot write {path}")
    return path
