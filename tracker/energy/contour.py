"""Sliding face-outline term: image jaw/cheek contour points pull on the mesh's own occluding contour.

Each detected outline point is matched to the nearest point of the projected silhouette of the lower face
(tracker.flame.contour), and the residual is its distance to that point along the line joining them
(point-to-curve, so the point may slide along the outline). Matches are made by `prepare` and held fixed
inside a Levenberg-Marquardt round (re-matching mid-solve would make the energy jump); without a prepared
match (gradient-descent stages) every evaluation matches afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracker.energy.base import Evaluation, robust_residuals
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

    def __call__(self, ev: Evaluation) -> torch.Tensor:
        match = ev.term_state.get(self.name) if ev.term_state else None
        if match is None:
            match = self.prepare(ev)
        if match is None:
            return ev.params.expr.new_zeros(ev.params.batch_size, 0)
        ends = ev.sparse_index(match.vertex_ids)
        if ends is None:  # not evaluated with the landmarks (no solver round): only the partners' vertices
            used, ends = torch.unique(match.vertex_ids, return_inverse=True)
            verts = self.model.restricted(used)(ev.params).vertices
        else:
            verts = ev.sparse_vertices
        batch = torch.arange(verts.shape[0], device=verts.device)[:, None]
        va, vb = verts[batch, ends[..., 0]], verts[batch, ends[..., 1]]
        pix = ev.camera.project(va + match.t[..., None] * (vb - va))[0]
        target = ev.obs.extras[POINTS_KEY]
        distance = ((pix - target) * match.direction).sum(-1, keepdim=True) / ev.obs.face_size[:, None, None]
        w = match.weights
        w = self.cfg.weight * w / ev.obs.extras[WEIGHTS_KEY].sum(-1, keepdim=True).clamp(min=1e-6)
        return (robust_residuals(distance, self.cfg.scale, self.cfg.robust) * w[..., None].sqrt()).flatten(1)
