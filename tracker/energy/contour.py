"""Sliding face-outline term: image jaw/cheek contour points pull on the mesh's own occluding contour.

Each detected outline point is matched to the nearest point of the projected silhouette of the lower face
(tracker.flame.contour), and the residual is its distance to that point along the line joining them
(point-to-curve, so the point may slide along the outline). Matches are made by `prepare` and held fixed
inside a Levenberg-Marquardt round (re-matching mid-solve would make the energy jump); without a prepared
match (gradient-descent stages) every evaluation matches afresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from tracker.energy.base import Evaluation, robust_jacobian, robust_residuals
from tracker.flame.contour import ContourRegion, closest_on_segments, silhouette_edges

POINTS_KEY = "contour_points"
"""Observations.extras key: (B, C, 2) detected outline points, pixels."""
WEIGHTS_KEY = "contour_weights"
"""Observations.extras key: (B, C) their weights (0 where missing)."""


@dataclass
class ContourEnergyConfig:
    weight: float = 0.3
    """Weight of the outline term next to the landmark term (both are means over their points)."""
    robust: str = "cauchy"
    """Robust loss: l2 | huber | cauchy | gm."""
    scale: float = 0.02
    """Residual scale of the robust loss, as a fraction of the face size."""
    max_distance: float = 0.15
    """Points farther than this (fraction of the face size) from the silhouette are left unmatched."""


@dataclass
class ContourMatch:
    """Each outline point's partner on the silhouette, fixed for a solver round."""

    vertex_ids: torch.Tensor
    """(B, C, 2) long: the partner edge's endpoints, FLAME vertex ids (a solver's round evaluates them with
    the landmarks: Problem.sparse_layout)."""
    t: torch.Tensor
    """(B, C) position along the edge."""
    direction: torch.Tensor
    """(B, C, 2) unit image direction along which the distance is measured."""
    weights: torch.Tensor
    """(B, C) point weights, 0 where unmatched."""

    def frames(self, rows: torch.Tensor) -> ContourMatch:
        """The matches of frames `rows` (repeats allowed)."""
        return ContourMatch(self.vertex_ids[rows], self.t[rows], self.direction[rows], self.weights[rows])


class ContourEnergy:
    name = "contour"

    def __init__(self, cfg: ContourEnergyConfig, model, region: ContourRegion):
        self.cfg = cfg
        self.model = model
        self.region = region.to(model.v_template.device)
        self.region_model = model.restricted(self.region.vertex_ids)

    @torch.no_grad()
    def prepare(self, ev: Evaluation) -> ContourMatch | None:
        """Match every outline point to the current silhouette; None when the frames have no outline points."""
        points = ev.obs.extras.get(POINTS_KEY)
        if points is None:
            return None
        weights = ev.obs.extras[WEIGHTS_KEY]
        params = ev.params.detach()
        pix = ev.camera.project(self.region_model(params).vertices)[0]  # (B, S, 2)
        usable = silhouette_edges(pix, self.region)
        start, end = pix[:, self.region.edges[:, 0]], pix[:, self.region.edges[:, 1]]
        edge, t, dist = closest_on_segments(points, start, end, usable)
        B = points.shape[0]
        batch = torch.arange(B, device=points.device)[:, None]
        a, b = start[batch, edge], end[batch, edge]
        nearest = a + t[..., None] * (b - a)
        offset = points - nearest
        along = b - a
        normal = torch.stack([-along[..., 1], along[..., 0]], dim=-1)
        direction = torch.where(dist[..., None] > 1e-3, offset, normal)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        matched = dist < self.cfg.max_distance * ev.obs.face_size[:, None]
        ends = self.region.vertex_ids[self.region.edges[edge]]  # (B, C, 2) FLAME vertex ids
        return ContourMatch(ends, t, direction, weights * matched)

    def _match(self, ev: Evaluation) -> ContourMatch | None:
        match = ev.term_state.get(self.name) if ev.term_state else None
        return self.prepare(ev) if match is None else match

    def _partners(self, ev: Evaluation, match: ContourMatch, fields: Sequence[str] | None = None):
        """The vertices holding the matched edges' ends (B, S, 3), where each end sits among them (B, C, 2), and
        a function (corners, bary, left) -> derivatives of left @ points on them in `fields` (None without)."""
        ends = ev.sparse_index(match.vertex_ids)
        if ends is not None:
            jacobian = None if fields is None else partial(ev.points_jacobian, fields)
            return ev.sparse_vertices, ends, jacobian
        # Not evaluated with the landmarks (no solver round): only the partners' vertices.
        used, ends = torch.unique(match.vertex_ids, return_inverse=True)
        model = self.model.restricted(used)
        if fields is None:
            return model(ev.params).vertices, ends, None
        d = model.derivatives(ev.params, fields)
        return d.vertices + ev.params.translation[:, None, :], ends, partial(model.point_jacobian, ev.params, d,
                                                                            fields)

    def _distance(self, ev: Evaluation, match: ContourMatch, fields: Sequence[str] | None = None,
                  focal: bool = False):
        """(B, C, 1) signed distances to the matched points along the match directions (face-size units), and
        with `fields` their derivatives (B, C, 1, P), or with `focal` those in log focal length (B, C, 1, 1)."""
        verts, ends, jacobian = self._partners(ev, match, fields)
        batch = torch.arange(verts.shape[0], device=verts.device)[:, None]
        t = match.t[..., None]
        va, vb = verts[batch, ends[..., 0]], verts[batch, ends[..., 1]]
        point = va + t * (vb - va)
        pix = ev.camera.project(point)[0]
        size = ev.obs.face_size[:, None, None]
        distance = ((pix - ev.obs.extras[POINTS_KEY]) * match.direction).sum(-1, keepdim=True) / size
        if focal:  # the image scales about the principal point
            return distance, (((pix - ev.camera.center) * match.direction).sum(-1, keepdim=True) / size)[..., None]
        if fields is None:
            return distance, None
        # The point on its edge is (1 - t) a + t b; the distance sees it through direction . projection.
        left = (match.direction[..., None, :] @ ev.camera.projection_jacobian(point)) / size[..., None]  # (B, C, 1, 3)
        return distance, jacobian(ends, torch.cat([1 - t, t], dim=-1), left)

    def _weights(self, ev: Evaluation, match: ContourMatch) -> torch.Tensor:
        return self.cfg.weight * match.weights / ev.obs.extras[WEIGHTS_KEY].sum(-1, keepdim=True).clamp(min=1e-6)

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        match = self._match(ev)
        if match is None:
            return ev.params.expr.new_zeros(ev.params.batch_size, 0)
        distance, _ = self._distance(ev, match)
        w = self._weights(ev, match)
        return (robust_residuals(distance, self.cfg.scale, self.cfg.robust) * w[..., None].sqrt()).flatten(1)

    def jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, C, P) derivatives of the residuals in the parameter fields `fields`, the matches held."""
        match = self._match(ev)
        P = sum(getattr(ev.params, f).shape[1] for f in fields)
        if match is None:
            return ev.params.expr.new_zeros(ev.params.batch_size, 0, P)
        distance, d_distance = self._distance(ev, match, fields)
        d = robust_jacobian(distance, d_distance, self.cfg.scale, self.cfg.robust)
        return (d * self._weights(ev, match)[..., None, None].sqrt()).flatten(1, 2)

    def focal_jacobian(self, ev: Evaluation) -> torch.Tensor:
        """(B, C) derivatives of the residuals in log focal length, the 3D points and matches held."""
        match = self._match(ev)
        if match is None:
            return ev.params.expr.new_zeros(ev.params.batch_size, 0)
        distance, d_distance = self._distance(ev, match, focal=True)
        d = robust_jacobian(distance, d_distance, self.cfg.scale, self.cfg.robust)
        return (d * self._weights(ev, match)[..., None, None].sqrt()).flatten(1)
