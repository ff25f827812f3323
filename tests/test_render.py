"""Renderer: rasteriser against analytic answers and a brute-force reference, interpolation
gradients, SH shading, UV texturing, backends and overlay drawing."""

import pickle

import numpy as np
import pytest
import torch

from tests.conftest import FLAME_ASSETS, FLAME_STANDIN
from tracker.errors import MissingAssetError, TrackerError
from tracker.render import (
    MeshRenderer,
    RasterSettings,
    TextureAlbedo,
    VertexAlbedo,
    get_rasterizer,
    interpolate,
    interpolate_face_corners,
    rasterize,
    sh_shading,
    vertex_normals,
)
from tracker.render.overlay import draw_landmarks, draw_mesh
from tracker.render.shading import SH_DC_FACTOR, lambert_headlight
from tracker.render.texture import (
    FLAME_UV_MIRROR_U,
    load_obj,
    mirror_about_u,
    sample_texture,
    symmetry_loss,
    total_variation,
)

HEAD_OBJ = FLAME_ASSETS / "head_template.obj"


def pixel_centres(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return xs.double(), ys.double()


def brute_force_raster(verts, faces, height, width, cull, perspective, z_near=1e-3):
    """Reference: every pixel centre against every triangle in float64, nearest depth wins."""
    xs, ys = pixel_centres(height, width)
    px, py = xs.reshape(-1, 1), ys.reshape(-1, 1)
    ids = []
    for mesh in verts.double():
        x, y, z = mesh[faces].unbind(-1)  # (F, 3) each
        area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
        w = torch.stack(
            [
                ((x[:, a] - px) * (y[:, b] - py) - (y[:, a] - py) * (x[:, b] - px)) / area
                for a, b in ((1, 2), (2, 0), (0, 1))
            ],
            dim=-1,
        )
        inside = (w >= 0).all(-1) & (area != 0) & (z.amin(-1) > z_near)
        if cull:
            inside &= area < 0
        depth = 1 / (w / z).sum(-1) if perspective else (w * z).sum(-1)
        depth = torch.where(inside, depth, torch.inf)
        best, index = depth.min(-1)
        ids.append(torch.where(torch.isfinite(best), index, -1).view(height, width))
    return torch.stack(ids)


@pytest.fixture(scope="module")
def flame_mesh():
    """FLAME stand-in template seen by an OpenCV camera 0.6 m in front of the face, 128 x 128."""
    with open(FLAME_STANDIN, "rb") as file:
        data = pickle.load(file)
    verts = torch.tensor(np.asarray(data["v_template"]), dtype=torch.float32)
    faces = torch.tensor(np.asarray(data["f"], dtype=np.int64))
    centre = (verts.min(0).values + verts.max(0).values) / 2
    # FLAME is y-up and faces +z; the camera looks along its +z, so flip y and z.
    camera = (verts - centre) * torch.tensor([1.0, -1.0, -1.0]) + torch.tensor([0.0, 0.0, 0.6])
    size, focal = 128, 300.0
    screen = torch.stack(
        [focal * camera[:, 0] / camera[:, 2] + size / 2, focal * camera[:, 1] / camera[:, 2] + size / 2, camera[:, 2]],
        dim=-1,
    )
    return screen.unsqueeze(0), faces, camera.unsqueeze(0), size


# --- rasteriser -------------------------------------------------------------------------------


@pytest.mark.parametrize("perspective", [True, False])
def test_single_triangle_coverage_barycentrics_and_depth(perspective):
    # Right triangle x >= 2, y >= 2, x + y <= 14; counter-clockwise on the image (front-facing).
    verts = torch.tensor([[[2.0, 2.0, 1.0], [2.0, 12.0, 2.0], [12.0, 2.0, 4.0]]])
    faces = torch.tensor([[0, 1, 2]])
    fragments = rasterize(verts, faces, RasterSettings((16, 16), perspective_correct=perspective))
    xs, ys = pixel_centres(16, 16)
    expected = (xs >= 2) & (ys >= 2) & (xs + ys <= 14)
    assert int(expected.sum()) == 55
    assert torch.equal(fragments.mask[0], expected)
    assert torch.equal(fragments.triangle_id[0][expected], torch.zeros(55, dtype=torch.long))

    w1, w2 = (ys - 2) / 10, (xs - 2) / 10  # weights of the corners at (2, 12) and (12, 2)
    w = torch.stack([1 - w1 - w2, w1, w2], dim=-1)
    assert torch.allclose(fragments.bary[0][expected].double(), w[expected], atol=1e-6)
    z = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    depth = 1 / (w / z).sum(-1) if perspective else (w * z).sum(-1)
    assert torch.allclose(fragments.depth[0][expected].double(), depth[expected], atol=1e-5)
    assert fragments.depth[0][~expected].abs().sum() == 0


@pytest.mark.parametrize("perspective", [True, False])
def test_nearest_depth_wins_for_overlapping_and_intersecting_triangles(perspective):
    square = [[1.0, 1.0], [1.0, 15.0], [15.0, 1.0], [15.0, 15.0]]  # two triangles each, CCW on image
    flat = [[*xy, 2.0] for xy in square]
    slanted = [[x, y, 1.0 if x == 1.0 else 4.0] for x, y in square]  # depth 1 at x = 1, 4 at x = 15
    verts = torch.tensor([flat + slanted])
    faces = torch.tensor([[0, 1, 2], [2, 1, 3], [4, 5, 6], [6, 5, 7]])
    xs, ys = pixel_centres(16, 16)
    inside = (xs > 1) & (xs < 15) & (ys > 1) & (ys < 15)
    # The slanted square is in front where its depth < 2: 1/z (perspective) or z is affine in x.
    t = (xs - 1) / 14
    slanted_depth = 1 / (1 + t * (1 / 4 - 1)) if perspective else 1 + t * 3
    for order in (faces, faces.flip(0)):
        ids = rasterize(verts, order, RasterSettings((16, 16), perspective_correct=perspective)).triangle_id[0]
        winner_is_slanted = order[ids.clamp(min=0)].min(dim=-1).values >= 4
        assert torch.equal(winner_is_slanted[inside], (slanted_depth < 2)[inside])


@pytest.mark.parametrize("cull", [True, False])
def test_back_face_culling_of_a_clockwise_triangle(cull):
    clockwise = torch.tensor([[[2.0, 2.0, 1.0], [12.0, 2.0, 1.0], [2.0, 12.0, 1.0]]])
    fragments = rasterize(clockwise, torch.tensor([[0, 1, 2]]), RasterSettings((16, 16), cull_backfaces=cull))
    assert int(fragments.mask.sum()) == (0 if cull else 55)


def test_flame_outward_faces_are_front_facing_through_an_opencv_camera(flame_mesh):
    screen, faces, _, size = flame_mesh
    culled = rasterize(screen, faces, RasterSettings((size, size), cull_backfaces=True))
    all_faces = rasterize(screen, faces, RasterSettings((size, size), cull_backfaces=False))
    covered = all_faces.mask
    assert covered.float().mean() > 0.3
    # Outward faces hide everything behind them, so culling changes nothing ...
    assert (culled.triangle_id == all_faces.triangle_id).float().mean() > 0.999
    # ... while culling with the opposite winding shows the inside of the back of the head.
    inside_out = rasterize(screen, faces[:, [0, 2, 1]], RasterSettings((size, size), cull_backfaces=True))
    same = (inside_out.triangle_id == all_faces.triangle_id)[covered].float().mean()
    assert same < 0.05


def test_random_meshes_match_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    height, width = 23, 31
    for trial in range(8):
        cull, perspective = trial % 2 == 0, trial % 4 < 2
        verts = torch.rand(2, 30, 3, generator=generator) * torch.tensor([width * 1.2, height * 1.2, 2.0])
        verts = verts - torch.tensor([width * 0.1, height * 0.1, -0.5])
        faces = torch.randint(0, 30, (40, 3), generator=generator)
        settings = RasterSettings((height, width), cull_backfaces=cull, perspective_correct=perspective)
        fragments = rasterize(verts, faces, settings)
        reference = brute_force_raster(verts, faces, height, width, cull, perspective)
        assert torch.equal(fragments.triangle_id, reference)
        # Each image of the batch is independent of the others.
        single = rasterize(verts[1:], faces, settings)
        assert torch.equal(single.triangle_id[0], fragments.triangle_id[1])


def test_closed_grid_has_no_cracks():
    # A jittered 12 x 12 grid of quads covering x, y in [3.3, 60.7]: every pixel centre inside is hit.
    generator = torch.Generator().manual_seed(1)
    n = 13
    t = torch.linspace(3.3, 60.7, n)
    ys, xs = torch.meshgrid(t, t, indexing="ij")
    jitter = (torch.rand(n, n, 2, generator=generator) - 0.5) * 3.0
    jitter[[0, -1], :, :] = 0
    jitter[:, [0, -1], :] = 0
    xy = torch.stack([xs, ys], dim=-1) + jitter
    verts = torch.cat([xy, 1.0 + torch.rand(n, n, 1, generator=generator)], dim=-1).reshape(1, -1, 3)
    index = torch.arange(n * n).view(n, n)
    a, b, c, d = index[:-1, :-1], index[1:, :-1], index[:-1, 1:], index[1:, 1:]
    faces = torch.cat([torch.stack([a, b, c], -1), torch.stack([c, b, d], -1)]).reshape(-1, 3)
    fragments = rasterize(verts, faces, RasterSettings((64, 64)))
    px, py = pixel_centres(64, 64)
    inside = (px >= 3.3) & (px <= 60.7) & (py >= 3.3) & (py <= 60.7)
    assert torch.equal(fragments.mask[0], inside)


# --- interpolation ----------------------------------------------------------------------------


def quad_scene():
    verts = torch.tensor([[[1.3, 1.2, 2.0], [9.7, 2.1, 3.0], [2.2, 8.4, 2.5], [10.1, 8.8, 4.0]]], dtype=torch.float64)
    faces = torch.tensor([[0, 2, 1], [1, 2, 3]])
    return verts, faces


@pytest.mark.parametrize("perspective", [True, False])
def test_interpolation_gradcheck_vertex_and_corner_attributes(perspective):
    generator = torch.Generator().manual_seed(2)
    verts, faces = quad_scene()
    pair = torch.cat([verts, verts + 0.37])  # a batch of two
    settings = RasterSettings((9, 11), perspective_correct=perspective)
    single, batched = rasterize(verts, faces, settings), rasterize(pair, faces, settings)
    assert single.mask.sum() > 40 and batched.mask.sum() > 80

    def attributes(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    def vertex_case(fragments):
        return lambda v, a: interpolate(fragments, v, faces, a)[0]

    def corner_case(fragments):
        return lambda v, a: interpolate_face_corners(fragments, v, faces, a)[0]

    positions, pair_positions = verts.clone().requires_grad_(True), pair.clone().requires_grad_(True)
    # Full Jacobians on one image; random projections of them on the batch (much cheaper).
    assert torch.autograd.gradcheck(vertex_case(single), (positions, attributes(1, 4, 2)))
    assert torch.autograd.gradcheck(corner_case(single), (positions, attributes(2, 3, 2)))
    assert torch.autograd.gradcheck(vertex_case(batched), (pair_positions, attributes(4, 2)), fast_mode=True)
    assert torch.autograd.gradcheck(vertex_case(batched), (pair_positions, attributes(2, 4, 2)), fast_mode=True)
    assert torch.autograd.gradcheck(corner_case(batched), (pair_positions, attributes(2, 2, 3, 2)), fast_mode=True)


@pytest.mark.parametrize("perspective", [True, False])
def test_interpolating_positions_reproduces_pixel_centres_and_depth(perspective):
    verts, faces = quad_scene()
    fragments = rasterize(verts, faces, RasterSettings((9, 11), perspective_correct=perspective))
    image, mask = interpolate(fragments, verts, faces, verts, perspective)
    covered = mask[0, ..., 0].bool()
    assert torch.equal(covered, fragments.mask[0])
    assert torch.allclose(image[0, ..., 2][covered], fragments.depth[0][covered], atol=1e-12)
    if not perspective:  # x and y are affine on the image only without perspective
        xs, ys = pixel_centres(9, 11)
        assert torch.allclose(image[0, ..., 0][covered], xs[covered], atol=1e-12)
        assert torch.allclose(image[0, ..., 1][covered], ys[covered], atol=1e-12)
    assert image[0][~covered].abs().sum() == 0


def test_empty_scene_gives_empty_image_and_zero_gradients():
    verts, faces = quad_scene()
    off_screen = (verts + torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64)).requires_grad_(True)
    fragments = rasterize(off_screen, faces, RasterSettings((9, 11)))
    image, mask = interpolate(fragments, off_screen, faces, off_screen)
    assert fragments.triangle_id.eq(-1).all() and mask.sum() == 0 and image.abs().sum() == 0
    image.sum().backward()
    assert off_screen.grad.abs().sum() == 0


def test_gradients_recover_a_known_image_shift(flame_mesh):
    # Interior gradients only (no silhouette term), so compare where both renders cover the image:
    # a smooth colour field over the face tells where the mesh is.
    screen, faces, camera, size = flame_mesh
    screen = screen * torch.tensor([0.5, 0.5, 1.0])  # 64 x 64 is enough
    colours = (camera[0] - camera[0].mean(0)) / camera[0].std(0)
    settings = RasterSettings((size // 2, size // 2))

    def render(shift_xy):
        verts = screen + torch.cat([shift_xy, torch.zeros(1)])
        return interpolate(rasterize(verts, faces, settings), verts, faces, colours)

    true_shift = torch.tensor([1.5, -1.0])
    target, target_mask = render(true_shift)
    shift = torch.zeros(2, requires_grad=True)
    optimiser = torch.optim.LBFGS([shift], max_iter=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        image, mask = render(shift)
        loss = ((image - target).pow(2) * mask * target_mask).mean()
        loss.backward()
        return loss

    optimiser.step(closure)
    assert torch.allclose(shift.detach(), true_shift, atol=0.02)


# --- shading and texture ----------------------------------------------------------------------


def test_sh_with_only_the_dc_term_gives_constant_shading():
    normals = torch.nn.functional.normalize(torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(3)), dim=-1)
    coefficients = torch.zeros(2, 9, 3)
    coefficients[:, 0] = torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]])
    shading = sh_shading(normals, coefficients)
    expected = SH_DC_FACTOR * coefficients[:, 0].view(2, 1, 1, 3)
    assert torch.allclose(shading, expected.expand_as(shading), atol=1e-6)
    # A first-order term makes shading depend linearly on the normal's y component.
    coefficients[:, 2] = 1.0
    varying = sh_shading(normals, coefficients) - expected
    assert torch.allclose(varying / normals[..., 1:2], varying[0, 0, 0] / normals[0, 0, 0, 1], atol=1e-4)


def test_vertex_normals_of_an_octahedron_and_of_visible_flame_surface(flame_mesh):
    # Octahedron wound counter-clockwise seen from outside: by symmetry each vertex normal is the
    # vertex direction itself.
    corners = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    faces = []
    for x in (0, 1):
        for y in (2, 3):
            for z in (4, 5):
                face = [x, y, z]
                outward = corners[face].sum(0)
                if torch.dot(torch.linalg.cross(corners[y] - corners[x], corners[z] - corners[x]), outward) < 0:
                    face = [x, z, y]
                faces.append(face)
    normals = vertex_normals(corners.unsqueeze(0) * 2.0, torch.tensor(faces))
    assert torch.allclose(normals[0], corners, atol=1e-6)

    # Every visible point of the FLAME head faces the camera (normal z < 0 in OpenCV coordinates).
    screen, flame_faces, camera, size = flame_mesh
    fragments = rasterize(screen, flame_faces, RasterSettings((size, size)))
    pixel_normals, mask = interpolate(fragments, screen, flame_faces, vertex_normals(camera, flame_faces))
    facing = pixel_normals[..., 2][mask[..., 0].bool()] < 0
    assert facing.float().mean() > 0.97


def test_head_template_uvs():
    mesh = load_obj(HEAD_OBJ)
    assert mesh.verts.shape == (5023, 3) and mesh.faces.shape == (9976, 3)
    assert mesh.verts_uvs.shape == (5118, 2) and mesh.faces_uvs.shape == (9976, 3)
    with open(FLAME_STANDIN, "rb") as file:
        assert np.array_equal(mesh.faces.numpy(), np.asarray(pickle.load(file)["f"], dtype=np.int64))
    uv = mesh.corner_uvs()
    assert uv.shape == (9976, 3, 2) and uv.min() >= 0 and uv.max() <= 1


def test_load_obj_errors(tmp_path):
    with pytest.raises(MissingAssetError):
        load_obj(tmp_path / "missing.obj")
    quad = tmp_path / "quad.obj"
    quad.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1 4/1\n")
    with pytest.raises(TrackerError, match="triangle"):
        load_obj(quad)


def test_sample_texture_orientation_and_values():
    texture = torch.zeros(1, 3, 8, 8)
    texture[:, 0, :4] = 1.0  # top half red: v > 0.5
    texture[:, 2, :, 4:] = 1.0  # right half blue: u > 0.5
    uv = torch.tensor([[[[0.25, 0.9], [0.75, 0.1]]]])
    colours = sample_texture(texture, uv)
    assert torch.allclose(colours[0, 0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_texture_regularisers():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert total_variation(flat) == 0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., 1::2] = 1.0  # columns alternate 0, 1
    assert torch.isclose(total_variation(stripes), torch.tensor(1.0))
    u = (torch.arange(64) + 0.5) / 64
    symmetric = (-(u - FLAME_UV_MIRROR_U).abs() * 4).exp().expand(1, 3, 32, 64)
    assert symmetry_loss(symmetric) < 0.01
    assert symmetry_loss(u.expand(1, 3, 32, 64)) > 0.2
    assert torch.allclose(mirror_about_u(flat, 0.5), flat)


# --- renderer, backends, overlay ---------------------------------------------------------------


def test_renderer_vertex_and_texture_albedo(flame_mesh):
    screen, faces, camera, size = flame_mesh
    normals = vertex_normals(camera, faces)
    sh = torch.zeros(1, 9, 3)
    sh[:, 0] = 2.0
    renderer = MeshRenderer(RasterSettings((size, size)))
    colour = torch.tensor([0.2, 0.5, 0.8])
    out = renderer(screen, faces, normals, sh, VertexAlbedo(colour.expand(5023, 3)))
    covered = out.mask[0, ..., 0].bool()
    assert covered.float().mean() > 0.3
    assert torch.allclose(out.image[0][covered], colour * 2.0 * SH_DC_FACTOR, atol=1e-5)
    assert out.image[0][~covered].abs().sum() == 0

    mesh = load_obj(HEAD_OBJ)
    texture = colour.view(1, 3, 1, 1).expand(1, 3, 64, 64)
    textured = renderer(screen, faces, normals, sh, TextureAlbedo(texture, mesh.corner_uvs()))
    assert torch.allclose(textured.image, out.image, atol=1e-5)


def test_backend_selection_errors():
    assert get_rasterizer("torch") is rasterize
    with pytest.raises(TrackerError, match="unknown rasteriser backend"):
        get_rasterizer("opengl")
    for backend, module in (("pytorch3d", "pytorch3d"), ("nvdiffrast", "nvdiffrast")):
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(TrackerError, match=f"'{backend}' is not available"):
                MeshRenderer(RasterSettings((8, 8)), backend=backend)


def test_pytorch3d_parity(flame_mesh):
    pytest.importorskip("pytorch3d", reason="pytorch3d is not installed (no wheel for this torch build)")
    screen, faces, _, size = flame_mesh
    settings = RasterSettings((size, size))
    ours = rasterize(screen, faces, settings)
    theirs = get_rasterizer("pytorch3d")(screen, faces, settings)
    assert (ours.triangle_id == theirs.triangle_id).float().mean() > 0.995


def test_nvdiffrast_parity(flame_mesh):
    pytest.importorskip("nvdiffrast.torch", reason="nvdiffrast is not installed (needs CUDA)")
    if not torch.cuda.is_available():
        pytest.skip("nvdiffrast needs a CUDA device")
    screen, faces, _, size = flame_mesh
    screen, faces = screen.cuda(), faces.cuda()
    settings = RasterSettings((size, size))
    ours = rasterize(screen, faces, settings)
    theirs = get_rasterizer("nvdiffrast")(screen, faces, settings)
    assert (ours.triangle_id == theirs.triangle_id).float().mean() > 0.995


def test_overlay_draws_mesh_and_landmarks(flame_mesh):
    screen, faces, camera, size = flame_mesh
    frame = np.full((size, size, 3), 50, dtype=np.uint8)
    out = draw_mesh(frame, screen[0], faces, vertex_normals(camera, faces)[0], alpha=0.5)
    mask = rasterize(screen, faces, RasterSettings((size, size))).mask[0].numpy()
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], frame[~mask])
    assert (out[mask] != frame[mask]).any(axis=-1).mean() > 0.95

    dots = draw_landmarks(frame, np.array([[10.5, 20.5]]), color=(255, 0, 0), radius=1)
    assert tuple(dots[20, 10]) == (255, 0, 0) and tuple(dots[60, 60]) == (50, 50, 50)
    assert tuple(frame[20, 10]) == (50, 50, 50)  # the input frame is left unchanged


def test_overlay_draws_only_the_mesh_box_with_the_whole_frames_pixels(flame_mesh):
    """draw_mesh rasterises, shades and blends the mesh's bounding box only: the same pixels as the whole frame
    rasterised and blended (the vertices shifted by a whole pixel move no pixel centre), for a mesh inside a larger
    frame and one cut by its top-left corner; a mesh outside the frame or behind the camera leaves it as it was."""
    screen, faces, camera, size = flame_mesh
    normals = vertex_normals(camera, faces)[0]
    frame = np.random.default_rng(0).integers(0, 256, (size + 90, 2 * size, 3), dtype=np.uint8)
    grey = torch.tensor([200.0, 200.0, 200.0])
    for shift in ([size * 0.7, 60.0], [-0.4 * size, -0.3 * size]):
        verts = screen[0] + torch.tensor([*shift, 0.0])
        fragments = rasterize(verts[None], faces, RasterSettings(frame.shape[:2]))
        pixel_normals, mask = interpolate(fragments, verts[None], faces, normals[None])
        shade = lambert_headlight(torch.nn.functional.normalize(pixel_normals, dim=-1, eps=1e-8)).unsqueeze(-1)
        weight = (mask[0] * 0.5).numpy()
        whole = np.rint(frame * (1.0 - weight) + (shade * grey).clamp(0, 255)[0].numpy() * weight).astype(np.uint8)
        out = draw_mesh(frame, verts, faces, normals, alpha=0.5)
        assert 0.05 < mask[0].float().mean() < 0.6  # the mesh covers part of the frame
        np.testing.assert_array_equal(out, whole)
    right_of_the_frame = screen[0] + torch.tensor([3.0 * size, 0.0, 0.0])
    behind_the_camera = screen[0] * torch.tensor([1.0, 1.0, -1.0])
    for verts in (right_of_the_frame, behind_the_camera):
        np.testing.assert_array_equal(draw_mesh(frame, verts, faces, normals), frame)
