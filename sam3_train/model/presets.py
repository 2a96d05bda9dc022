"""Model sizes as transformers ``Sam3Config`` objects.

- ``tiny``: ~4.5 M parameters (3.2 M of them the CLIP token embedding) at 224 px; a CPU forward and
  backward in a fraction of a second. For tests.
- ``small``: wider and deeper, still CPU-trainable on the built-in shapes dataset.
- ``sam3``: the released sizes (transformers' default ``Sam3Config``: ViT-L-like 1024 x 32 at 1008 px,
  CLIP text 1024 x 24, d_model 256, 6 + 6 DETR layers, 200 queries).

Constraints of transformers' SAM 3 that the small presets respect: axial RoPE needs
(ViT hidden / heads) divisible by 4; image_size / patch_size must be divisible by window_size; the
ViT ends on a global-attention block; the FPN runs at scales [4, 2, 1, 0.5] (its last level is dropped
and the DETR encoder runs on the 1x level, so the token grid is image_size / patch_size).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import Sam3Config

PRESETS = ("tiny", "small", "sam3")


def _small_config(
    *,
    image_size: int,
    patch_size: int,
    window_size: int,
    vit_hidden: int,
    vit_layers: int,
    vit_heads: int,
    text_hidden: int,
    text_layers: int,
    text_heads: int,
    d_model: int,
    heads: int,
    ffn: int,
    encoder_layers: int,
    decoder_layers: int,
    geometry_layers: int,
    num_queries: int,
) -> dict[str, Any]:
    grid = image_size // patch_size
    # Global attention on every other block from the middle, always on the last one.
    global_layers = sorted({vit_layers - 1, vit_layers // 2 - 1})
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": vit_hidden,
                "intermediate_size": 4 * vit_hidden,
                "num_hidden_layers": vit_layers,
                "num_attention_heads": vit_heads,
                "image_size": image_size,
                "patch_size": patch_size,
                "window_size": window_size,
                "global_attn_indexes": global_layers,
                "pretrain_image_size": image_size,
            },
            "fpn_hidden_size": d_model,
            "scale_factors": [4.0, 2.0, 1.0, 0.5],
            "backbone_feature_sizes": [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]],
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": 49408,
            "hidden_size": text_hidden,
            "intermediate_size": 4 * text_hidden,
            "projection_dim": text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "max_position_embeddings": 32,
            "hidden_act": "gelu",
        },
        "geometry_encoder_config": {
            "hidden_size": d_model,
            "num_layers": geometry_layers,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
        },
        "detr_encoder_config": {
            "hidden_size": d_model,
            "num_layers": encoder_layers,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
        },
        "detr_decoder_config": {
            "hidden_size": d_model,
            "num_layers": decoder_layers,
            "num_queries": num_queries,
            "num_attention_heads": heads,
            "intermediate_size": ffn,
        },
        "mask_decoder_config": {"hidden_size": d_model, "num_attention_heads": heads},
    }


_PRESET_KWARGS: dict[str, dict[str, Any] | None] = {
    "tiny": _small_config(
        image_size=224, patch_size=14, window_size=8, vit_hidden=64, vit_layers=4, vit_heads=4,
        text_hidden=64, text_layers=2, text_heads=4, d_model=64, heads=4, ffn=256,
        encoder_layers=2, decoder_layers=3, geometry_layers=1, num_queries=50,
    ),
    "small": _small_config(
        image_size=224, patch_size=14, window_size=8, vit_hidden=128, vit_layers=6, vit_heads=4,
        text_hidden=128, text_layers=3, text_heads=4, d_model=128, heads=4, ffn=512,
        encoder_layers=3, decoder_layers=4, geometry_layers=2, num_queries=100,
    ),
    "sam3": None,  # transformers' defaults are the released sizes
}

# Friendly shortcuts for the overrides people reach for most.
_SHORTCUTS = {
    "image_size": ("vision_config", "backbone_config", "image_size"),
    "num_queries": ("detr_decoder_config", "num_queries"),
}
_DROPOUT_CONFIGS = ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_config(preset: str = "tiny", **overrides: Any) -> Sam3Config:
    """A ``Sam3Config`` for a preset, with overrides.

    Overrides are nested dicts keyed by sub-config (``detr_decoder_config={"num_layers": 2}``), or the
    shortcuts ``image_size`` (also fixes the FPN feature sizes), ``num_queries`` and ``dropout`` (every
    DETR-side dropout).
    """
    if preset not in _PRESET_KWARGS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    if preset == "sam3":
        kwargs = Sam3Config().to_dict()
        for key in ("model_type", "transformers_version", "architectures"):
            kwargs.pop(key, None)
    else:
        kwargs = copy.deepcopy(_PRESET_KWARGS[preset])
    dropout = overrides.pop("dropout", None)
    for name, path in _SHORTCUTS.items():
        if name in overrides:
            value = overrides.pop(name)
            node = kwargs
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    if dropout is not None:
        for name in _DROPOUT_CONFIGS:
            kwargs.setdefault(name, {})["dropout"] = dropout
    unknown = set(overrides) - set(kwargs) - set(Sam3Config().to_dict())
    if unknown:
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)}: use a sub-config name ({', '.join(_DROPOUT_CONFIGS)}, "
            f"vision_config, text_config) or one of image_size, num_queries, dropout."
        )
    kwargs = _merge(kwargs, overrides)
    vision = kwargs["vision_config"]
    backbone = vision["backbone_config"]
    grid = backbone["image_size"] // backbone["patch_size"]
    scales = vision.get("scale_factors") or [4.0, 2.0, 1.0, 0.5]
    vision["backbone_feature_sizes"] = [[int(grid * s), int(grid * s)] for s in scales[:-1]]
    _check(backbone)
    return Sam3Config(**kwargs)


class ImageSizeError(ValueError):
    """An input side the ViT cannot tile: not a whole number of attention windows of patches."""

    def __init__(self, image_size: int, patch_size: int, window_size: int):
        step = patch_size * window_size  # one attention window of patches
        low = max(step, image_size // step * step)
        sizes = sorted({low, low + step} | ({low - step} if low > step else set()))
        super().__init__(
            f"image_size {image_size} must be a multiple of patch_size {patch_size} and the token grid "
            f"{image_size // patch_size} a multiple of window_size {window_size}. The input side must be a multiple "
            f"of {step} px ({window_size} x {window_size} patches of {patch_size} px per attention window); "
            f"{step} is the smallest. Use e.g. {', '.join(map(str, sizes))}."
        )
        self.image_size, self.step, self.sizes = image_size, step, sizes


def _check(backbone: dict[str, Any]) -> None:
    """Fail early, with the rule, where transformers would fail deep inside a forward."""
    hidden, heads = backbone["hidden_size"], backbone["num_attention_heads"]
    if (hidden // heads) % 4:
        raise ValueError(f"ViT hidden_size / num_attention_heads = {hidden // heads} must be divisible by 4 (axial RoPE).")
    grid = backbone["image_size"] // backbone["patch_size"]
    if backbone["image_size"] % backbone["patch_size"] or grid % backbone["window_size"]:
        raise ImageSizeError(backbone["image_size"], backbone["patch_size"], backbone["window_size"])
    if backbone["num_hidden_layers"] - 1 not in backbone["global_attn_indexes"]:
        raise ValueError("The ViT must end on a global-attention block (last index in global_attn_indexes).")
