"""DenseMarks weights: finding the official `model.safetensors`, mapping its keys onto `DenseMarksNet`, and
writing checkpoints with the official key names.

The official checkpoint (Hugging Face `diddone/densemarks`) keeps three key prefixes (the official loader drops
all others): `embedder.backbone.` with DINOv3's own module names (facebookresearch/dinov3), `embedder.dpt_neck.`
with transformers' DPT neck names, and `predictor.embed_lowres.` (the transposed convolution). Our backbone is
transformers' DINOv3ViTBackbone, whose names differ; the renaming follows transformers'
convert_dinov3_vit_to_hf.py, updated to the module names of the installed transformers 5:

    cls_token, storage_tokens, mask_token (1,D)   -> embeddings.cls_token, .register_tokens, .mask_token (1,1,D)
    patch_embed.proj.{weight,bias}                -> embeddings.patch_embeddings.{weight,bias}
    blocks.N.attn.qkv.weight (3D,D)               -> model.layer.N.attention.{q,k,v}_proj.weight
    blocks.N.attn.qkv.bias * qkv.bias_mask (3D,)  -> model.layer.N.attention.{q,v}_proj.bias (key part must be 0)
    blocks.N.attn.proj                            -> model.layer.N.attention.o_proj
    blocks.N.ls{1,2}.gamma                        -> model.layer.N.layer_scale{1,2}.lambda1
    blocks.N.mlp.fc{1,2}                          -> model.layer.N.mlp.{up,down}_proj
    blocks.N.norm{1,2}, norm                      -> model.layer.N.norm{1,2}, norm
    rope_embed.periods                            -> (not a parameter: checked against the config)

Weights licence: CC BY-NC 4.0 (non-commercial use only).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights

from tracker.densemarks.model import DenseMarksConfig, DenseMarksNet
from tracker.errors import MissingAssetError, TrackerError

LICENSE = "CC BY-NC 4.0 (DenseMarks weights by Pozdeev et al., huggingface.co/diddone/densemarks; non-commercial use)"
HF_REPO_ID = "diddone/densemarks"
HF_FILENAME = "model.safetensors"

BACKBONE = "embedder.backbone."
KEPT_PREFIXES = (BACKBONE, "embedder.dpt_neck.", "predictor.embed_lowres.")
# Buffers of the DINOv3 module: fixed by the architecture, so a checkpoint without them still loads (the
# official loader, strict=False, would keep their initial values, which is what we use).
OPTIONAL_SUFFIXES = (".attn.qkv.bias_mask", "rope_embed.periods")

_BLOCK_RENAMES = {
    "norm1": "norm1",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
    "ls2.gamma": "layer_scale2.lambda1",
}
_QKV_PROJ = re.compile(r"model\.layer\.\d+\.attention\.[qkv]_proj\.(weight|bias)")
_TOKEN_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "storage_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def backbone_renames(num_layers: int) -> dict[str, str]:
    """One-to-one backbone renames, DINOv3 name -> transformers name (both without the backbone prefix)."""
    renames = dict(_TOKEN_RENAMES)
    for block in range(num_layers):
        for original, converted in _BLOCK_RENAMES.items():
            suffixes = ("",) if original.endswith("gamma") else (".weight", ".bias")
            for suffix in suffixes:
                renames[f"blocks.{block}.{original}{suffix}"] = f"model.layer.{block}.{converted}{suffix}"
    return renames


def rope_periods(config: DenseMarksConfig) -> torch.Tensor:
    """DINOv3 RoPE periods base^(2i / (D_head/2)), i < D_head/4 (transformers' 1/inv_freq). Shape (D_head/4,)."""
    quarter = config.head_dim // 4
    return config.rope_base ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter))


def default_qkv_bias_mask(hidden_size: int) -> torch.Tensor:
    """DINOv3's initial qkv bias mask: 1 on the query and value thirds, 0 on the key third. (3D,)"""
    mask = torch.ones(3 * hidden_size)
    mask[hidden_size : 2 * hidden_size] = 0
    return mask


def to_official_state(state: Mapping[str, torch.Tensor], config: DenseMarksConfig) -> dict[str, torch.Tensor]:
    """`DenseMarksNet.state_dict()` -> state with the official checkpoint's key names and layouts."""
    renames = {converted: original for original, converted in backbone_renames(config.num_layers).items()}
    official: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(BACKBONE):
            official[key] = value
            continue
        name = key.removeprefix(BACKBONE)
        if name in renames:
            official[BACKBONE + renames[name]] = value.reshape(1, -1) if name.endswith("mask_token") else value
        elif not _QKV_PROJ.fullmatch(name):  # q/k/v projections are fused below
            raise KeyError(f"no official name for backbone key {key}")
    for block in range(config.num_layers):
        attention = f"{BACKBONE}model.layer.{block}.attention."
        qkv = f"{BACKBONE}blocks.{block}.attn.qkv."
        official[qkv + "weight"] = torch.cat([state[f"{attention}{p}_proj.weight"] for p in "qkv"])
        query_bias = state[f"{attention}q_proj.bias"]
        official[qkv + "bias"] = torch.cat([query_bias, torch.zeros_like(query_bias), state[f"{attention}v_proj.bias"]])
        official[qkv + "bias_mask"] = default_qkv_bias_mask(config.hidden_size).to(query_bias)
    official[BACKBONE + "rope_embed.periods"] = rope_periods(config)
    return official


def _qkv_to_model(block: int, official: Mapping[str, torch.Tensor],
                  config: DenseMarksConfig) -> dict[str, torch.Tensor]:
    """Split block `block`'s fused qkv into q/k/v projections, applying DINOv3's bias mask."""
    qkv = f"{BACKBONE}blocks.{block}.attn.qkv."
    attention = f"{BACKBONE}model.layer.{block}.attention."
    query, key, value = official[qkv + "weight"].chunk(3, dim=0)
    bias = official[qkv + "bias"]
    mask = official.get(qkv + "bias_mask", default_qkv_bias_mask(config.hidden_size))
    query_bias, key_bias, value_bias = (bias * mask.to(bias)).chunk(3)
    if torch.any(key_bias != 0):
        raise TrackerError(f"DenseMarks checkpoint has a non-zero key bias in {qkv}bias (its bias_mask does not "
                           "zero it); this model has no key bias: the checkpoint is not a DINOv3 ViT-B/16 one")
    return {
        attention + "q_proj.weight": query,
        attention + "k_proj.weight": key,
        attention + "v_proj.weight": value,
        attention + "q_proj.bias": query_bias,
        attention + "v_proj.bias": value_bias,
    }


def from_official_state(official: Mapping[str, torch.Tensor], config: DenseMarksConfig) -> dict[str, torch.Tensor]:
    """Official checkpoint state -> `DenseMarksNet` state. Keys must already be checked (`check_official_keys`)."""
    state: dict[str, torch.Tensor] = {}
    for original, converted in backbone_renames(config.num_layers).items():
        value = official[BACKBONE + original]
        state[BACKBONE + converted] = value.reshape(1, 1, -1) if original == "mask_token" else value
    for block in range(config.num_layers):
        state.update(_qkv_to_model(block, official, config))
    periods = official.get(BACKBONE + "rope_embed.periods")  # fixed, not learned; 1% tolerates half precision
    if periods is not None and not torch.allclose(periods.float(), rope_periods(config), rtol=1e-2):
        raise TrackerError("DenseMarks checkpoint's rope_embed.periods differ from DINOv3's (base "
                           f"{config.rope_base}): the checkpoint does not match this architecture")
    state.update({k: v for k, v in official.items() if k.startswith(KEPT_PREFIXES) and not k.startswith(BACKBONE)})
    return state


def _few(keys: set[str], count: int = 4) -> str:
    shown = sorted(keys)[:count]
    return ", ".join(shown) + (f" (+{len(keys) - count} more)" if len(keys) > count else "")


def check_official_keys(official_keys: set[str], model: DenseMarksNet, source: str) -> None:
    """Raise TrackerError naming a few missing/unexpected keys of a checkpoint (only the kept prefixes count)."""
    expected = set(to_official_state(model.state_dict(), model.config))
    required = {key for key in expected if not key.endswith(OPTIONAL_SUFFIXES)}
    kept = {key for key in official_keys if key.startswith(KEPT_PREFIXES)}
    missing, unexpected = required - kept, kept - expected
    if missing or unexpected:
        problems = ([f"{len(missing)} missing: {_few(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected: {_few(unexpected)}"] if unexpected else [])
        raise TrackerError(f"{source} is not a DenseMarks checkpoint for this architecture ({'; '.join(problems)}); "
                           f"use the official {HF_FILENAME} from {HF_REPO_ID}")


def load_official_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint on CPU, with a TrackerError if it is missing or unreadable."""
    if not path.is_file():
        raise MissingAssetError(f"DenseMarks weights not found at {path}: pass --densemarks-weights PATH/{HF_FILENAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise TrackerError(f"cannot read DenseMarks weights {path} as safetensors ({error}); "
                           f"download {HF_FILENAME} from {HF_REPO_ID} again") from error


def load_densemarks(path: str | Path, config: DenseMarksConfig | None = None,
                    device: torch.device | str = "cpu") -> DenseMarksNet:
    """Build `DenseMarksNet(config)` with the weights of an official-format `model.safetensors`, in eval mode."""
    path = Path(path)
    official = load_official_state(path)
    with no_init_weights():  # every parameter is overwritten below: skip ~10 s of random initialisation
        model = DenseMarksNet(config)
    check_official_keys(set(official), model, str(path))
    try:
        model.load_state_dict(from_official_state(official, model.config), strict=True)
    except RuntimeError as error:  # size mismatches: same names, other architecture
        first_line = str(error).strip().splitlines()[-1].strip()
        raise TrackerError(f"DenseMarks weights {path} do not fit this architecture: {first_line}") from error
    return model.to(device).eval()


def save_official_checkpoint(model: DenseMarksNet, path: str | Path) -> None:
    """Write `model` as a safetensors file with the official key names (loadable by `load_densemarks`)."""
    official = to_official_state(model.state_dict(), model.config)
    tensors = {key: value.detach().cpu().contiguous() for key, value in official.items()}
    save_file(tensors, str(path), metadata={"license": LICENSE})


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_weights_path(explicit: str | Path | None = None, offline: bool | None = None,
                         cache_dir: str | Path | None = None) -> Path:
    """Where the DenseMarks weights are: `explicit` (--densemarks-weights) if given, else the Hugging Face cache
    (`cache_dir`, default the hub's), else a download of `diddone/densemarks/model.safetensors` unless offline
    (argument, else HF_HUB_OFFLINE)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MissingAssetError(f"--densemarks-weights {path} does not exist: pass the path of {HF_FILENAME}")
        return path
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # imported here: only this route needs it

    cached = try_to_load_from_cache(HF_REPO_ID, HF_FILENAME, cache_dir=cache_dir)
    if isinstance(cached, str):
        return Path(cached)
    offline = _hub_offline() if offline is None else offline
    how = (f"download {HF_FILENAME} from huggingface.co/{HF_REPO_ID} (licence {LICENSE}) "
           "and pass --densemarks-weights PATH")
    if offline:
        raise MissingAssetError(f"DenseMarks weights are not in the Hugging Face cache and the hub is offline: {how}")
    try:
        return Path(hf_hub_download(HF_REPO_ID, HF_FILENAME, cache_dir=cache_dir))
    except Exception as error:  # network, auth, disk: all end the same way for the user
        raise MissingAssetError(f"could not download DenseMarks weights ({type(error).__name__}): {how}") from error


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (model identity for prediction caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
