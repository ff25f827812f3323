"""Appearance of the synthetic sequences: face textures fitted from real photos, and backgrounds.

Textures: FLAME is fitted to the 68 landmarks that ship with each FFHQ photo (the tracker's own
Levenberg-Marquardt landmark fit) and the photo is unwrapped into FLAME's UV layout where the fitted face is
visible. Skin comes from texels inside the photo's face mask: unseen ones are mirrored from the other side of
the face, and what remains (ears, neck) is filled smoothly from the seen skin. Hair comes from scalp texels
seen above the eyebrows and is spread over the whole scalp.
Backgrounds are procedural rooms: a lit wall, soft furniture-like shapes, fine texture and vignetting.
Everything is deterministic given its inputs (seeds, image index).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from eval import SHARED_DATA
from eval.synthetic.uvmap import UnwrapOptions, UvAtlas, push_pull_fill, sample_image, unwrap_image
from tracker.camera import Camera
from tracker.detect.base import SCHEME_IBUG68
from tracker.energy.base import Observations
from tracker.energy.landmarks import LandmarkEnergy, LandmarkEnergyConfig, landmark_group_weights
from tracker.energy.priors import PriorConfig, PriorEnergy
from tracker.errors import MissingAssetError
from tracker.fit.init import rigid_from_landmarks
from tracker.fit.solver import LANDMARK_FIELDS, Problem, fit_lm, torch_threads
from tracker.flame.assets import FlameBundle
from tracker.flame.model import FlameParams
from tracker.render.texture import FLAME_UV_MIRROR_U

FFHQ_DIR = SHARED_DATA / "images" / "FFHQ"
FFHQ_SEG_DIR = SHARED_DATA / "images" / "FFHQ_seg"
PHOTO_FOV_DEG = 20.0
"""Assumed field of view of the FFHQ crops (portrait lenses; only the unwrap depends on it, weakly)."""
FIT_ITERS = 20
"""Levenberg-Marquardt iterations of the photo fit."""
DEFAULT_HAIR_RGB = (0.16, 0.11, 0.08)
"""Hair colour when the photo shows too little of the scalp to measure it."""
MIN_HAIR_TEXELS = 200
"""Seen scalp texels needed to take the hair from the photo."""
FACE_MASK_ERODE_PX = 3
"""Photo face-mask erosion: texels right at the mask border often see hair or background."""
PHOTO_FIT_LANDMARKS = LandmarkEnergyConfig(weight=1.0, robust="cauchy", scale=0.02, contour_weight=0.5,
                                           eye_weight=1.5, mouth_weight=1.5)
PHOTO_FIT_PRIOR = PriorConfig(weight=1.0, shape=0.1, expr=0.1, expr_sparsity=0.05, expr_bounds=10.0, jaw=1.0,
                              neck=0.02, eyes=0.005, eyelids=0.001)
"""The photo fit's energy, written out rather than the tracker's defaults: a change of the tracker's settings
must not change the benchmark's textures (and so its frames) under it. The fit still runs the tracker's solver
and landmark embedding, so compare releases on one cache (eval/results/cache keeps its textures as PNG)."""


def load_ffhq(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FFHQ photo `index`: RGB float (H, W, 3) in [0, 1], 68 landmarks (68, 2) in pixels, face mask (H, W) bool."""
    name = f"{index:05d}"
    paths = [FFHQ_DIR / f"{name}.png", FFHQ_DIR / f"{name}.npy", FFHQ_SEG_DIR / f"{name}.npy"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingAssetError(f"FFHQ photo files not found: {', '.join(missing)} (set TRACKER_SHARED_DATA)")
    rgb = cv2.cvtColor(cv2.imread(str(paths[0]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    landmarks = np.load(paths[1]).astype(np.float32)
    face_mask = np.load(paths[2]) > 0.5 * np.load(paths[2]).max()
    return rgb, landmarks, face_mask


def fit_flame_to_photo(bundle: FlameBundle, landmarks: np.ndarray, height: int,
                       width: int) -> tuple[FlameParams, Camera]:
    """FLAME parameters (shape, expression, pose) whose 68 landmarks project onto `landmarks` (68, 2).

    bundle: loaded with the 'ibug68' landmark scheme.
    """
    model, lmk_set = bundle.model, bundle.landmarks
    camera = Camera.from_image(height, width, PHOTO_FOV_DEG)
    points = torch.from_numpy(landmarks)[lmk_set.detector_index][None]
    weights = landmark_group_weights(SCHEME_IBUG68, lmk_set.detector_index, PHOTO_FIT_LANDMARKS)[None]
    face_size = (points[0].amax(0) - points[0].amin(0)).norm()[None]
    obs = Observations(points, weights, face_size)
    rotation, translation = rigid_from_landmarks(model, lmk_set, camera, points[0].numpy(), weights[0].numpy())
    init = FlameParams.zeros(1, model.n_shape, model.n_expr)
    init.rotation[0], init.translation[0] = torch.from_numpy(rotation), torch.from_numpy(translation)
    terms = [LandmarkEnergy(PHOTO_FIT_LANDMARKS), PriorEnergy(PHOTO_FIT_PRIOR, model)]
    problem = Problem(model, lmk_set, camera, terms)
    with torch_threads(1):  # many tiny ops: extra threads only slow them down
        params, _ = fit_lm(problem, init, obs, LANDMARK_FIELDS, FIT_ITERS, free_shape=True)
    return params, camera


def region_texels(atlas: UvAtlas, vertex_ids: np.ndarray) -> np.ndarray:
    """(N,) bool: texels on faces with at least one vertex in the region."""
    member = np.zeros(int(atlas.faces.max()) + 1, bool)
    member[vertex_ids] = True
    return member[atlas.faces[atlas.face].cpu().numpy()].any(1)


@torch.no_grad()
def photo_texture(bundle: FlameBundle, atlas: UvAtlas, index: int) -> np.ndarray:
    """(S, S, 3) float albedo texture from FFHQ photo `index` (see the module docstring)."""
    rgb, landmarks, face_mask = load_ffhq(index)
    height, width = rgb.shape[:2]
    params, camera = fit_flame_to_photo(bundle, landmarks, height, width)
    vertices = bundle.model(params).vertices[0]
    colors, weight = unwrap_image(atlas, vertices, camera, torch.from_numpy(rgb), UnwrapOptions(min_facing=0.05))
    # Skin comes from the photo's face mask; hair from scalp texels that land above the eyebrows.
    eroded = cv2.erode(face_mask.astype(np.uint8), np.ones((2 * FACE_MASK_ERODE_PX + 1,) * 2, np.uint8)) > 0
    pixels, _ = camera.project(atlas.texel_values(vertices))
    on_face = sample_image(torch.from_numpy(eroded.astype(np.float32))[..., None], pixels)[:, 0] > 0.99
    scalp = torch.from_numpy(region_texels(atlas, bundle.masks["scalp"]))
    above_brows = pixels[:, 1] < float(landmarks[17:27, 1].min())
    skin_weight = torch.where(on_face & ~scalp, weight, torch.zeros_like(weight))
    hair_weight = torch.where(scalp & above_brows & ~on_face, weight, torch.zeros_like(weight))
    texture = atlas.to_image(colors).numpy()
    as_image = lambda w: atlas.to_image(w[:, None])[..., 0].numpy()
    skin = push_pull_fill(*mirror_fill(texture, as_image(skin_weight), FLAME_UV_MIRROR_U))
    hair_seen = as_image(hair_weight)
    hair = push_pull_fill(texture, hair_seen) if (hair_seen > 0).sum() >= MIN_HAIR_TEXELS else \
        np.broadcast_to(np.array(DEFAULT_HAIR_RGB, np.float32), texture.shape)
    scalp_image = as_image(scalp.float()) > 0
    return np.clip(np.where(scalp_image[..., None], hair, skin), 0.0, 1.0)


def mirror_fill(texture: np.ndarray, weight: np.ndarray, mirror_u: float) -> tuple[np.ndarray, np.ndarray]:
    """Fill unseen texels from their left-right mirror texel (UV layout mirrored about u = mirror_u)."""
    size = texture.shape[1]
    cols = np.arange(size)
    # Texel column j has u = (j + 0.5) / S; its mirror u' = 2 mirror_u - u.
    mirror_cols = np.clip(np.round((2 * mirror_u - (cols + 0.5) / size) * size - 0.5).astype(int), 0, size - 1)
    mirrored, mirrored_weight = texture[:, mirror_cols], weight[:, mirror_cols]
    take = (weight <= 0) & (mirrored_weight > 0)
    return np.where(take[..., None], mirrored, texture), np.where(take, mirrored_weight, weight)


def adjust_skin(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A slightly different person: random brightness and colour balance of the whole texture."""
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, size=3)
    return np.clip(texture * gain, 0.0, 1.0).astype(np.float32)


def procedural_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: a wall lit from one side, a few soft shapes (door, shelf, plant, frame),
    fine surface texture and a vignette, out of focus like a real background."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    wall = rng.uniform(0.25, 0.85, size=3).astype(np.float32)
    light_dir = rng.uniform(-1, 1, size=2)
    ramp = 0.75 + 0.25 * ((xs / width - 0.5) * light_dir[0] + (ys / height - 0.5) * light_dir[1])
    image = wall[None, None] * ramp[..., None]
    for _ in range(rng.integers(3, 7)):
        color = rng.uniform(0.05, 0.95, size=3)
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.6) * height
        shape = np.zeros((height, width), np.float32)
        if rng.random() < 0.6:
            cv2.rectangle(shape, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), 1.0, thickness=-1)
        else:
            cv2.ellipse(shape, (int(x0 + w / 2), int(y0 + h / 2)), (int(w / 2), int(h / 2)),
                        float(rng.uniform(0, 180)), 0, 360, 1.0, thickness=-1)
        shading = 0.8 + 0.2 * (ys - y0) / max(h, 1.0)
        image = np.where(shape[..., None] > 0, (color * np.clip(shading, 0.6, 1.0)[..., None]), image)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 1.5)
    image = image * (1 + 0.06 * grain[..., None])
    vignette = 1 - 0.35 * (((xs / width - 0.5) ** 2 + (ys / height - 0.5) ** 2) / 0.5)
    image = image * vignette[..., None]
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(1.5, 3.5))
    return np.clip(image, 0.0, 1.0)
