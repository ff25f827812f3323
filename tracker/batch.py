"""Track many videos with one configuration: `python -m tracker.batch INPUTS... --out DIR`.

INPUTS are video files, folders (their videos, non-recursively), glob patterns or list files (.txt: one input per
line). Each video is tracked by the Python API's `track_with_config` into its run folder DIR/<video name>/,
exactly as `python -m tracker.run` would. Videos whose run finished with the same configuration (summary.json
written) are skipped, so an interrupted batch resumes where it stopped. A failed video is retried once; failures
are recorded and the batch goes on. DIR/batch_summary.csv (rewritten after every video)
lists each video's status, frames, failures, seconds per frame, lost frames and landmark error.

Locally the videos run in separate processes (a crash of one cannot take the batch down), several at once;
with `--ray [ADDRESS]` they run as Ray tasks (one video per task, CPUs and GPUs declared) on a cluster, the workers
writing to DIR, which must then be a path every node sees.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from multiprocessing.connection import wait
from pathlib import Path

from tracker.config import TrackerConfig, config_to_dict, load_config
from tracker.errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    TrackerError,
    interrupt_on_signals,
    report_failure,
    stop_if_signalled,
)
from tracker.io.files import RunFolder, safe_name
from tracker.io.inputs import find_videos

SUMMARY_CSV = "batch_summary.csv"
CORES_PER_VIDEO = 2
"""Cores one video keeps busy: decoding and detection run beside the fit."""
FORWARDED_ENV = ("FLAME_MODEL", "HF_HOME", "HF_HUB_OFFLINE")
"""Environment variables (besides TRACKER_*) that Ray workers get from the driver: where the assets are."""


@dataclass
class VideoRecord:
    """One row of batch_summary.csv."""

    video: str
    status: str = "pending"
    """done (tracked now) | skipped (finished before) | failed | interrupted | pending."""
    frames: int = 0
    failures: int = 0
    """Failed attempts (a video is tried at most twice)."""
    s_per_frame: float = math.nan
    """Wall seconds per frame of the run that produced the outputs."""
    lost_frames: int = 0
    """Frames without a tracked face."""
    lmk_error_px: float = math.nan
    """Mean landmark reprojection error, pixels."""
    error: str = ""
    """Why it failed, or why its result is incomplete (a truncated video)."""
    out_dir: str = ""

    def update_from_summary(self, summary: dict) -> None:
        self.error = "" if summary.get("complete", True) else f"incomplete: {summary.get('incomplete_reason', '')}"
        self.frames = int(summary["frames"])
        self.s_per_frame = float(summary["seconds_per_frame"]["total"])
        self.lost_frames = int(summary["frames"]) - int(summary["valid_frames"])
        self.lmk_error_px = float(summary["lmk_error_px_mean"])


def output_dir(cfg: TrackerConfig, video: Path) -> Path:
    return RunFolder(cfg.output.dir, video).path  # where the run writes


def finished_summary(out_dir: Path, cfg: TrackerConfig) -> dict | None:
    """The summary of a run that finished with this configuration in `out_dir`, else None (never run, stopped
    before its end, other configuration, unreadable). summary.json is a run's last write, and a new run removes
    it first."""
    from tracker.io.export import read_params

    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        _, metadata = read_params(out_dir / "flame_params.npz")
    except (OSError, ValueError, KeyError, TrackerError):
        return None
    same_config = metadata.get("config") == json.loads(json.dumps(config_to_dict(cfg)))
    return summary if same_config else None


def track_one(video: str, cfg: TrackerConfig) -> dict:
    """Track one video through the Python API; its summary (raises on failure)."""
    from tracker.api import track_with_config

    return track_with_config(video, cfg, show_progress=False).summary


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


Outcome = tuple[Path, dict | None, str]
"""(video, summary or None, error message when it failed)."""


class LocalRunner:
    """Runs each video in its own spawned process, `workers` at a time; its stdout/stderr go to batch.log in its
    run folder."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self.context = multiprocessing.get_context("spawn")  # no fork of a process holding torch/MediaPipe threads
        self.running: dict = {}  # connection -> (process, video)

    @property
    def free(self) -> int:
        return self.workers - len(self.running)

    def submit(self, video: Path, cfg: TrackerConfig) -> None:
        receive, send = self.context.Pipe(duplex=False)
        log = output_dir(cfg, video) / "batch.log"
        process = self.context.Process(target=_child, args=(str(video), cfg, self.threads, str(log), send),
                                       name=f"track {video.name}")
        process.start()
        send.close()
        self.running[receive] = (process, video)

    def wait(self) -> list[Outcome]:
        """Block until at least one running video ends; their outcomes."""
        outcomes = []
        ended = []
        while not ended:  # in slices, so that a stop signal whose exception was lost is seen
            stop_if_signalled()
            ended = wait(list(self.running), timeout=1.0)
        for receive in ended:
            process, video = self.running.pop(receive)
            try:
                kind, payload = receive.recv()
            except EOFError:  # the process died without answering (killed, out of memory, native crash)
                kind, payload = "error", None
            process.join()
            if kind == "error" and payload is None:
                payload = f"worker process died (exit code {process.exitcode})"
            outcomes.append((video, payload if kind == "ok" else None, "" if kind == "ok" else payload))
        return outcomes

    def stop(self) -> None:
        for process, _ in self.running.values():
            process.terminate()
        for process, _ in self.running.values():
            process.join()
        self.running.clear()


def _child(video: str, cfg: TrackerConfig, threads: int, log: str, send) -> None:
    """A local worker: track one video, send ("ok", summary) or ("error", message)."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # native libraries log on the file descriptors, not through sys.stderr
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    import torch

    torch.set_num_threads(threads)
    try:
        with interrupt_on_signals():  # terminate() stops the run like Ctrl-C: finished frames are written
            send.send(("ok", track_one(video, cfg)))
    except BaseException as error:  # noqa: BLE001 - every failure is reported, the batch goes on
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        send.send(("error", one_line(error)))
    finally:
        send.close()


class RayRunner:
    """Runs each video as one Ray task (num_cpus / num_gpus declared) on the cluster at `address` (None: a local
    instance, or the one already initialised in this process)."""

    def __init__(self, address: str | None, cpus: float, gpus: float):
        try:
            import ray
        except ImportError:
            raise TrackerError("--ray needs Ray: pip install 'ray>=2'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        env = {k: v for k, v in os.environ.items() if k.startswith("TRACKER_") or k in FORWARDED_ENV}
        # Workers import this checkout of the tracker (a cluster's nodes see it on the shared path).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH")]))
        self.task = ray.remote(track_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=0,
                                                  runtime_env={"env_vars": env})
        self.running: dict = {}  # object ref -> video
        self.free = math.inf  # Ray queues the tasks by their resources

    def submit(self, video: Path, cfg: TrackerConfig) -> None:
        self.running[self.task.remote(str(video), cfg)] = video

    def wait(self) -> list[Outcome]:
        ready = []
        while not ready:  # in slices, as LocalRunner.wait
            stop_if_signalled()
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
        outcomes = []
        for ref in ready:
            video = self.running.pop(ref)
            try:
                outcomes.append((video, self.ray.get(ref), ""))
            except self.ray.exceptions.RayTaskError as error:
                outcomes.append((video, None, one_line(error.cause or error)))
            except self.ray.exceptions.RayError as error:  # the worker or its node died
                outcomes.append((video, None, one_line(error)))
        return outcomes

    def stop(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()


def run_batch(videos: Sequence[Path], cfg: TrackerConfig, runner, retries: int = 1,
              on_record: Callable[[VideoRecord], None] = lambda _record: None) -> list[VideoRecord]:
    """Track `videos` (skipping complete outputs), retrying each failure `retries` times; batch_summary.csv in
    cfg.output.dir is rewritten after every video. Returns the records in input order."""
    records = {video: VideoRecord(str(video), out_dir=str(output_dir(cfg, video))) for video in videos}
    csv_path = Path(cfg.output.dir) / SUMMARY_CSV
    todo: deque[Path] = deque()
    for video, record in records.items():
        summary = finished_summary(output_dir(cfg, video), cfg)
        if summary is None:
            todo.append(video)
        else:
            record.status = "skipped"
            record.update_from_summary(summary)
            on_record(record)
    write_summary_csv(csv_path, records.values())
    try:
        while todo or runner.running:
            while todo and runner.free > 0:
                runner.submit(todo.popleft(), cfg)
            for video, summary, error in runner.wait():
                record = records[video]
                if summary is not None:
                    record.status, record.error = "done", ""
                    record.update_from_summary(summary)
                else:
                    record.failures += 1
                    record.error = error
                    if record.failures <= retries:
                        todo.append(video)
                        continue
                    record.status = "failed"
                on_record(record)
                write_summary_csv(csv_path, records.values())
    except KeyboardInterrupt:
        runner.stop()
        for record in records.values():
            if record.status == "pending":
                record.status = "interrupted"
        write_summary_csv(csv_path, records.values())
        raise
    return list(records.values())


def write_summary_csv(path: Path, records: Iterable[VideoRecord]) -> None:
    """All records as CSV, written to a temporary file and renamed (never half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with open(partial, "w", newline="") as out:
        writer = csv.DictWriter(out, [f.name for f in fields(VideoRecord)])
        writer.writeheader()
        for record in records:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(record).items()})
    partial.replace(path)


def check_unique_names(videos: Sequence[Path]) -> None:
    """Two videos of one name would claim one run folder at the same moment (a single run gives the second its
    own folder, but concurrent workers could race for it): refused."""
    seen: dict[str, Path] = {}
    for video in videos:
        name = safe_name(video)
        if name in seen:
            raise TrackerError(f"two inputs share the name {name!r} ({seen[name]} and {video}); their run folders "
                               "would collide: rename one or run them in separate batches")
        seen[name] = video


def build_parser() -> argparse.ArgumentParser:
    from tracker.run import FLAGS

    parser = argparse.ArgumentParser(prog="python -m tracker.batch", description=__doc__.split("\n", 1)[0],
                                     epilog="Tracking options are those of python -m tracker.run (same names and "
                                            "meaning). Exit codes: 0 all tracked, 1 a video failed or bad input, "
                                            "2 usage, 3 missing model/asset, 128+N signal N.")
    parser.add_argument("inputs", nargs="+", help="videos, folders, glob patterns or .txt lists of them")
    parser.add_argument("--config", help="YAML config: a file, or a name in configs/ (e.g. default.yaml)")
    parser.add_argument("--workers", type=int, help=f"videos tracked at once locally (default: cores / "
                                                    f"{CORES_PER_VIDEO})")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run on a Ray cluster (ADDRESS, e.g. auto or ray://head:10001; none: a local instance)")
    parser.add_argument("--cpus-per-video", type=float, default=CORES_PER_VIDEO, help="Ray: CPUs each task declares")
    parser.add_argument("--gpus-per-video", type=float, help="Ray: GPUs each task declares (default 1 with "
                                                              "--device cuda, else 0)")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed video (default: %(default)s)")
    for flag in FLAGS:  # every tracking option of tracker.run
        parser.add_argument(flag.option, dest=flag.dest, help=flag.help, **flag.kwargs)
    return parser


def make_runner(args: argparse.Namespace, cfg: TrackerConfig) -> LocalRunner | RayRunner:
    if args.ray is not None:
        gpus = args.gpus_per_video if args.gpus_per_video is not None else float(cfg.device.startswith("cuda"))
        return RayRunner(args.ray or None, args.cpus_per_video, gpus)
    cores = os.cpu_count() or 1
    workers = max(1, args.workers or cores // CORES_PER_VIDEO)
    return LocalRunner(workers, threads=max(1, cores // workers))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR is required")
    with interrupt_on_signals():
        try:
            from tqdm import tqdm

            from tracker.run import overrides_from_args

            cfg = load_config(args.config, overrides_from_args(args))
            cfg.output.dir = str(Path(cfg.output.dir).resolve())  # the same folder for every worker
            videos = find_videos(args.inputs)
            check_unique_names(videos)
            runner = make_runner(args, cfg)
            with tqdm(total=len(videos), desc="videos", unit="video") as bar:
                def show(record: VideoRecord) -> None:
                    bar.update(1)
                    bar.set_postfix_str(f"{Path(record.video).name}: {record.status}")

                records = run_batch(videos, cfg, runner, args.retries, on_record=show)
        except (Exception, KeyboardInterrupt) as exc:
            return report_failure(exc, kept=f"finished videos are listed in {Path(args.out) / SUMMARY_CSV}; run "
                                            "the same command again to resume")
    counts = {status: sum(r.status == status for r in records) for status in ("done", "skipped", "failed")}
    print(f"{len(records)} videos: {counts['done']} tracked, {counts['skipped']} finished before, "
          f"{counts['failed']} failed; summary: {Path(args.out) / SUMMARY_CSV}")
    for record in records:
        if record.status == "failed" or record.error:
            print(f"  {record.status}: {record.video}: {record.error}", file=sys.stderr)
    return EXIT_BAD_INPUT if counts["failed"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
