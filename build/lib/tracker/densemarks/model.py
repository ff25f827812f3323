"""DenseMarks network: per-pixel canonical head coordinates uvw in the unit cube [0, 1]^3.

Architecture of Pozdeev et al. (arXiv 2511.02830, github.com/diddone/densemarks), assembled from
`transformers` classes with configs written here (nothing is fetched):

    RGB (B,3,H,W) in [0,255] -> /255, ImageNet mean/std
    -> DINOv3 ViT-B/16 (4 registers, RoPE, LayerScale): outputs of blocks 8..11, each through the final
       LayerNorm, CLS token kept in front, register tokens dropped
    -> DPT neck (reassemble + fusion, 256 channels): only the last, highest-resolution map (B,256,H/2,W/2)
    -> ConvTranspose2d(256, 3, 4, stride 2, padding 1) -> (B,3,H,W), bilinear resize to the input size
    -> uvw = tanh(3 x) / 2 + 1/2.

Module attribute names (`embedder.backbone`, `embedder.dpt_neck`, `predictor.embed_lowres`) follow the
official model so that its checkpoint maps onto this one (see `weights.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, Dinov2Config, DPTConfig
from transformers.models.dpt.modeling_dpt import DPTNeck

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DenseMarksConfig:
    """Sizes of the DenseMarks network. Defaults are the released model (DINOv3 ViT-B/16 + DPT)."""

    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    num_register_tokens: int = 4
    layerscale_init: float = 1e-5
    rope_base: float = 100.0
    layer_norm_eps: float = 1e-5
    feature_blocks: tuple[int, ...] = (8, 9, 10, 11)  # 0-based blocks whose outputs feed the DPT neck
    neck_hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    fusion_hidden_size: int = 256
    image_size: int = 512  # nominal input side (the net accepts any multiple of patch_size)
    uvw_tanh_scale: float = 3.0
    bf16_on_cuda: bool = True  # autocast backbone + neck to bfloat16 on GPUs of compute capability >= 8

    @classmethod
    def tiny(cls) -> DenseMarksConfig:
        """A 0.4M-parameter variant with the same structure (64x64 input), for tests."""
        return cls(
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            feature_blocks=(0, 1, 2, 3),
            neck_hidden_sizes=(8, 16, 32, 64),
            fusion_hidden_size=16,
            image_size=64,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def dinov3_backbone_config(config: DenseMarksConfig) -> DINOv3ViTConfig:
    """transformers config of the DINOv3 ViT returning normed CLS + patch tokens of `feature_blocks`.

    Stage k of DINOv3ViTBackbone is the output of block k-1 (stage 0 is the patch embedding).
    The key bias is off: DINOv3 masks the key part of its fused qkv bias to zero.
    """
    return DINOv3ViTConfig(
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.hidden_size * config.mlp_ratio,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        hidden_act="gelu",
        layer_norm_eps=config.layer_norm_eps,
        rope_theta=config.rope_base,
        image_size=config.image_size,
        query_bias=True,
        key_bias=False,
        value_bias=True,
        proj_bias=True,
        mlp_bias=True,
        layerscale_value=config.layerscale_init,
        num_register_tokens=config.num_register_tokens,
        out_indices=[block + 1 for block in config.feature_blocks],
        apply_layernorm=True,
        reshape_hidden_states=False,
        return_class_token=True,
    )


def dpt_neck_config(config: DenseMarksConfig) -> DPTConfig:
    """transformers DPT config as the official code builds it from a DINOv2-base backbone config.

    Of the backbone config the neck reads only `hidden_size` (readout projection and reassemble inputs).
    """
    backbone = Dinov2Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        out_features=[f"stage{i}" for i in range(1, len(config.feature_blocks) + 1)],
        reshape_hidden_states=False,
    )
    return DPTConfig(
        backbone_config=backbone,
        readout_type="project",
        neck_hidden_sizes=list(config.neck_hidden_sizes),
        reassemble_factors=list(config.reassemble_factors),
        fusion_hidden_size=config.fusion_hidden_size,
        use_batch_norm_in_fusion_residual=False,
    )


def normalize_rgb(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] -> ImageNet-normalised float.

    images: (B,3,H,W) any real/uint8 dtype; mean, std: (1,3,1,1). Returns (B,3,H,W) float32.
    """
    return (images.float() / 255.0 - mean) / std


def uvw_activation(logits: torch.Tensor, tanh_scale: float) -> torch.Tensor:
    """Map unbounded logits to the unit cube: tanh(scale * x) / 2 + 1/2. Shapes are kept."""
    return torch.tanh(tanh_scale * logits) * 0.5 + 0.5


def bf16_autocast_available(device: torch.device) -> bool:
    """bfloat16 autocast is worth it only on CUDA GPUs with native bf16 (Ampere, compute capability 8+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


class DenseMarksEmbedder(nn.Module):
    """DINOv3 backbone + DPT neck: normalised images (B,3,H,W) -> features (B,C_fusion,H/2,W/2) float32."""

    def __init__(self, config: DenseMarksConfig):
        super().__init__()
        self.config = config
        self.backbone = DINOv3ViTBackbone(dinov3_backbone_config(config))
        self.dpt_neck = DPTNeck(dpt_neck_config(config))

    def backbone_tokens(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (B,3,H,W) -> per feature block the final-normed tokens (B, 1 + H*W/patch^2, D):
        CLS first (the DPT readout projection uses it), then the patch tokens; register tokens dropped."""
        out = self.backbone(pixels)
        return [torch.cat([cls[:, None], patches], dim=1) for cls, patches in zip(out.cls_tokens, out.feature_maps)]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixels.shape
        patch = self.config.patch_size
        use_bf16 = self.config.bf16_on_cuda and bf16_autocast_available(pixels.device)
        with torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            tokens = self.backbone_tokens(pixels)
            fused = self.dpt_neck(tokens, height // patch, width // patch)[-1]  # highest resolution map only
        return fused.float()


class UvwHead(nn.Module):
    """Features (B,C,h,w) -> uvw logits (B,3,2h,2w) by one transposed convolution."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.embed_lowres = nn.ConvTranspose2d(in_channels, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.embed_lowres(features)


class DenseMarksNet(nn.Module):
    """RGB images (B,3,H,W) in [0,255], H and W multiples of the patch size -> uvw (B,3,H,W) in (0,1)."""

    def __init__(self, config: DenseMarksConfig | None = None):
        super().__init__()
        self.config = config or DenseMarksConfig()
        self.embedder = DenseMarksEmbedder(self.config)
        self.predictor = UvwHead(self.config.fusion_hidden_size)
        # Not persistent: the official checkpoint does not carry them.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = images.shape
        patch = self.config.patch_size
        if channels != 3 or height % patch or width % patch:
            raise ValueError(f"DenseMarks needs (B,3,H,W) with H, W multiples of {patch}, got {tuple(images.shape)}")
        pixels = normalize_rgb(images.to(self.pixel_mean.device), self.pixel_mean, self.pixel_std)
        logits = self.predictor(self.embedder(pixels))
        if logits.shape[-2:] != (height, width):  # bilinear resize at equal size is the identity: skip it
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return uvw_activation(logits, self.config.uvw_tanh_scale)
