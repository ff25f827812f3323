"""Optimisers over FLAME parameters: Levenberg-Marquardt for small residual problems (landmark stages) and
Adam for image-sized ones (photometric, dense render-and-compare).

Parameters are packed into one flat vector (`ParamPacker`). LM's per-frame Jacobian blocks come from the
terms' own derivatives where every term has them (`analytic`; the identity's columns too, and the focal
length's from their `focal_jacobian`), from central differences of one batched evaluation, or from forward-mode
passes (`torch.func.jacfwd`). Frames that share nothing can be solved side by side as separate problems
(`levenberg_marquardt_frames`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.func import jacfwd

from tracker.camera import Camera
from tracker.energy.base import EnergyTerm, Evaluation, Observations
from tracker.flame.landmarks import LandmarkSet
from tracker.flame.model import FlameModel, FlameParams

FRAME_FIELDS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "eyelids", "translation")
"""Per-frame parameters (everything but the shared identity)."""
BLENDSHAPE_FIELDS = ("expr", "eyelids")
"""Per-frame blendshape coefficients: with the pose held, the posed vertices are linear in them."""
LANDMARK_FIELDS = tuple(f for f in FRAME_FIELDS if f != "neck_pose")
"""What face landmarks can determine: the neck and the global rotation turn the face alike, so the neck
stays at rest until image terms that see the neck (photometric, DenseMarks) are on."""

ADAM_LR_SCALE = {"shape": 3.0, "expr": 3.0, "eyelids": 3.0, "rotation": 1.0, "neck_pose": 0.5, "jaw_pose": 0.5,
                 "eyes_pose": 1.0, "translation": 0.5, "log_focal": 0.5}
"""Per-parameter learning-rate multipliers for Adam, whose steps are ~lr in every coordinate: they put
radians, metres and coefficients on comparable footing."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads: the landmark solves are many tiny ops, which extra threads only slow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Problem:
    """Everything an energy evaluation needs besides the parameters."""

    model: FlameModel
    landmarks: LandmarkSet
    camera: Camera
    terms: Sequence[EnergyTerm]
    rasterizer: Callable | None = None
    """rasterizer(verts_screen, faces) -> Fragments, needed by image terms (photometric, DenseMarks)."""
    jacobian: str = "forward"
    """How Levenberg-Marquardt differentiates the per-frame parameters: forward (forward-mode AD),
    differences (central differences of one batched evaluation: faster for small per-frame terms; every
    term's per-frame state must then support `frames(rows)`) or analytic (the terms' own `jacobian`, the
    fastest; differences where a term has none)."""

    def __post_init__(self):
        self.landmark_model = self.model.restricted(self.landmarks.vertex_ids)

    def sparse_layout(self, state: dict) -> tuple[torch.Tensor, FlameModel]:
        """The FLAME vertex ids an evaluation computes in one pass, and the model restricted to them: the
        landmark vertices (first, in their order) and the vertices that a solver round's term states read
        (`vertex_ids` of e.g. the face outline's matches)."""
        ids = self.landmarks.vertex_ids
        extra = [v.vertex_ids.reshape(-1) for v in state.values() if v is not None and hasattr(v, "vertex_ids")]
        if not extra:
            return ids, self.landmark_model
        others = torch.unique(torch.cat(extra))
        ids = torch.cat([ids, others[~torch.isin(others, ids)]])
        return ids, self.model.restricted(ids)

    def with_terms(self, terms: Sequence[EnergyTerm], rasterizer: Callable | None = None) -> Problem:
        """The same model and camera with other energy terms (e.g. a stage adding image terms): analytic
        Jacobians where this problem has them and every new term too, else forward-mode ones, which every
        term supports."""
        analytic = self.jacobian == "analytic" and all(hasattr(term, "jacobian") for term in terms)
        return Problem(self.model, self.landmarks, self.camera, terms, rasterizer or self.rasterizer,
                       "analytic" if analytic else "forward")

    def evaluation(self, params: FlameParams, obs: Observations, reference: FlameParams | None = None,
                   camera: Camera | None = None, contour_yaw: torch.Tensor | None = None,
                   term_state: dict | None = None, layout: tuple[torch.Tensor, FlameModel] | None = None,
                   shared_frames: int | None = None) -> Evaluation:
        """layout: `sparse_layout(term_state)` (default: the landmark vertices alone); shared_frames: see
        `Evaluation.shared_frames` (default: the batch)."""
        ids, sparse_model = layout or (self.landmarks.vertex_ids, self.landmark_model)
        return Evaluation(self.model, self.landmarks, camera or self.camera, params, obs, reference, contour_yaw,
                          sparse_model, self.rasterizer, term_state, ids, shared_frames)

    def residuals(self, params: FlameParams, obs: Observations, reference: FlameParams | None = None,
                  camera: Camera | None = None, contour_yaw: torch.Tensor | None = None,
                  term_state: dict | None = None, layout: tuple[torch.Tensor, FlameModel] | None = None,
                  shared_frames: int | None = None) -> torch.Tensor:
        """(B, N) all terms' residuals side by side."""
        ev = self.evaluation(params, obs, reference, camera, contour_yaw, term_state, layout, shared_frames)
        return torch.cat([term(ev) for term in self.terms], dim=1)

    @property
    def analytic(self) -> bool:
        """Whether every term gives its own derivatives (`jacobian`)."""
        return all(hasattr(term, "jacobian") for term in self.terms)

    def residual_jacobian(self, ev: Evaluation, fields: Sequence[str]) -> torch.Tensor:
        """(B, N, P) derivatives of `residuals` in the per-frame parameter fields `fields` (columns in that
        order), from the terms' own `jacobian`."""
        return torch.cat([term.jacobian(ev, fields) for term in self.terms], dim=1)

    def prepare(self, ev: Evaluation) -> dict:
        """What the terms with discrete choices (correspondences) hold fixed for a solver round."""
        return {term.name: term.prepare(ev) for term in self.terms if hasattr(term, "prepare")}

    def energy(self, params: FlameParams, obs: Observations, reference: FlameParams | None = None,
               camera: Camera | None = None, shared_frames: int | None = None) -> torch.Tensor:
        """(B,) energy per frame (shared_frames: `Evaluation.shared_frames`)."""
        return self.residuals(params, obs, reference, camera, shared_frames=shared_frames).pow(2).sum(-1)


class ParamPacker:
    """Maps per-frame vectors X (B, Pf) and a shared vector s (Ps,) to FlameParams and a log focal scale.

    Frame fields are the per-frame parameters being fitted; shared ones are the identity (`shape`) and the
    focal length, common to all frames of the batch. Fields not listed come from `base`.
    """

    def __init__(self, base: FlameParams, frame_fields: Sequence[str], free_shape: bool = False,
                 free_focal: bool = False):
        self.base = base.detach()
        self._rows_base: tuple[torch.Tensor, FlameParams] | None = None
        self.frame_fields = list(frame_fields)
        self.free_shape = free_shape
        self.free_focal = free_focal
        self.frame_sizes = [getattr(self.base, n).shape[1] for n in self.frame_fields]
        self.shared_sizes = ([self.base.shape.shape[1]] if free_shape else []) + ([1] if free_focal else [])

    def pack(self, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.cat([getattr(params, n).detach() for n in self.frame_fields], dim=1)
        parts = ([params.shape.detach().reshape(-1)] if self.free_shape else []) + \
            ([X.new_zeros(1)] if self.free_focal else [])
        return X, torch.cat(parts) if parts else X.new_zeros(0)

    def difference_steps(self, X: torch.Tensor) -> torch.Tensor:
        """(Pf,) finite-difference step of each frame parameter: 0.1 mm for translations, 1e-3 for angles
        (radians) and coefficients."""
        steps = [torch.full((size,), 1e-4 if name == "translation" else 1e-3)
                 for name, size in zip(self.frame_fields, self.frame_sizes)]
        return torch.cat(steps).to(X)

    def linear_columns(self, X: torch.Tensor) -> torch.Tensor:
        """(Pf,) bool: frame parameters the posed vertices are linear in (blendshape coefficients; the pose
        is held): a one-sided difference is as good as a central one there, at half the evaluations."""
        flags = [torch.full((size,), name in BLENDSHAPE_FIELDS) for name, size in zip(self.frame_fields, self.frame_sizes)]
        return torch.cat(flags).to(X.device)

    def unpack(self, X: torch.Tensor, s: torch.Tensor,
               rows: torch.Tensor | None = None) -> tuple[FlameParams, torch.Tensor]:
        """FlameParams and log focal scale (0 when the focal is fixed); with `rows`, X holds the parameters of
        those frames (repeats allowed) and the fixed fields are taken from them."""
        base = self.base if rows is None else self._base_of(rows)
        fields = {n: c for n, c in zip(self.frame_fields, torch.split(X, self.frame_sizes, dim=1))}
        shared = torch.split(s, self.shared_sizes) if self.shared_sizes else ()
        if self.free_shape:
            fields["shape"] = shared[0].reshape(1, -1)
        log_focal = shared[-1][0] if self.free_focal else s.new_zeros(())
        return FlameParams(**{**base.__dict__, **fields}), log_focal

    def _base_of(self, rows: torch.Tensor) -> FlameParams:
        """The fixed fields of frames `rows`, selected once for the rows that come back at every iteration."""
        cached = self._rows_base
        if cached is None or not torch.equal(cached[0], rows):
            self._rows_base = cached = (rows, self.base.frames(rows))
        return cached[1]

    def unpack_dolly(self, X: torch.Tensor, s: torch.Tensor,
                     rows: torch.Tensor | None = None) -> tuple[FlameParams, torch.Tensor]:
        """`unpack` with the translations scaled by the focal scale (see fit_lm): X holds translations at the
        initial focal length."""
        params, log_focal = self.unpack(X, s, rows)
        if self.free_focal:
            params = replace(params, translation=params.translation * torch.exp(log_focal))
        return params, log_focal


def block_jacobians(residual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], X: torch.Tensor,
                    s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobians of residual_fn(X, s) -> (B, N): per-frame blocks (B, N, Pf) and shared columns (B, N, Ps).

    Frame b's residuals depend only on X[b], so one tangent per frame parameter, applied to all frames at
    once, yields every frame's block (column colouring): Pf + Ps forward-mode passes instead of B*Pf + Ps.
    """
    J_frame = jacfwd(lambda u: residual_fn(X + u, s))(X.new_zeros(X.shape[1]))
    if not s.numel():
        return J_frame, X.new_zeros(*J_frame.shape[:2], 0)
    return J_frame, jacfwd(lambda v: residual_fn(X, s + v))(s.new_zeros(s.shape[0]))


def difference_jacobians(residual_fn: Callable[..., torch.Tensor], steps: torch.Tensor, X: torch.Tensor,
                         s: torch.Tensor, one_sided: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like block_jacobians, with the per-frame blocks from finite differences: every frame perturbed in
    every parameter, all copies evaluated as one batch (residual_fn(X_rows, s, rows) evaluates rows of frames
    `rows`). Central differences, except forward ones in the columns flagged `one_sided` (Pf,) bool (e.g.
    `ParamPacker.linear_columns`): 2 * Pc + Pf1 + 1 copies of each frame for Pc central and Pf1 one-sided
    columns. Shared columns stay forward-mode (a one-off, keyframe-sized problem)."""
    B, Pf = X.shape
    one_sided = torch.zeros(Pf, dtype=torch.bool, device=X.device) if one_sided is None else one_sided
    central, forward = (~one_sided).nonzero().squeeze(1), one_sided.nonzero().squeeze(1)
    offsets = torch.diag(steps)[:, None, :]  # (Pf, 1, Pf)
    copies = torch.cat([X[None] + offsets[central], X[None] - offsets[central], X[None] + offsets[forward], X[None]])
    rows = torch.arange(B, device=X.device).repeat(copies.shape[0])
    r = residual_fn(copies.reshape(-1, Pf), s, rows).reshape(copies.shape[0], B, -1)
    n_central, n_forward = len(central), len(forward)
    J = r.new_empty(Pf, *r.shape[1:])
    J[central] = (r[:n_central] - r[n_central:2 * n_central]) / (2 * steps[central])[:, None, None]
    J[forward] = (r[2 * n_central:2 * n_central + n_forward] - r[-1:]) / steps[forward][:, None, None]
    J_frame = J.permute(1, 2, 0)
    if not s.numel():
        return J_frame, X.new_zeros(*J_frame.shape[:2], 0)
    return J_frame, jacfwd(lambda v: residual_fn(X, s + v))(s.new_zeros(s.shape[0]))


def normal_equations(r: torch.Tensor, J_frame: torch.Tensor, J_shared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense J^T J and J^T r over [X (frame-major), s] from the block Jacobians.

    r: (B, N); J_frame: (B, N, Pf); J_shared: (B, N, Ps) -> (P, P), (P,) with P = B * Pf + Ps.
    """
    B, _, Pf = J_frame.shape
    Ps = J_shared.shape[2]
    A = r.new_zeros(B * Pf + Ps, B * Pf + Ps)
    ff = torch.einsum("bnp,bnq->bpq", J_frame, J_frame)
    fs = torch.einsum("bnp,bnq->bpq", J_frame, J_shared)
    for b in range(B):
        sl = slice(b * Pf, (b + 1) * Pf)
        A[sl, sl] = ff[b]
        A[sl, B * Pf:] = fs[b]
        A[B * Pf:, sl] = fs[b].T
    A[B * Pf:, B * Pf:] = torch.einsum("bnp,bnq->pq", J_shared, J_shared)
    g = torch.cat([torch.einsum("bnp,bn->bp", J_frame, r).reshape(-1), torch.einsum("bnp,bn->p", J_shared, r)])
    return A, g


def levenberg_marquardt(residual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], X: torch.Tensor,
                        s: torch.Tensor, iters: int, damping: float = 1e-3, rel_tol: float = 1e-4,
                        jacobians: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Minimise ||residual_fn(X, s)||^2 over per-frame X (B, Pf) and shared s (Ps,).

    Marquardt's scaled damping (diag of J^T J) makes steps invariant to each parameter's units. Stops when
    a step lowers the cost by less than rel_tol (relative): on tracked frames that halves the iterations
    without a measurable change in accuracy. jacobians(X, s) gives the block Jacobians (default:
    forward-mode, block_jacobians). Returns X, s and the final cost.
    """
    jacobians = jacobians or (lambda X_, s_: block_jacobians(residual_fn, X_, s_))
    X, s = X.detach().clone(), s.detach().clone()
    B, Pf = X.shape

    def residuals_at(X_, s_):
        with torch.no_grad():
            return residual_fn(X_, s_)

    r = residuals_at(X, s)  # the residuals at the current X, kept from the step that reached it
    cost = r.pow(2).sum()
    for _ in range(iters):
        A, g = normal_equations(r, *jacobians(X, s))
        diag = A.diagonal().clamp(min=1e-9)
        improved = False
        for _ in range(8):
            step = torch.linalg.solve(A + damping * torch.diag(diag), -g)
            X_new, s_new = X + step[:B * Pf].view(B, Pf), s + step[B * Pf:]
            r_new = residuals_at(X_new, s_new)
            new_cost = r_new.pow(2).sum()
            if torch.isfinite(new_cost) and new_cost < cost:
                improved = True
                break
            damping *= 8
        if not improved:
            break
        decrease = (cost - new_cost) / cost.clamp(min=1e-30)
        X, s, cost, r = X_new, s_new, new_cost, r_new
        damping = max(damping / 4, 1e-9)
        if decrease < rel_tol:
            break
    return X, s, float(cost)


def levenberg_marquardt_frames(residuals: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                               jacobian: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], X: torch.Tensor,
                               iters: int, damping: float = 1e-3, rel_tol: float = 1e-4) -> torch.Tensor:
    """`levenberg_marquardt` for B independent frames solved side by side: each frame has its own damping,
    accepts or rejects its own steps and stops on its own, so one hard frame neither holds back nor is held
    back by the others, and batching them only saves the per-call overhead of many small problems.

    residuals(X_rows, rows) -> (R, N) and jacobian(X_rows, rows) -> (R, N, Pf) evaluate frames `rows` (R,) at
    their parameters X_rows (R, Pf). X: (B, Pf). Returns the new X.
    """
    X = X.detach().clone()
    every = torch.arange(X.shape[0], device=X.device)
    with torch.no_grad():
        r = residuals(X, every)
    cost = r.pow(2).sum(1)
    lam = torch.full_like(cost, damping)
    active = every
    for _ in range(iters):
        if not len(active):
            break
        J = jacobian(X[active], active)
        Jr = torch.cat([J, r[active, :, None]], dim=2)  # J^T J and J^T r in one product
        normal = Jr.transpose(1, 2) @ Jr
        A, g = normal[:, :-1, :-1], normal[:, :-1, -1]
        diag = A.diagonal(dim1=1, dim2=2).clamp(min=1e-9)
        trying = torch.ones(len(active), dtype=torch.bool, device=X.device)
        done = torch.zeros_like(trying)
        for _ in range(8):
            at = trying.nonzero().squeeze(1)
            rows = active[at]
            step = torch.linalg.solve(A[at] + torch.diag_embed(lam[rows, None] * diag[at]), -g[at])
            X_new = X[rows] + step
            with torch.no_grad():
                r_new = residuals(X_new, rows)
            new_cost = r_new.pow(2).sum(1)
            better = torch.isfinite(new_cost) & (new_cost < cost[rows])
            kept = rows[better]
            decrease = (cost[kept] - new_cost[better]) / cost[kept].clamp(min=1e-30)
            X[kept], r[kept], cost[kept] = X_new[better], r_new[better], new_cost[better]
            lam[kept] = (lam[kept] / 4).clamp(min=1e-9)
            lam[rows[~better]] *= 8
            done[at[better]] = decrease < rel_tol
            trying[at[better]] = False
            if not trying.any():
                break
        active = active[~(done | trying)]  # converged, or no better step within 8 dampings
    return X


def fit_lm(problem: Problem, init: FlameParams, obs: Observations, free: Sequence[str], iters: int,
           reference: FlameParams | None = None, free_shape: bool = False, free_focal: bool = False,
           focal_prior: float = 0.0, rounds: int = 2, rel_tol: float = 1e-4,
           jacobian: str | None = None, independent: bool = False) -> tuple[FlameParams, torch.Tensor]:
    """Levenberg-Marquardt over the per-frame fields `free` (and optionally the shared identity and log
    focal). Every residual must depend on one frame only. Returns params and the focal length.

    Discrete choices are made at the start of each of up to `rounds` rounds and held fixed inside it
    (switching them mid-solve makes the energy discontinuous): the jaw-contour landmarks picked by yaw, and
    the terms' `prepare` state (silhouette matches). Without such terms a round only follows when a yaw bin
    moved.

    With a free focal length the translations scale with it: a focal change moves every head along its viewing
    ray and keeps its image size, so the focal only trades perspective and the solver need not crawl along the
    focal/depth valley. rel_tol: `levenberg_marquardt`'s stopping rule. jacobian: analytic | forward |
    differences (default: the problem's, but an exact one whenever the identity is free: it travels along the
    weakly seen size/depth direction, where Jacobian errors of a fraction of a percent stall it).
    independent: the frames share nothing (no free identity or focal) and are solved as separate problems
    side by side (`levenberg_marquardt_frames`) instead of one joint one.
    """
    if independent and (free_shape or free_focal):
        raise ValueError("independent frames cannot share a free identity or focal length")
    if jacobian is None:
        jacobian = problem.jacobian
    if jacobian == "analytic" and not problem.analytic:
        jacobian = "differences"  # a term without its own derivatives
    if jacobian == "differences" and free_shape:
        jacobian = "forward"
    packer = ParamPacker(init, free, free_shape, free_focal)
    X, s = packer.pack(init)
    yaw = None
    for round_index in range(rounds):
        residual_fn, new_yaw, matching, jacobian_fn = _round_residuals(problem, packer, X, s, obs, reference,
                                                                       focal_prior)
        if round_index and not matching and torch.equal(torch.round(new_yaw), torch.round(yaw)):
            break
        yaw = new_yaw
        if independent:
            X = levenberg_marquardt_frames(*_frame_functions(jacobian, residual_fn, jacobian_fn, packer, X, s), X, iters,
                                           rel_tol=rel_tol)
            continue
        jacobians = None
        if jacobian == "analytic":
            jacobians = jacobian_fn
        elif jacobian == "differences":
            jacobians = partial(difference_jacobians, residual_fn, packer.difference_steps(X),
                                one_sided=packer.linear_columns(X))
        X, s, _ = levenberg_marquardt(residual_fn, X, s, iters, rel_tol=rel_tol, jacobians=jacobians)
    params, log_f = packer.unpack_dolly(X, s)
    return params.detach(), (problem.camera.focal.detach() * torch.exp(log_f)).detach()


def _frame_functions(kind: str, residual_fn: Callable, jacobian_fn: Callable, packer: ParamPacker, X: torch.Tensor,
                     s: torch.Tensor) -> tuple[Callable, Callable]:
    """The residuals (X_rows, rows) -> (R, N) and per-frame Jacobian blocks (X_rows, rows) -> (R, N, Pf) of
    frames `rows` that `levenberg_marquardt_frames` takes, the blocks by the method `kind` (fit_lm's
    `jacobian`); the shared parameters s stay fixed."""
    def residuals(X_: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return residual_fn(X_, s, rows)

    if kind == "analytic":
        return residuals, lambda X_, rows: jacobian_fn(X_, s, rows)[0]
    if kind == "differences":
        steps, linear = packer.difference_steps(X), packer.linear_columns(X)
        return residuals, lambda X_, rows: difference_jacobians(lambda Xc, s_, local: residual_fn(Xc, s_, rows[local]),
                                                                steps, X_, s, one_sided=linear)[0]
    return residuals, lambda X_, rows: block_jacobians(lambda Xc, s_: residual_fn(Xc, s_, rows), X_, s)[0]


def _round_residuals(problem: Problem, packer: ParamPacker, X: torch.Tensor, s: torch.Tensor, obs: Observations,
                     reference: FlameParams | None, focal_prior: float):
    """The residual function of one solver round, with its discrete choices made at (X, s); also the yaw that
    picked the jaw contour, whether a term matched correspondences, and the round's analytic block Jacobians
    (X, s) -> (B, N, Pf), (B, N, Ps) (for problems whose terms all have `jacobian`)."""
    focal0 = problem.camera.focal.detach()
    B = X.shape[0]

    def camera_at(log_f: torch.Tensor) -> Camera:
        return Camera(focal0 * torch.exp(log_f), problem.camera.center, problem.camera.height, problem.camera.width)

    params, log_f = packer.unpack_dolly(X, s)
    ev = problem.evaluation(params, obs, camera=camera_at(log_f.detach()))
    yaw = ev.yaw_deg
    state = problem.prepare(ev)
    layout = problem.sparse_layout(state)  # one FLAME pass per evaluation for the landmarks and the matches
    by_rows: dict = {}

    def inputs_of(rows: torch.Tensor) -> tuple:
        """The round's fixed inputs of frames `rows`; difference Jacobians ask for the same rows at every
        iteration, so they are selected once."""
        if "rows" not in by_rows or not torch.equal(by_rows["rows"], rows):
            by_rows.update(rows=rows, obs=obs.frames(rows), yaw=yaw[rows],
                           reference=None if reference is None else reference.frames(rows),
                           state={k: v.frames(rows) for k, v in state.items() if v is not None})
        return by_rows["obs"], by_rows["reference"], by_rows["yaw"], by_rows["state"]

    def residual_fn(X_: torch.Tensor, s_: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) residuals; with `rows`, X_ holds parameters for those frames (repeats allowed)."""
        p, log_f_ = packer.unpack_dolly(X_, s_, rows)
        # Shared terms (identity prior) are spread over the round's B frames however many rows are evaluated.
        if rows is None:
            r = problem.residuals(p, obs, reference, camera_at(log_f_), contour_yaw=yaw, term_state=state,
                                  layout=layout, shared_frames=B)
        else:
            obs_rows, reference_rows, yaw_rows, state_rows = inputs_of(rows)
            r = problem.residuals(p, obs_rows, reference_rows, camera_at(log_f_), contour_yaw=yaw_rows,
                                  term_state=state_rows, layout=layout, shared_frames=B)
        if packer.free_focal:  # the focal prior, shared out over the frames
            r = torch.cat([r, (focal_prior / B) ** 0.5 * log_f_.expand(r.shape[0], 1)], dim=1)
        return r

    fields = packer.frame_fields + (["shape"] if packer.free_shape else [])
    frame_columns = sum(packer.frame_sizes)
    translation = packer.frame_fields.index("translation") if "translation" in packer.frame_fields else None

    def jacobian_fn(X_: torch.Tensor, s_: torch.Tensor,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block Jacobians from the terms' derivatives (with `rows`: of those frames, as residual_fn); the
        focal column (perspective and dolly together) from the terms' `focal_jacobian` where all have one, else
        by one forward-mode pass."""
        p, log_f_ = packer.unpack_dolly(X_, s_, rows)
        inputs = (obs, reference, yaw, state) if rows is None else inputs_of(rows)
        with torch.no_grad():
            ev = problem.evaluation(p, inputs[0], inputs[1], camera_at(log_f_), contour_yaw=inputs[2],
                                    term_state=inputs[3], layout=layout, shared_frames=B)
            J = problem.residual_jacobian(ev, fields)
        if packer.free_focal:
            focal = None
            if rows is None and all(hasattr(term, "focal_jacobian") for term in problem.terms):
                with torch.no_grad():  # the image's scaling, plus the dolly: d translation / d log focal = t
                    focal = torch.cat([term.focal_jacobian(ev) for term in problem.terms], dim=1)
                    if translation is not None:
                        at = sum(packer.frame_sizes[:translation])
                        focal = focal + (J[..., at:at + 3] @ p.translation[:, :, None])[..., 0]
                    prior = (focal_prior / B) ** 0.5 * torch.ones_like(focal[:, :1])
                    focal = torch.cat([focal, prior], dim=1)
            if translation is not None:  # X holds the translations at the initial focal length
                at = sum(packer.frame_sizes[:translation])
                J[..., at:at + 3] *= torch.exp(log_f_)
            J = torch.cat([J, J.new_zeros(X_.shape[0], 1, J.shape[2])], dim=1)  # the focal prior's row
            if focal is None:  # a term without its own focal derivative: one forward-mode pass
                unit = torch.zeros_like(s_)
                unit[-1] = 1
                focal = jacfwd(lambda v: residual_fn(X_, s_ + v * unit))(s_.new_zeros(()))
            return J[..., :frame_columns], torch.cat([J[..., frame_columns:], focal[..., None]], dim=2)
        return J[..., :frame_columns], J[..., frame_columns:]

    return residual_fn, yaw, any(v is not None for v in state.values()), jacobian_fn


def log_focal_std(problem: Problem, params: FlameParams, obs: Observations, free: Sequence[str],
                  focal_prior: float = 0.0) -> float:
    """Laplace estimate of the standard deviation of log(focal) at a joint identity and focal fit: how well
    the frames constrain the focal length (correlations with identity and poses included). The energy's
    residual variance scales the Gauss-Newton covariance, so landmark noise counts as measured."""
    packer = ParamPacker(params, free, free_shape=True, free_focal=True)
    X, s = packer.pack(params)
    with torch.no_grad():
        residual_fn, _, _, jacobian_fn = _round_residuals(problem, packer, X, s, obs, None, focal_prior)
        r = residual_fn(X, s)
    analytic = problem.jacobian == "analytic" and problem.analytic
    A, _ = normal_equations(r, *(jacobian_fn if analytic else partial(block_jacobians, residual_fn))(X, s))
    dof = max(r.numel() - A.shape[0], 1)
    variance = float(r.pow(2).sum()) / dof
    covariance = torch.linalg.pinv(A.double()) * variance
    return float(covariance[-1, -1].clamp(min=0).sqrt())


def leaf_params(params: FlameParams, free: Sequence[str]) -> FlameParams:
    """A copy whose `free` fields are fresh leaf tensors requiring grad (others detached)."""
    out = params.detach()
    for name in free:
        getattr(out, name).requires_grad_(True)
    return out


def adam_minimise(loss_fn: Callable[[], torch.Tensor], tensors: dict[str, torch.Tensor], iters: int, lr: float,
                  final_lr_fraction: float = 0.05) -> float:
    """Minimise loss_fn over the named tensors; the rate decays exponentially to lr * final_lr_fraction."""
    groups = [{"params": [t], "lr": lr * ADAM_LR_SCALE.get(name, 1.0)} for name, t in tensors.items()]
    opt = torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, final_lr_fraction ** (1.0 / max(iters, 1)))
    loss = torch.tensor(float("nan"))
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def fit_adam(problem: Problem, init: FlameParams, obs: Observations, free: Sequence[str], iters: int, lr: float,
             reference: FlameParams | None = None,
             extra: dict[str, torch.Tensor] | None = None) -> FlameParams:
    """Adam over the `free` fields for image-based stages; returns detached parameters.

    extra: further leaf tensors optimised alongside (e.g. a texture or lighting owned by a term), by name.
    """
    params = leaf_params(init, free)
    tensors = {name: getattr(params, name) for name in free}
    tensors.update(extra or {})
    adam_minimise(lambda: problem.energy(params, obs, reference).sum(), tensors, iters, lr)
    return params.detach()
