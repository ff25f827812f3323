"""Tables, plots, overlay frames and the written report of an evaluation run (eval/results/<run>/).

`ConfigResults` holds what `eval.run` measured for one tracker configuration; `write_report` turns a list of
them into table.md / table.csv / table.json (one row per configuration), plots/*.png, overlays/*.png and
report.md / report.html. Aggregates are over all frames of all sequences (frame-weighted); NaN values (frames
not measured) are left out.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.baselines import ROW_LABELS, YAW_BINS, RowScores  # noqa: E402
from eval.metrics import bin_by_abs_yaw, finite_median  # noqa: E402
from eval.real.evaluate import VideoScores  # noqa: E402
from eval.synthetic.evaluate import SequenceScores  # noqa: E402
from tracker.camera import Camera, to_camera  # noqa: E402
from tracker.render import vertex_normals  # noqa: E402
from tracker.render.overlay import draw_landmarks, draw_mesh  # noqa: E402

YAW_EDGES = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0, 90.0)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("config", "config"),
    ("syn_v2v_rigid_mm", "synthetic vertex error, rigidly aligned (mm)"),
    ("syn_v2v_mm", "synthetic vertex error, no alignment (mm)"),
    ("syn_reproj_px", "synthetic 2D vertex error (px)"),
    ("syn_nme68_pct", "synthetic 68-landmark NME (% of box size)"),
    ("syn_expr_l2", "synthetic expression coefficient error (L2)"),
    ("syn_jaw_deg", "synthetic jaw rotation error (deg)"),
    ("syn_rot_deg", "synthetic head rotation error (deg)"),
    ("syn_jitter_mm", "synthetic jitter on static segments (mm/frame^2)"),
    ("syn_psnr_db", "synthetic photometric PSNR in the face (dB)"),
    ("syn_ssim", "synthetic photometric SSIM in the face"),
    ("syn_valid_pct", "synthetic frames tracked (%)"),
    ("syn_focal_err_pct", "synthetic |focal length error| (%)"),
    ("real_nme_heldout_pct", "real NME against the detector the config did not track with (% of box size; "
                             "rows tracked with different detectors have different references)"),
    ("real_nme_vs_mediapipe_pct", "real NME against MediaPipe's landmarks (% of box size)"),
    ("real_nme_vs_dlib_pct", "real NME against dlib's 68 landmarks (% of box size)"),
    ("real_psnr_db", "real photometric PSNR in the face (dB)"),
    ("real_ssim", "real photometric SSIM in the face"),
    ("real_jaw_iod", "real: dlib jaw points 0-16 to the mesh's projected jaw/cheek outline (point to curve), "
                     "inter-ocular distances (median over clips of each clip's median)"),
    ("real_inner51_iod", "real: dlib points 17-67 to the mesh's landmarks, inter-ocular distances (median over "
                         "clips of each clip's median)"),
    ("real_jitter_mm", "real vertex acceleration (mm/frame^2)"),
    ("real_valid_pct", "real frames tracked (%)"),
    ("s_per_frame", "seconds per frame, all stages (incl. one-off identity; measured with memory tracing on, see "
                    "the speed benchmark for clean timings)"),
    ("fit_s_per_frame", "seconds per frame, per-frame fitting"),
    ("peak_heap_mb", "peak Python heap during a run (MB)"),
)


@dataclass
class ConfigResults:
    """What one configuration scored (the report's input)."""

    name: str
    description: str = ""
    skipped: str | None = None
    synthetic: dict[str, SequenceScores] = field(default_factory=dict)
    real: dict[str, VideoScores] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    """Tracker run summary per video name (frames, seconds per stage)."""
    peak_heap_mb: float = float("nan")
    overlays: list[tuple[str, str]] = field(default_factory=list)
    """(caption, path relative to the run folder) of the overlay images."""
    failures: dict[str, str] = field(default_factory=dict)
    """Video name -> why the tracker produced nothing for it."""
    baselines: dict[str, list[RowScores]] = field(default_factory=dict)
    """Synthetic sequence -> the track's row and its baseline rows on the same frames (eval.baselines)."""


def nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def clip_medians(scores: dict, metric: str) -> np.ndarray:
    """Each video's median of a per-frame metric (NaN for a video without a finite value)."""
    return np.array([finite_median(s.per_frame[metric]) for s in scores.values() if metric in s.per_frame])


def joined(scores: dict, metric: str) -> np.ndarray:
    """One metric's per-frame values of all sequences/videos, concatenated."""
    arrays = [s.per_frame[metric] for s in scores.values() if metric in s.per_frame]
    return np.concatenate(arrays) if arrays else np.array([])


def stage_seconds_per_frame(summaries: dict[str, dict]) -> dict[str, float]:
    """Seconds per frame of each tracker stage over all runs (total seconds / total frames)."""
    frames = sum(s["frames"] for s in summaries.values())
    stages: dict[str, float] = {}
    for summary in summaries.values():
        for stage, seconds in summary["seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {k: v / frames for k, v in stages.items()} if frames else {}


def summary_row(result: ConfigResults) -> dict[str, float | str]:
    """The table row of one configuration (see COLUMNS)."""
    syn, real = result.synthetic, result.real
    stages = stage_seconds_per_frame(result.summaries)
    frames_syn = sum(len(s.per_frame["valid"]) for s in syn.values())
    frames_real = sum(len(s.per_frame["valid"]) for s in real.values())
    row: dict[str, float | str] = {
        "config": result.name,
        "syn_v2v_rigid_mm": nanmean(joined(syn, "v2v_rigid_mm")),
        "syn_v2v_mm": nanmean(joined(syn, "v2v_mm")),
        "syn_reproj_px": nanmean(joined(syn, "reproj_px")),
        "syn_nme68_pct": 100 * nanmean(joined(syn, "nme68")),
        "syn_expr_l2": nanmean(joined(syn, "expr_l2")),
        "syn_jaw_deg": nanmean(joined(syn, "jaw_deg")),
        "syn_rot_deg": nanmean(joined(syn, "rot_deg")),
        "syn_jitter_mm": nanmean(np.array([s.jitter_mm for s in syn.values()])),
        "syn_psnr_db": nanmean(joined(syn, "psnr_db")),
        "syn_ssim": nanmean(joined(syn, "ssim")),
        "syn_valid_pct": 100 * joined(syn, "valid").sum() / frames_syn if frames_syn else float("nan"),
        "syn_focal_err_pct": nanmean(np.abs([s.focal_error_pct for s in syn.values()])),
        "real_nme_heldout_pct": 100 * nanmean(joined(real, "nme_heldout")),
        "real_nme_vs_mediapipe_pct": 100 * nanmean(joined(real, "nme_vs_mediapipe")),
        "real_nme_vs_dlib_pct": 100 * nanmean(joined(real, "nme_vs_dlib")),
        "real_psnr_db": nanmean(joined(real, "psnr_db")),
        "real_ssim": nanmean(joined(real, "ssim")),
        "real_jaw_iod": finite_median(clip_medians(real, "jaw_iod")),
        "real_inner51_iod": finite_median(clip_medians(real, "inner51_iod")),
        "real_jitter_mm": nanmean(np.array([s.jitter_mm for s in real.values()])),
        "real_valid_pct": 100 * joined(real, "valid").sum() / frames_real if frames_real else float("nan"),
        "s_per_frame": sum(stages.values()) if stages else float("nan"),
        "fit_s_per_frame": stages.get("fitting", float("nan")),
        "peak_heap_mb": result.peak_heap_mb,
    }
    return row


def format_value(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[float | str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


COMPARISON_HEADER = ("row", "face err rigid mm", *[f"|yaw| {b}" for b in YAW_BINS], "2D reproj px", "focal err %",
                     "camera-space err mm", "static jitter mm/f^2", "truth jitter mm/f^2", "lost %")
COMPARISON_LEGEND = ("Medians over frames; face err rigid: face-region vertex error after per-frame rigid "
                     "alignment (also per |yaw| bin, degrees); 2D reproj: face vertices the true camera sees, each "
                     "mesh through its own camera; camera-space err: no alignment; static jitter: face-vertex "
                     "acceleration on frames where the head does not move, beside the truth's; lost: frames "
                     "reported without a face. Rows: " + "; ".join(f"{k}: {v}" for k, v in ROW_LABELS.items()) + ".")


def comparison_cells(row: RowScores) -> list[float | str]:
    """One row of the comparison table (COMPARISON_HEADER)."""
    return [row.name, row.v2v_rigid_mm, *row.v2v_rigid_by_yaw.values(), row.reproj_px, row.focal_error_pct,
            row.v2v_mm, row.jitter_mm, row.truth_jitter_mm, row.lost_pct]


def comparison_markdown(sections: dict[str, list[RowScores]]) -> str:
    """A table per titled section (e.g. "landmarks / turns"), the legend after them."""
    parts = [f"**{title}**\n\n{markdown_table(COMPARISON_HEADER, [comparison_cells(r) for r in rows])}"
             for title, rows in sections.items()]
    return "\n\n".join(parts + [COMPARISON_LEGEND]) + "\n"


def comparison_sections(results: list[ConfigResults]) -> dict[str, list[RowScores]]:
    return {f"{r.name} / {sequence}": rows for r in results for sequence, rows in r.baselines.items()}


def write_tables(rows: list[dict], out_dir: Path, comparison: dict[str, list[RowScores]] | None = None) -> None:
    """table.md (with a column legend, then each synthetic track beside its baselines), table.csv and
    table.json."""
    keys = [k for k, _ in COLUMNS]
    legend = "\n".join(f"- `{k}`: {text}" for k, text in COLUMNS[1:])
    table = markdown_table(keys, [[r[k] for k in keys] for r in rows])
    baselines = f"\n## Synthetic tracks beside their baselines\n\n{comparison_markdown(comparison)}" \
        if comparison else ""
    (out_dir / "table.md").write_text(f"{table}\n\n{legend}\n{baselines}")
    with open(out_dir / "table.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    (out_dir / "table.json").write_text(json.dumps(rows, indent=1, default=_json_number))


def _json_number(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------


def plot_error_vs_frame(results: list[ConfigResults], path: Path, metric: str = "v2v_rigid_mm") -> None:
    """One panel per synthetic sequence: the metric over frames for each config, |yaw| in grey."""
    names = sorted({n for r in results for n in r.synthetic})
    if not names:
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        yaw_ax = ax.twinx()
        for result in results:
            scores = result.synthetic.get(name)
            if scores is None:
                continue
            ax.plot(scores.per_frame[metric], label=result.name, lw=1.2)
            yaw = np.abs(scores.per_frame["yaw_deg"])
        yaw_ax.fill_between(np.arange(len(yaw)), yaw, color="0.85", zorder=0, step="mid")
        yaw_ax.set_ylabel("|yaw| (deg)", color="0.5")
        ax.set_zorder(yaw_ax.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(metric)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def values_by_segment_kind(result: ConfigResults, metric: str) -> dict[str, np.ndarray]:
    """A synthetic metric's per-frame values grouped by the kind of segment the frame belongs to."""
    groups: dict[str, list[np.ndarray]] = {}
    for scores in result.synthetic.values():
        kinds = np.array(scores.segment_kinds)[scores.per_frame["segment"].astype(int)]
        for kind in np.unique(kinds):
            groups.setdefault(str(kind), []).append(scores.per_frame[metric][kinds == kind])
    return {kind: np.concatenate(parts) for kind, parts in groups.items()}


def yaw_bins(result: ConfigResults, metric: str) -> list:
    return bin_by_abs_yaw(joined(result.synthetic, metric), joined(result.synthetic, "yaw_deg"), YAW_EDGES)


def plot_error_vs_yaw(results: list[ConfigResults], path: Path,
                      metrics: Sequence[str] = ("v2v_rigid_mm", "nme68", "rot_deg")) -> None:
    """Mean error per |yaw| bin, grouped bars per config."""
    shown = [r for r in results if r.synthetic]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / len(shown)
    labels = [f"{a:.0f}-{b:.0f}" for a, b in zip(YAW_EDGES[:-1], YAW_EDGES[1:], strict=True)]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, result in enumerate(shown):
            means = [b.mean for b in yaw_bins(result, metric)]
            ax.bar(np.arange(len(labels)) + i * width, means, width, label=result.name)
        ax.set_xticks(np.arange(len(labels)) + width * (len(shown) - 1) / 2, labels, fontsize=8)
        ax.set_xlabel("|yaw| (deg)")
        ax.set_title(metric, fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runtime(results: list[ConfigResults], path: Path, bench: dict | None = None) -> None:
    """Stacked seconds per frame by stage for each config (the benchmark's medians when there is one)."""
    per_config = {}
    for result in results:
        if bench and result.name in bench.get("configs", {}):
            per_config[result.name] = bench["configs"][result.name]["median_s_per_frame"]
        elif result.summaries:
            per_config[result.name] = stage_seconds_per_frame(result.summaries)
    if not per_config:
        return
    stages = sorted({s for v in per_config.values() for s in v})
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(per_config) + 1.6))
    left = np.zeros(len(per_config))
    for stage in stages:
        values = np.array([v.get(stage, 0.0) for v in per_config.values()])
        ax.barh(list(per_config), values, left=left, label=stage)
        left += values
    ax.set_xlabel("seconds per frame" + (" (median of benchmark runs)" if bench else ""))
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Overlay frames
# ------------------------------------------------------------------------------------------------------------


def worst_and_median(values: np.ndarray) -> dict[str, int]:
    """Rows of the largest value and of the value nearest the median (finite values only)."""
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return {}
    median = np.median(values[finite])
    return {"worst": int(finite[np.argmax(values[finite])]),
            "median": int(finite[np.argmin(np.abs(values[finite] - median))])}


@torch.no_grad()
def mesh_overlay(frame: np.ndarray, vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
                 points: np.ndarray | None, label: str, color: tuple[int, int, int] = (120, 200, 255)) -> np.ndarray:
    """The frame with a shaded mesh (V, 3 world vertices) blended over it, landmark dots and a label."""
    pixels, depth = camera.project(vertices)
    screen = torch.cat([pixels, depth[:, None]], dim=-1)
    normals = vertex_normals(to_camera(vertices)[None], faces)[0]
    out = draw_mesh(frame, screen, faces, normals, alpha=0.55, color=color)
    if points is not None:
        out = draw_landmarks(out, points, color=(0, 255, 0), radius=2)
    cv2.putText(out, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    return out


def save_panel(path: Path, panels: Sequence[np.ndarray], max_height: int = 360) -> None:
    """Side-by-side RGB panels, scaled to at most max_height pixels high, as PNG."""
    scale = min(1.0, max_height / panels[0].shape[0])
    resized = [cv2.resize(p, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for p in panels]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(resized, axis=1), cv2.COLOR_RGB2BGR))


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Blocks of a document written both as markdown and as HTML."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[float | str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def image(self, path: str, caption: str) -> None:
        self.blocks.append(("image", (path, caption)))

    def markdown(self) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append("#" * value[0] + " " + value[1])
            elif kind == "text":
                parts.append(value)
            elif kind == "table":
                parts.append(markdown_table(*value))
            else:
                parts.append(f"![{value[1]}]({value[0]})\n\n*{value[1]}*")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
                 "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
                 "</style>"]
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "text":
                parts.append("<p>" + html.escape(value).replace("\n", "<br>") + "</p>")
            elif kind == "table":
                header, rows = value
                cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
                               for row in rows)
                parts.append(f"<table><tr>{cells}</tr>{body}</table>")
            else:
                parts.append(f"<figure><img src='{html.escape(value[0])}'><figcaption>{html.escape(value[1])}"
                             "</figcaption></figure>")
        return "\n".join(parts) + "\n"


def write_report(results: list[ConfigResults], out_dir: Path, run_info: dict, bench: dict | None = None,
                 dense: dict | None = None) -> Path:
    """All tables, plots and report.md / report.html of a run; returns the markdown report's path."""
    measured = [r for r in results if r.skipped is None]
    rows = [summary_row(r) for r in measured]
    write_tables(rows, out_dir, comparison_sections(measured))
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_error_vs_frame(measured, plots / "error_vs_frame.png")
    plot_error_vs_yaw(measured, plots / "error_vs_yaw.png")
    plot_runtime(measured, plots / "runtime_per_stage.png", bench)

    doc = Report()
    doc.heading(f"Tracker evaluation: {run_info['name']}", 1)
    doc.text("\n".join(f"- {k}: {v}" for k, v in run_info.items() if k != "name"))
    doc.heading("Summary (one row per configuration)")
    keys = [k for k, _ in COLUMNS]
    doc.table(keys, [[r[k] for k in keys] for r in rows])
    doc.text("\n".join(f"- `{k}`: {text}" for k, text in COLUMNS[1:]))
    skipped = [r for r in results if r.skipped is not None]
    if skipped:
        doc.heading("Skipped configurations")
        doc.text("\n".join(f"- {r.name}: {r.skipped}" for r in skipped))
    failures = [(r.name, v, why) for r in measured for v, why in r.failures.items()]
    if failures:
        doc.heading("Runs without output")
        doc.text("\n".join(f"- {c} on {v}: {why}" for c, v, why in failures))
    _synthetic_sections(doc, measured)
    _comparison_section(doc, comparison_sections(measured))
    _real_sections(doc, measured)
    _dense_section(doc, dense)
    _speed_sections(doc, measured, bench)
    overlays = [(r.name, caption, path) for r in measured for caption, path in r.overlays]
    if overlays:
        doc.heading("Overlay frames (worst and median)")
        for name, caption, path in overlays:
            doc.image(path, f"{name}: {caption}")
    (out_dir / "report.md").write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html(f"Tracker evaluation: {run_info['name']}"))
    return out_dir / "report.md"


def _synthetic_sections(doc: Report, results: list[ConfigResults]) -> None:
    if not any(r.synthetic for r in results):
        return
    doc.heading("Synthetic sequences (exact ground truth)")
    metrics = ("v2v_rigid_mm", "v2v_mm", "nme68", "rot_deg", "expr_l2", "psnr_db")
    rows = []
    for result in results:
        for name, s in result.synthetic.items():
            rows.append([result.name, name, *[nanmean(s.per_frame[m]) for m in metrics], s.jitter_mm,
                         100 * s.valid_ratio, s.focal_error_pct])
    doc.table(["config", "sequence", *metrics, "jitter_mm", "valid_pct", "focal_err_pct"], rows)
    doc.heading("Error by segment kind (synthetic)", 3)
    kind_metrics = ("v2v_rigid_mm", "nme68", "rot_deg", "jaw_deg", "valid")
    rows = []
    for result in results:
        grouped = {m: values_by_segment_kind(result, m) for m in kind_metrics}
        for kind, valid in grouped["valid"].items():
            rows.append([result.name, kind, float(len(valid)), *[nanmean(grouped[m][kind]) for m in kind_metrics[:-1]],
                         100 * nanmean(valid)])
    doc.table(["config", "segment kind", "frames", *kind_metrics[:-1], "valid_pct"], rows)
    doc.heading("Error by |yaw| (synthetic)", 3)
    header = ["|yaw| bin (deg)", "frames"]
    columns = []
    for result in results:
        for metric in ("v2v_rigid_mm", "nme68", "rot_deg"):
            header.append(f"{result.name} {metric}")
            columns.append(yaw_bins(result, metric))
    bins = columns[0]
    doc.table(header, [[f"{b.lower:.0f}-{b.upper:.0f}", float(b.count), *[c[i].mean for c in columns]]
                       for i, b in enumerate(bins)])
    doc.image("plots/error_vs_frame.png", "rigidly aligned face vertex error over frames (|yaw| shaded)")
    doc.image("plots/error_vs_yaw.png", "mean errors by |yaw| bin")


def _comparison_section(doc: Report, sections: dict[str, list[RowScores]]) -> None:
    if not sections:
        return
    doc.heading("Synthetic tracks beside their baselines (same frames)")
    for title, rows in sections.items():
        doc.heading(title, 3)
        doc.table(COMPARISON_HEADER, [comparison_cells(r) for r in rows])
    doc.text(COMPARISON_LEGEND)


def _real_sections(doc: Report, results: list[ConfigResults]) -> None:
    if not any(r.real for r in results):
        return
    doc.heading("Real videos (no 3D truth)")
    rows = []
    for result in results:
        for name, s in result.real.items():
            summary = result.summaries.get(name, {})
            nme = s.per_frame["nme_heldout"]
            median = float(np.nanmedian(nme)) if np.isfinite(nme).any() else float("nan")
            rows.append([result.name, name, s.heldout_detector, 100 * nanmean(nme), 100 * median,
                         100 * nanmean(s.per_frame["nme_vs_mediapipe"]), 100 * nanmean(s.per_frame["nme_vs_dlib"]),
                         finite_median(s.per_frame["jaw_iod"]), finite_median(s.per_frame["inner51_iod"]),
                         nanmean(s.per_frame["psnr_db"]), nanmean(s.per_frame["ssim"]), s.jitter_mm,
                         100 * s.valid_ratio, summary.get("seconds_per_frame", {}).get("total", float("nan"))])
    doc.table(["config", "video", "held-out detector", "nme_heldout_pct", "median_nme_heldout_pct",
               "nme_vs_mediapipe_pct", "nme_vs_dlib_pct", "jaw_iod_median", "inner51_iod_median", "psnr_db", "ssim",
               "jitter_mm", "valid_pct", "s_per_frame"], rows)


def _dense_section(doc: Report, dense: dict | None) -> None:
    if not dense:
        return
    doc.heading("Dense correspondence of uvw predictors (synthetic)")
    doc.text("Geodesic error between the vertex a predictor's uvw matches and the vertex the pixel shows; ratio of "
             "points within 5/10/20 mm and GPS (kappa 10 mm). oracle_exact is the ceiling of the measure (pixels "
             "snap to vertices), oracle_degraded a calibration with known errors.")
    scores = dense["scores"]
    keys = list(next(iter(scores.values()))) if scores else []
    doc.table(["predictor", *keys], [[name, *[s[k] for k in keys]] for name, s in scores.items()])
    if dense["skipped"]:
        doc.text("\n".join(f"- {name} not scored: {why}" for name, why in dense["skipped"].items()))


def _speed_sections(doc: Report, results: list[ConfigResults], bench: dict | None) -> None:
    doc.heading("Speed")
    stages = sorted({s for r in results for s in stage_seconds_per_frame(r.summaries)})
    doc.text("Seconds per frame by tracker stage over all evaluated videos (total stage time / frames; the "
             "identity stage runs once per video, so short clips inflate it).")
    doc.table(["config", *stages], [[r.name, *[stage_seconds_per_frame(r.summaries).get(s, float("nan"))
                                                for s in stages]] for r in results])
    if bench:
        doc.heading("Speed benchmark (median of runs)", 3)
        doc.text(f"Machine: {bench['machine']}. Video: {bench['video']} ({bench['frames']} frames), "
                 f"{bench['runs']} runs per configuration.")
        bench_stages = sorted({s for c in bench["configs"].values() for s in c["median_s_per_frame"]})
        doc.table(["config", *bench_stages], [[name, *[c["median_s_per_frame"].get(s, float("nan"))
                                                      for s in bench_stages]] for name, c in bench["configs"].items()])
    doc.image("plots/runtime_per_stage.png", "seconds per frame by stage")
