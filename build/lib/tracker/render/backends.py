"""Optional rasteriser backends: pytorch3d and nvdiffrast, behind the pure-PyTorch interface.

Each backend takes the same screen-space input as `rasterize.rasterize` and returns the same
Fragments (only the triangle ids come from the backend; barycentrics and depth are derived from
the geometry exactly as for the torch backend, and interpolation is always `interpolate`).
They are imported lazily so that neither library is required.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from tracker.errors import TrackerError
from tracker.render.barycentric import face_corner_values, signed_area2
from tracker.render.rasterize import Fragments, RasterSettings, rasterize

Rasterizer = Callable[[Tensor, Tensor, RasterSettings], Fragments]

_INSTALL_HINT = {
    "pytorch3d": "install pytorch3d built for this torch (see https://github.com/facebookresearch/pytorch3d)",
    "nvdiffrast": "install nvdiffrast (pip install git+https://github.com/NVlabs/nvdiffrast) on a CUDA machine",
}


def _import_backend(module: str, backend: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrackerError(
            f"rasteriser backend '{backend}' is not available ({error}); {_INSTALL_HINT[backend]}, "
            "or use backend 'torch'"
        ) from None


def rasterize_pytorch3d(verts_screen: Tensor, faces: Tensor, settings: RasterSettings) -> Fragments:
    """Rasterise with pytorch3d's rasterize_meshes (CPU or CUDA).

    pytorch3d's NDC has +x left and +y up with the shorter image side spanning [-1, 1]; the map
    from pixels is a 180-degree rotation plus scale, which keeps the winding, so pytorch3d's
    back-face test (clockwise in its NDC) matches ours.
    """
    structures = _import_backend("pytorch3d.structures", "pytorch3d")
    raster = _import_backend("pytorch3d.renderer.mesh.rasterize_meshes", "pytorch3d")
    height, width = settings.image_size
    batch, num_faces = verts_screen.shape[0], faces.shape[0]
    with torch.no_grad():
        verts = verts_screen.detach().float()
        short_side = min(height, width)
        ndc = torch.stack(
            [(width - 2.0 * verts[..., 0]) / short_side, (height - 2.0 * verts[..., 1]) / short_side, verts[..., 2]],
            dim=-1,
        )
        meshes = structures.Meshes(verts=ndc, faces=faces.expand(batch, -1, -1))
        pix_to_face, _, _, _ = raster.rasterize_meshes(
            meshes,
            image_size=(height, width),
            blur_radius=0.0,
            faces_per_pixel=1,
            perspective_correct=settings.perspective_correct,
            cull_backfaces=settings.cull_backfaces,
        )
        packed = pix_to_face[..., 0]  # index into the packed faces of all meshes, -1 = none
        image = torch.arange(batch, device=packed.device).view(batch, 1, 1)
        triangle_id = torch.where(packed >= 0, packed - image * num_faces, packed)
    return Fragments(triangle_id, verts_screen.detach(), faces, settings.perspective_correct)


_NVDIFFRAST_CONTEXTS: dict[torch.device, object] = {}


def rasterize_nvdiffrast(verts_screen: Tensor, faces: Tensor, settings: RasterSettings) -> Fragments:
    """Rasterise with nvdiffrast's CUDA rasteriser (CUDA tensors only).

    Pixels map to clip space with w = z, x_ndc = 2x/W - 1, y_ndc = 2y/H - 1 (nvdiffrast's first
    output row is y_ndc = -1, our top row). nvdiffrast neither culls nor drops near triangles and
    shares one triangle list across the batch, so every face gets its own three vertices and the
    faces to drop are moved outside the view volume.
    """
    dr = _import_backend("nvdiffrast.torch", "nvdiffrast")
    if verts_screen.device.type != "cuda":
        raise TrackerError("rasteriser backend 'nvdiffrast' needs CUDA tensors; use backend 'torch' on CPU")
    height, width = settings.image_size
    num_faces = faces.shape[0]
    device = verts_screen.device
    if device not in _NVDIFFRAST_CONTEXTS:
        _NVDIFFRAST_CONTEXTS[device] = dr.RasterizeCudaContext(device=device)
    with torch.no_grad():
        corners = face_corner_values(verts_screen.detach().float(), faces)  # (3 corners, xyz, B, F)
        x, y, z = corners.permute(1, 2, 3, 0).unbind(0)  # (B, F, 3) each
        drop = z.amin(dim=-1) <= settings.z_near
        if settings.cull_backfaces:
            drop |= signed_area2(torch.stack([x, y], dim=-1)) >= 0
        # Depth range for nvdiffrast's z test: standard projective depth between near and far.
        near = settings.z_near
        far = max(float(z.max()) * 2.0, near * 2.0)
        z_clip = ((far + near) * z - 2.0 * far * near) / (far - near)
        clip = torch.stack([(2.0 * x / width - 1.0) * z, (2.0 * y / height - 1.0) * z, z_clip, z], dim=-1)
        outside = torch.tensor([2.0, 2.0, 0.0, 1.0], device=device)
        clip = torch.where(drop[..., None, None], outside, clip).reshape(verts_screen.shape[0], num_faces * 3, 4)
        triangles = torch.arange(num_faces * 3, device=device, dtype=torch.int32).view(num_faces, 3)
        rast, _ = dr.rasterize(_NVDIFFRAST_CONTEXTS[device], clip.contiguous(), triangles, resolution=[height, width])
        triangle_id = rast[..., 3].long() - 1  # nvdiffrast stores id + 1, 0 = empty
    return Fragments(triangle_id, verts_screen.detach(), faces, settings.perspective_correct)


BACKENDS: dict[str, Rasterizer] = {
    "torch": rasterize,
    "pytorch3d": rasterize_pytorch3d,
    "nvdiffrast": rasterize_nvdiffrast,
}


def get_rasterizer(backend: str) -> Rasterizer:
    """The rasterise function of a backend: 'torch' (always available), 'pytorch3d', 'nvdiffrast'."""
    if backend not in BACKENDS:
        raise TrackerError(f"unknown rasteriser backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "torch":
        _import_backend({"pytorch3d": "pytorch3d.renderer", "nvdiffrast": "nvdiffrast.torch"}[backend], backend)
    return BACKENDS[backend]
