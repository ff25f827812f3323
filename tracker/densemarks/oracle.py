"""Evaluation-only oracle standing in for the DenseMarks network on synthetic sequences.

`OracleDenseMarks` renders uvw maps from the ground-truth FLAME geometry of a synthetic sequence: each surface
point shows its template position normalised to the unit cube over the whole head, (v_template - min) /
(max - min) per axis, which is what a perfect DenseMarks would predict up to its own choice of cube. Controlled
degradations (`OracleNoise`) imitate a real network: per-pixel noise, blur across edges, outlier pixels, a smooth
bias that is the same in every frame (systematic error), and a random smooth field on the background (the
network has no mask output).

It needs the ground-truth parameters and camera, read from an npz in the tracker's export format whose metadata
says {"synthetic": true}; `check_oracle_allowed` refuses anything else, so real videos never get an oracle. The
file's extrinsics R, t are honoured whatever world convention they use (e.g. R = I with the axis flip inside the
global rotation): the head is moved into the tracker's world once (`in_tracker_world`); intrinsics the tracker's
camera cannot represent, and R that are not rotations, are refused with one line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from tracker.camera import WORLD_TO_CAMERA, Camera
from tracker.densemarks.canonical import crop_affine, crop_screen_vertices, render_attributes
from tracker.densemarks.predict import CropBox, UvwPrediction, frame_to_crop_affine
from tracker.errors import TrackerError
from tracker.flame.lbs import batch_rodrigues, matrix_to_axis_angle
from tracker.flame.model import FlameModel, FlameParams
from tracker.io.export import camera_from_arrays, params_from_arrays, read_params

SYNTHETIC_KEY = "synthetic"
"""Metadata key that marks a ground-truth file as synthetic (the oracle's precondition)."""


@dataclass(frozen=True)
class OracleNoise:
    """Degradations of the oracle's maps (all zero: exact maps)."""

    noise_std: float = 0.0
    """Per-pixel Gaussian noise, cube units."""
    blur_fraction: float = 0.0
    """Gaussian blur sigma as a fraction of the crop side (smears values across silhouettes)."""
    dropout: float = 0.0
    """Fraction of pixels replaced by uniformly random cube points (outliers)."""
    bias_amplitude: float = 0.0
    """Amplitude of a smooth bias field over the cube, identical in every frame, cube units."""
    seed: int = 0
    """Seed of the random fields (per-frame fields also depend on the frame index)."""


CALIBRATED_NOISE = OracleNoise(noise_std=0.01, blur_fraction=0.002, dropout=0.04, bias_amplitude=0.01, seed=7)
"""Degradations whose point matching scores like the real network's on NeRSemble (PCK@0.05 0.90): measured by
eval.densemarks_calibration at PCK@0.05 0.91, mean error 5.3% of the crop side (27 px at 512; the paper's 3.68
read as a percentage), median 6.5 px; the exact oracle scores 1.00 and 0.2%. The bias field (2.5 mm on a 25 cm
cube) is the network's systematic error: the same in every frame, invisible to point matching."""


def template_cube_coordinates(v_template: torch.Tensor) -> torch.Tensor:
    """(V, 3) template vertices -> (V, 3) positions in the unit cube spanned by their bounding box."""
    low, high = v_template.amin(0), v_template.amax(0)
    return (v_template - low) / (high - low)


def smooth_bias(coords: torch.Tensor, amplitude: float, seed: int, waves: int = 4) -> torch.Tensor:
    """A smooth random vector field over the cube at coords (N, 3) -> (N, 3): a sum of a few sinusoids of about
    one period per cube, scaled so each channel stays within +-amplitude."""
    g = torch.Generator().manual_seed(seed)
    frequency = (torch.randn(waves, 3, 3, generator=g) * 2 * np.pi).to(coords)
    phase = (torch.rand(waves, 3, generator=g) * 2 * np.pi).to(coords)
    field = torch.sin(torch.einsum("nc,wkc->nwk", coords, frequency) + phase).sum(1)
    return amplitude * field / waves


def background_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) smooth random values in [0, 1]: what the net might say where there is no head."""
    coarse = rng.random((4, 4, 3)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


@dataclass
class OracleGroundTruth:
    """Ground truth of a synthetic sequence: parameters per frame and the camera."""

    params: FlameParams
    camera: Camera
    frame_index: np.ndarray
    """(T,) video frame index of each row of params."""
    metadata: dict
    rotation: np.ndarray | None = None
    """(T, 3, 3) world-to-camera rotations R of the file (OpenCV axes); None: the tracker's own diag(1, -1, -1)."""
    translation: np.ndarray | None = None
    """(T, 3) world-to-camera translations t of the file; None: 0."""


def check_oracle_allowed(ground_truth: str | Path | None) -> Path:
    """The ground-truth file if it exists and is marked synthetic; raises TrackerError otherwise (the oracle
    must never run on a real video)."""
    if not ground_truth:
        raise TrackerError("the DenseMarks oracle needs the ground-truth npz of a synthetic sequence "
                           "(densemarks.oracle_ground_truth); it is for evaluation only and refused on real videos")
    path = Path(ground_truth)
    if not path.is_file():
        raise TrackerError(f"oracle ground truth {path} does not exist")
    try:
        _, metadata = read_params(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise TrackerError(f"oracle ground truth {path} is not a readable parameter npz ({error})") from None
    if metadata.get(SYNTHETIC_KEY) is not True:
        raise TrackerError(f"oracle ground truth {path} is not marked synthetic (metadata "
                           f"{{\"{SYNTHETIC_KEY}\": true}}): the DenseMarks oracle is for evaluation on synthetic "
                           "sequences only")
    return path


def load_oracle_ground_truth(path: str | Path, device: torch.device | str = "cpu") -> OracleGroundTruth:
    """Read a synthetic sequence's ground truth (export format, see tracker.io.export); checks it first.

    Its extrinsics R, t (pixel = K (R X + t) / depth) are kept, whatever world they use; intrinsics must be
    one pinhole with square pixels for the whole sequence (the tracker's camera), else TrackerError.
    """
    path = check_oracle_allowed(path)
    arrays, metadata = read_params(path)
    params = params_from_arrays(arrays, arrays["shape"].size, arrays["expr"].shape[1]).map(lambda t: t.to(device))
    K = np.asarray(arrays["K"], np.float64).reshape(-1, 3, 3)
    if not (np.allclose(K, K[:1], atol=1e-6) and abs(K[0, 0, 0] - K[0, 1, 1]) < 1e-6 * K[0, 0, 0]
            and abs(K[0, 0, 1]) < 1e-9 and np.allclose(K[0, 2], [0, 0, 1])):
        raise TrackerError(f"oracle ground truth {path}: the intrinsics K vary over frames or have non-square "
                           "pixels or skew, which the tracker's single pinhole camera cannot represent")
    camera = camera_from_arrays(arrays)
    camera = Camera(camera.focal.to(device), camera.center.to(device), camera.height, camera.width)
    T = params.batch_size
    rotation = np.broadcast_to(np.asarray(arrays.get("R", WORLD_TO_CAMERA.cpu().numpy()), np.float64), (T, 3, 3))
    translation = np.broadcast_to(np.asarray(arrays.get("t", np.zeros(3)), np.float64), (T, 3))
    orthonormal = np.abs(rotation @ rotation.transpose(0, 2, 1) - np.eye(3)).max() < 1e-4
    if not orthonormal or (np.linalg.det(rotation) < 0).any():
        raise TrackerError(f"oracle ground truth {path}: its extrinsics R are not rotations (det +1); only rigid "
                           "world-to-camera transforms are supported")
    return OracleGroundTruth(params, camera, np.asarray(arrays["frame_index"], np.int64), metadata,
                             rotation.copy(), translation.copy())


@torch.no_grad()
def in_tracker_world(model: FlameModel, params: FlameParams, rotation: np.ndarray | None,
                     translation: np.ndarray | None) -> FlameParams:
    """Parameters whose FLAME mesh, seen through the tracker's camera (world-to-camera diag(1, -1, -1), t = 0),
    projects as `params` does through extrinsics R (T, 3, 3), t (T, 3): the head is moved by the rigid motion
    M = diag(1, -1, -1) R, u = diag(1, -1, -1) t, which composes exactly with FLAME's global rotation about its
    root joint (X' = M X + u)."""
    if rotation is None:
        return params
    flip = WORLD_TO_CAMERA.double()
    motion = flip @ torch.as_tensor(rotation, dtype=torch.float64)
    shift = torch.as_tensor(np.zeros((len(rotation), 3)) if translation is None else translation,
                            dtype=torch.float64) @ flip
    if torch.allclose(motion, torch.eye(3, dtype=torch.float64)[None], atol=1e-7) and shift.abs().max() < 1e-9:
        return params
    root = model(params).joints[:, 0].double().cpu()  # (T, 3) posed root joint, translation included
    rest_root = root - params.translation.double().cpu()
    moved = params.detach()
    moved.rotation = matrix_to_axis_angle(motion @ batch_rodrigues(params.rotation.double().cpu())).to(params.rotation)
    moved.translation = ((motion @ root[..., None])[..., 0] + shift - rest_root).to(params.translation)
    return moved


class OracleDenseMarks:
    """Predicts uvw maps of square crops from ground-truth geometry (same interface as the network predictor,
    keyed by video frame index instead of pixels)."""

    def __init__(self, model: FlameModel, truth: OracleGroundTruth, noise: OracleNoise = OracleNoise(),
                 crop_size: int = 512):
        if truth.params.shape.shape[1] != model.n_shape or truth.params.expr.shape[1] != model.n_expr:
            raise TrackerError("oracle ground truth has other shape/expression sizes than the FLAME model in use: "
                               "track with the model (and n_shape/n_expr) that generated the sequence")
        self.model = model
        self.truth = truth
        self.params = in_tracker_world(model, truth.params, truth.rotation, truth.translation)
        """(T frames) the ground truth in the tracker's world (its extrinsics applied to the head)."""
        self.noise = noise
        self.crop_size = crop_size
        self.row_of_frame = {int(f): row for row, f in enumerate(truth.frame_index)}
        device = model.v_template.device
        cube = template_cube_coordinates(model.v_template)
        self.vertex_uvw = cube + smooth_bias(cube, noise.bias_amplitude, noise.seed) if noise.bias_amplitude else cube
        """(V, 3) what each vertex shows (bias included)."""
        self.exact_uvw = cube
        """(V, 3) the noiseless canonical coordinates (the map a perfect estimate recovers without bias)."""
        self.device = device

    @property
    def model_id(self) -> str:
        """Identifies the oracle's settings and ground truth, for prediction caches."""
        digest = hashlib.sha256(json.dumps({"noise": asdict(self.noise), "gt": self.truth.metadata},
                                           sort_keys=True, default=str).encode()).hexdigest()
        return f"oracle-{digest[:16]}"

    @property
    def map_key(self) -> str:
        """Names the oracle's cube for per-network maps: the template's box, distorted by the bias field (the
        only degradation that is the same in every video)."""
        if not self.noise.bias_amplitude:
            return "oracle"
        bias = json.dumps([self.noise.bias_amplitude, self.noise.seed])
        return f"oracle-bias-{hashlib.sha256(bias.encode()).hexdigest()[:12]}"

    def check_video(self, frame_indices: np.ndarray, height: int, width: int) -> None:
        """Refuse a video that is not the ground truth's: other frame size, or frames the truth lacks (the
        oracle would otherwise hand a real video the synthetic sequence's answers)."""
        truth = self.truth.camera
        if (height, width) != (truth.height, truth.width):
            raise TrackerError(f"the DenseMarks oracle's ground truth is of a {truth.width}x{truth.height} video, "
                               f"this one is {width}x{height}: the oracle only runs on its own synthetic sequence")
        missing = sorted(set(np.asarray(frame_indices, np.int64).tolist()) - set(self.row_of_frame))
        if missing:
            raise TrackerError(f"the DenseMarks oracle's ground truth has no frame {missing[0]} "
                               f"({len(missing)} tracked frames missing): not the video it was generated with")

    @torch.no_grad()
    def predict(self, frame_index: int, box: CropBox) -> UvwPrediction:
        """uvw map (3, S, S) of the crop `box` of video frame `frame_index`."""
        if frame_index not in self.row_of_frame:
            raise TrackerError(f"oracle ground truth has no frame {frame_index}")
        row = self.row_of_frame[frame_index]
        box = box.rounded()
        to_crop = frame_to_crop_affine(box, self.crop_size)
        affine = torch.as_tensor(crop_affine(to_crop), dtype=torch.float32, device=self.device)[None]
        vertices = self.model(self.params.frames(slice(row, row + 1))).vertices
        screen = crop_screen_vertices(vertices, self.truth.camera, affine)
        image, mask = render_attributes(screen, self.model.faces, self.vertex_uvw[None], self.crop_size)
        uvw = image[0].cpu().numpy()
        covered = mask[0, ..., 0].cpu().numpy() > 0
        rng = np.random.default_rng([self.noise.seed, frame_index])
        uvw = np.where(covered[..., None], uvw, background_field(self.crop_size, rng))
        uvw = self._degrade(uvw, rng)
        return UvwPrediction(uvw=np.ascontiguousarray(np.moveaxis(uvw, -1, 0), dtype=np.float32),
                             frame_to_crop=to_crop)

    def _degrade(self, uvw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blur, noise and outliers on an (S, S, 3) map, clipped to the cube."""
        n = self.noise
        if n.blur_fraction > 0:
            uvw = cv2.GaussianBlur(uvw, (0, 0), n.blur_fraction * self.crop_size)
        if n.noise_std > 0:
            uvw = uvw + rng.normal(0.0, n.noise_std, uvw.shape).astype(np.float32)
        if n.dropout > 0:
            outliers = rng.random(uvw.shape[:2]) < n.dropout
            uvw = np.where(outliers[..., None], rng.random(uvw.shape).astype(np.float32), uvw)
        return np.clip(uvw, 0.0, 1.0)
