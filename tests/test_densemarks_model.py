"""DenseMarks network, official-checkpoint mapping, crops and prediction cache (tiny configs, random weights)."""

import hashlib
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights

from tracker.densemarks.model import DenseMarksConfig, DenseMarksNet, normalize_rgb
from tracker.densemarks.predict import (
    CropBox,
    DenseMarksPredictor,
    UvwCache,
    apply_affine,
    cached_predict,
    crop_square,
    frame_to_crop_affine,
    invert_affine,
)
from tracker.densemarks.runtime import build_forward, resolve_backend
from tracker.densemarks.weights import BACKBONE, load_densemarks, resolve_weights_path, save_official_checkpoint
from tracker.errors import MissingAssetError, TrackerError

TINY = DenseMarksConfig.tiny()


def tiny_net(seed: int = 0, spread: float | None = None) -> DenseMarksNet:
    """Tiny net in eval mode; with `spread`, every parameter is redrawn (norm weights and LayerScale around 1, the
    rest around 0) so that LayerScale (1e-5 at init) no longer hides the attention and MLP branches."""
    torch.manual_seed(seed)
    net = DenseMarksNet(TINY).eval()
    if spread is not None:
        with torch.no_grad():
            for name, parameter in net.named_parameters():
                centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "lambda1")) else 0.0
                parameter.copy_(centre + spread * torch.randn_like(parameter))
    return net


def random_images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float()


def reference_dinov3_tokens(official: dict, config: DenseMarksConfig, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Independent re-statement of DINOv3's get_intermediate_layers(n=feature_blocks, norm=True,
    return_class_token=True) on the official key names: fused qkv with its bias mask, RoPE from `periods` on patch
    tokens only, LayerScale `gamma`. Returns per feature block (B, 1+N, D) with CLS first, registers dropped."""
    sd = {key.removeprefix(BACKBONE): value for key, value in official.items() if key.startswith(BACKBONE)}
    dim, heads, eps, registers = config.hidden_size, config.num_heads, config.layer_norm_eps, config.num_register_tokens
    patches = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=config.patch_size)
    batch, _, rows, cols = patches.shape
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    x = torch.cat([cls.expand(batch, -1, -1), sd["storage_tokens"].expand(batch, -1, -1),
                   patches.flatten(2).transpose(1, 2)], dim=1)
    centres = torch.meshgrid(torch.arange(0.5, rows) / rows, torch.arange(0.5, cols) / cols, indexing="ij")
    grid = torch.stack(centres, dim=-1)
    angles = (2 * math.pi * (2 * grid.flatten(0, 1) - 1)[:, :, None] / sd["rope_embed.periods"]).flatten(1).tile(2)

    def rope(t: torch.Tensor) -> torch.Tensor:
        prefix, rest = t[:, :, : 1 + registers], t[:, :, 1 + registers :]
        first, second = rest.chunk(2, dim=-1)
        return torch.cat([prefix, rest * angles.cos() + torch.cat([-second, first], -1) * angles.sin()], dim=2)

    def layer_norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps)

    outputs = []
    for block in range(config.num_layers):
        b = f"blocks.{block}."
        qkv_bias = sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"]
        qkv = F.linear(layer_norm(x, b + "norm1"), sd[b + "attn.qkv.weight"], qkv_bias)
        q, k, v = qkv.reshape(batch, x.shape[1], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(x.shape)
        x = x + sd[b + "ls1.gamma"] * F.linear(attended, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        hidden = F.gelu(F.linear(layer_norm(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + sd[b + "ls2.gamma"] * F.linear(hidden, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        if block in config.feature_blocks:
            normed = layer_norm(x, "norm")
            outputs.append(torch.cat([normed[:, :1], normed[:, 1 + registers :]], dim=1))
    return outputs


def test_tiny_output_shape_and_range():
    net = tiny_net()
    with torch.no_grad():
        square, wide = net(random_images(2, 64, 64)), net(random_images(1, 48, 80))
    assert square.shape == (2, 3, 64, 64) and wide.shape == (1, 3, 48, 80)
    for uvw in (square, wide):
        assert uvw.min() > 0 and uvw.max() < 1
        assert uvw.std() > 1e-3  # not a constant map


def test_sides_must_be_patch_multiples():
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_net()(random_images(1, 64, 56))


def test_eval_forward_is_deterministic():
    net, images = tiny_net(spread=0.3), random_images(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(images), net(images))


def test_checkpoint_round_trip_uses_official_names_and_reproduces_outputs(tmp_path):
    net, images = tiny_net(spread=0.2), random_images(2, 64, 64)
    path = tmp_path / "model.safetensors"
    save_official_checkpoint(net, path)
    keys = set(load_file(path))
    assert {BACKBONE + "blocks.3.attn.qkv.weight", BACKBONE + "blocks.0.ls1.gamma", BACKBONE + "storage_tokens",
            BACKBONE + "rope_embed.periods", BACKBONE + "patch_embed.proj.weight", "predictor.embed_lowres.weight",
            "embedder.dpt_neck.fusion_stage.layers.3.projection.weight"} <= keys
    assert not any("q_proj" in key or "lambda1" in key or "register_tokens" in key for key in keys)
    loaded = load_densemarks(path, TINY)
    with torch.no_grad():
        expected, actual = net(images), loaded(images)
    assert expected.std() > 0.05  # weights spread enough for the comparison to mean something
    assert torch.equal(expected, actual)


def test_backbone_matches_reference_dinov3_computation(tmp_path):
    net = tiny_net(spread=0.2)
    path = tmp_path / "model.safetensors"
    save_official_checkpoint(net, path)
    official = load_file(path)
    # DINOv3 masks the key third of the qkv bias: whatever is stored there must not matter.
    for block in range(TINY.num_layers):
        bias = official[f"{BACKBONE}blocks.{block}.attn.qkv.bias"]
        bias[TINY.hidden_size : 2 * TINY.hidden_size] = torch.randn(TINY.hidden_size)
    save_file(official, str(path))
    loaded = load_densemarks(path, TINY)
    pixels = normalize_rgb(random_images(2, 64, 48), loaded.pixel_mean, loaded.pixel_std)
    with torch.no_grad():
        ours = loaded.embedder.backbone_tokens(pixels)
        reference = reference_dinov3_tokens(official, TINY, pixels)
    assert len(ours) == len(reference) == 4
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape == (2, 1 + 4 * 3, TINY.hidden_size)
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def _rewrite(path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, str(path))


def test_missing_key_fails_with_its_name(tmp_path):
    path = tmp_path / "model.safetensors"
    save_official_checkpoint(tiny_net(), path)
    _rewrite(path, lambda state: state.pop(BACKBONE + "blocks.2.ls1.gamma"))
    with pytest.raises(TrackerError, match=r"1 missing: embedder\.backbone\.blocks\.2\.ls1\.gamma"):
        load_densemarks(path, TINY)


def test_unexpected_key_fails_and_foreign_prefixes_are_ignored(tmp_path):
    path = tmp_path / "model.safetensors"
    save_official_checkpoint(tiny_net(), path)
    _rewrite(path, lambda state: state.update({"cube_grid": torch.zeros(2)}))  # outside the kept prefixes
    load_densemarks(path, TINY)
    _rewrite(path, lambda state: state.update({BACKBONE + "blocks.0.attn.qkv.scale": torch.zeros(2)}))
    with pytest.raises(TrackerError, match=r"1 unexpected: embedder\.backbone\.blocks\.0\.attn\.qkv\.scale"):
        load_densemarks(path, TINY)


def test_unmasked_key_bias_and_wrong_sizes_fail(tmp_path):
    path = tmp_path / "model.safetensors"
    save_official_checkpoint(tiny_net(), path)

    def unmask_key_bias(state: dict) -> None:
        state[BACKBONE + "blocks.1.attn.qkv.bias_mask"].fill_(1.0)
        state[BACKBONE + "blocks.1.attn.qkv.bias"].fill_(0.5)

    _rewrite(path, unmask_key_bias)
    with pytest.raises(TrackerError, match="non-zero key bias"):
        load_densemarks(path, TINY)
    save_official_checkpoint(tiny_net(), path)
    with pytest.raises(TrackerError, match="do not fit this architecture"):
        load_densemarks(path, replace(TINY, fusion_hidden_size=8))


def test_weights_not_found_or_unreadable(tmp_path):
    with pytest.raises(MissingAssetError, match="--densemarks-weights"):
        resolve_weights_path(tmp_path / "absent.safetensors")
    with pytest.raises(MissingAssetError, match="not in the Hugging Face cache and the hub is offline"):
        resolve_weights_path(None, offline=True, cache_dir=tmp_path / "hub")
    # The hub cache layout: refs/main names the snapshot holding the file.
    repo = tmp_path / "hub" / "models--diddone--densemarks"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"x")
    assert resolve_weights_path(None, offline=True, cache_dir=tmp_path / "hub") == snapshot / "model.safetensors"
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(TrackerError, match="cannot read DenseMarks weights"):
        load_densemarks(garbage, TINY)


def test_full_config_forward_at_512():
    torch.manual_seed(0)
    with no_init_weights():  # transformers' own initialisation of 110M parameters takes ~10 s here
        net = DenseMarksNet().eval()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.02)
    parameters = sum(p.numel() for p in net.parameters())
    assert 109e6 < parameters < 111e6  # the released model has about 110M parameters
    start = time.perf_counter()
    with torch.no_grad():
        uvw = net(random_images(1, 512, 512))
    print(f"full DenseMarks forward at 512x512 on CPU: {time.perf_counter() - start:.1f} s")
    assert uvw.shape == (1, 3, 512, 512)
    assert uvw.min() > 0 and uvw.max() < 1


def test_openvino_forward_matches_eager():
    """The compiled CPU path computes the eager network's outputs (random weights spread so that every branch
    counts, yet small enough that tanh does not saturate: a saturated map would hide any difference)."""
    net, images = tiny_net(spread=0.1), random_images(2, 64, 64)
    forward, backend = build_forward(net, "openvino", "fp32", 64)
    assert backend == "openvino" and forward is not net
    with torch.no_grad():
        expected = net(images)
    actual = forward(images)
    assert expected.std() > 0.05 and ((expected > 0.02) & (expected < 0.98)).float().mean() > 0.9
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="takes"):
        forward(random_images(1, 48, 48))


def test_backend_choice():
    assert resolve_backend("auto", torch.device("cpu")) == "openvino"
    assert resolve_backend("auto", torch.device("cuda")) == "eager"
    assert resolve_backend("eager", torch.device("cpu")) == "eager"
    with pytest.raises(TrackerError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(TrackerError, match="unknown DenseMarks backend"):
        resolve_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(TrackerError, match="unknown DenseMarks precision"):
        build_forward(tiny_net(), "eager", "fp8", 64)


def test_predictor_backends_agree_and_bf16_is_cached_apart(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_official_checkpoint(tiny_net(spread=0.1), weights)
    frame = np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    box = CropBox(20.0, 10.0, 70.0)
    eager = DenseMarksPredictor.from_weights(weights, config=TINY, backend="eager")
    fast = DenseMarksPredictor.from_weights(weights, config=TINY, backend="auto")
    assert (eager.backend, fast.backend) == ("eager", "openvino") and fast.model_id == eager.model_id
    expected = eager.predict(frame, box).uvw
    assert expected.std() > 0.05
    np.testing.assert_allclose(fast.predict(frame, box).uvw, expected, atol=1e-4, rtol=0)
    reduced = DenseMarksPredictor.from_weights(weights, config=TINY, backend="eager", precision="bf16")
    assert reduced.model_id == eager.model_id + "+bf16"
    np.testing.assert_allclose(reduced.predict(frame, box).uvw, expected, atol=0.1)


def test_crop_affine_round_trip_and_pixels():
    box = CropBox(x0=-8.0, y0=20.0, size=64.0)  # extends past the left frame edge
    affine = frame_to_crop_affine(box, 32)
    points = np.array([[0.0, 0.0], [13.25, 40.5], [-7.5, 83.5]])
    np.testing.assert_allclose(apply_affine(invert_affine(affine), apply_affine(affine, points)), points, atol=1e-12)
    corners = np.array([[-8.5, 19.5], [55.5, 83.5]])  # outer edges of the box's corner pixels
    np.testing.assert_allclose(apply_affine(affine, corners), [[-0.5, -0.5], [31.5, 31.5]])
    # On a linear ramp, area averaging of 2x2 blocks gives exactly the ramp at the crop pixel's frame position.
    rows, cols = np.mgrid[0:100, 0:120]
    frame = np.stack([cols * 2, rows * 2, np.full_like(rows, 77)], axis=-1).astype(np.uint8)
    crop, crop_affine = crop_square(frame, box, 32)
    np.testing.assert_array_equal(crop_affine, affine)
    frame_points = apply_affine(invert_affine(affine), np.array([[10.0, 5.0], [31.0, 31.0]]))
    for (col, row), (x, y) in zip([(10, 5), (31, 31)], frame_points):
        np.testing.assert_allclose(crop[row, col], [2 * x, 2 * y, 77], atol=0.51)
    assert np.all(crop[:, :3] == 0)  # frame columns -8..-3: outside the frame, black


def test_prediction_cache_hit_miss_and_invalidation(tmp_path):
    weights_a, weights_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_official_checkpoint(tiny_net(seed=0), weights_a)
    save_official_checkpoint(tiny_net(seed=1), weights_b)
    predictor = DenseMarksPredictor.from_weights(weights_a, config=TINY)
    assert predictor.model_id == hashlib.sha256(weights_a.read_bytes()).hexdigest()
    calls = []
    predictor.net.register_forward_hook(lambda *_: calls.append(1))
    frame = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    box = CropBox(20.0, 10.0, 70.0)

    cache = UvwCache(tmp_path / "video", predictor.model_id, predictor.crop_size)
    first = cached_predict(predictor, cache, 7, frame, box)
    assert len(calls) == 1 and 7 in cache and 8 not in cache
    assert first.uvw.shape == (3, 64, 64) and first.uvw.dtype == np.float32
    np.testing.assert_array_equal(first.frame_to_crop, frame_to_crop_affine(box, 64))

    reopened = UvwCache(tmp_path / "video", predictor.model_id, predictor.crop_size)
    again = cached_predict(predictor, reopened, 7, frame, box)
    assert len(calls) == 1  # loaded, not recomputed
    np.testing.assert_array_equal(again.uvw, first.uvw)
    np.testing.assert_allclose(again.uvw, predictor.predict(frame, box).uvw, atol=5e-4)  # float16 storage

    other = DenseMarksPredictor.from_weights(weights_b, config=TINY)
    other_cache = UvwCache(tmp_path / "video", other.model_id, other.crop_size)
    assert 7 not in other_cache  # other weights: the stored frames were dropped
    recomputed = cached_predict(other, other_cache, 7, frame, box)
    assert np.abs(recomputed.uvw - first.uvw).max() > 1e-3
