"""Differentiable mesh rendering: pure-PyTorch rasteriser, interpolation, SH shading, textures.

Screen-space convention everywhere (OpenCV): x right, y down in pixels, pixel centres at
integer + 0.5, z = positive depth. See `rasterize` for the winding/culling convention.
"""

from tracker.render.backends import get_rasterizer
from tracker.render.interpolate import interpolate, interpolate_face_corners
from tracker.render.rasterize import Fragments, RasterSettings, rasterize
from tracker.render.renderer import MeshRenderer, RenderOutput, TextureAlbedo, VertexAlbedo, shade_sh
from tracker.render.shading import sh_shading, vertex_normals

__all__ = [
    "Fragments",
    "MeshRenderer",
    "RasterSettings",
    "RenderOutput",
    "TextureAlbedo",
    "VertexAlbedo",
    "get_rasterizer",
    "interpolate",
    "interpolate_face_corners",
    "rasterize",
    "shade_sh",
    "sh_shading",
    "vertex_normals",
]
