"""Meta's SAM 3 checkpoint (``sam3.pt``) to the transformers layout that our detector loads.

Meta's file is a state dict of its ``Sam3Image`` (sometimes under ``"model"``). The released file
holds the video model: detector keys under ``detector.``, tracker keys under ``tracker.`` (skipped
and counted); a checkpoint written by Meta's trainer holds the image model's keys unprefixed. The
result is a directory that ``Sam3Detector.from_pretrained`` and ``transformers.Sam3Model
.from_pretrained`` both load strictly: ``config.json``, ``model.safetensors`` and, when
``open_clip_torch`` is installed, the CLIP tokenizer files.

    python tools/convert_checkpoint.py --input sam3.pt --output checkpoints/sam3-hf
    conversion = convert_checkpoint("sam3.pt", "out/", config=preset_config("tiny"))   # in Python

The key mapping is the table ``RULES`` below: each row matches the start of a Meta key and names the
transformers prefix the rest of the key is appended to, with how the tensor is carried over:

- ``copy``: as is;
- ``attn``: ``nn.MultiheadAttention``'s fused ``in_proj_weight`` / ``in_proj_bias`` split in three
  along the output dimension into ``q_proj``, ``k_proj``, ``v_proj``; ``out_proj`` becomes ``o_proj``
  (``clip_attn``: CLIP's text encoder keeps the name ``out_proj``);
- ``qkv``: the ViT's fused ``qkv`` linear split the same way;
- ``mlp``: Meta's ``MLP.layers.{i}`` become ``layer{i + 1}``;
- ``no_cls``: the ViT's absolute position embedding loses the first (CLS token) position, which
  Meta keeps from pre-training but never uses (``retain_cls_token=False``);
- ``transpose``: CLIP's ``text_projection`` is stored (in, out) by Meta, (out, in) by ``nn.Linear``;
- ``drop``: weights transformers' SAM 3 has no slot for, each with its reason (counted, reported);
- ``tracker``: the tracker's copy of the FPN neck (counted with the ``tracker.`` keys).

A key no rule matches, a transformers key left unfilled, or a tensor of the wrong shape for the
config fails the conversion with one error that names them all.

One architecture constant is set on the config: Meta's ViT LayerNorms use eps 1e-5, transformers'
config default is 1e-6; the converted config says 1e-5 so that the converted model computes what
Meta's does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import Sam3Config, Sam3Model

from sam3_train.data.tokenizer import Sam3Tokenizer
from sam3_train.model.checkpoint_io import listing
from sam3_train.model.presets import preset_config

log = logging.getLogger(__name__)

DETECTOR_PREFIX = "detector."
TRACKER_PREFIX = "tracker."
META_VIT_LAYER_NORM_EPS = 1e-5  # Meta's ViT: nn.LayerNorm(eps=1e-5); transformers' default is 1e-6

_VIT = r"backbone\.vision_backbone\.trunk\."
_TEXT = r"backbone\.language_backbone\."
_DEC = r"transformer\.decoder\."
_HF_VIT = "vision_encoder.backbone."
_HF_TEXT = "text_encoder.text_model."

# (Meta key prefix, a regex matched at the start of the key; transformers prefix (a re.sub template,
# \1 = the first group) or, for ``drop``, the reason; kind). The first matching row wins.
RULES: list[tuple[str, str, str]] = [
    # ViT backbone
    (_VIT + r"pos_embed$", _HF_VIT + "embeddings.position_embeddings", "no_cls"),
    (_VIT + r"patch_embed\.proj\.", _HF_VIT + "embeddings.patch_embeddings.projection.", "copy"),
    (_VIT + r"ln_pre\.", _HF_VIT + "layer_norm.", "copy"),
    (_VIT + r"blocks\.(\d+)\.norm1\.", _HF_VIT + r"layers.\1.layer_norm1.", "copy"),
    (_VIT + r"blocks\.(\d+)\.norm2\.", _HF_VIT + r"layers.\1.layer_norm2.", "copy"),
    (_VIT + r"blocks\.(\d+)\.attn\.qkv\.", _HF_VIT + r"layers.\1.attention.", "qkv"),
    (_VIT + r"blocks\.(\d+)\.attn\.proj\.", _HF_VIT + r"layers.\1.attention.o_proj.", "copy"),
    (_VIT + r"blocks\.(\d+)\.attn\.freqs_cis$", "RoPE frequencies (computed from the config)", "drop"),
    (_VIT + r"blocks\.(\d+)\.mlp\.", _HF_VIT + r"layers.\1.mlp.", "copy"),
    # FPN neck: Meta's nn.Sequential names its stages; transformers numbers them (GELU is stage 1)
    (r"backbone\.vision_backbone\.convs\.(\d+)\.(dconv_2x2_0|dconv_2x2|maxpool_2x2)\.",
     r"vision_encoder.neck.fpn_layers.\1.scale_layers.0.", "copy"),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.dconv_2x2_1\.", r"vision_encoder.neck.fpn_layers.\1.scale_layers.2.", "copy"),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_1x1\.", r"vision_encoder.neck.fpn_layers.\1.proj1.", "copy"),
    (r"backbone\.vision_backbone\.convs\.(\d+)\.conv_3x3\.", r"vision_encoder.neck.fpn_layers.\1.proj2.", "copy"),
    (r"backbone\.vision_backbone\.sam2_convs\.", "", "tracker"),
    # CLIP text encoder and the projection to d_model
    (_TEXT + r"encoder\.token_embedding\.", _HF_TEXT + "embeddings.token_embedding.", "copy"),
    (_TEXT + r"encoder\.positional_embedding$", _HF_TEXT + "embeddings.position_embedding.weight", "copy"),
    (_TEXT + r"encoder\.transformer\.resblocks\.(\d+)\.attn\.", _HF_TEXT + r"encoder.layers.\1.self_attn.", "clip_attn"),
    (_TEXT + r"encoder\.transformer\.resblocks\.(\d+)\.ln_1\.", _HF_TEXT + r"encoder.layers.\1.layer_norm1.", "copy"),
    (_TEXT + r"encoder\.transformer\.resblocks\.(\d+)\.ln_2\.", _HF_TEXT + r"encoder.layers.\1.layer_norm2.", "copy"),
    (_TEXT + r"encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", _HF_TEXT + r"encoder.layers.\1.mlp.fc1.", "copy"),
    (_TEXT + r"encoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", _HF_TEXT + r"encoder.layers.\1.mlp.fc2.", "copy"),
    (_TEXT + r"encoder\.ln_final\.", _HF_TEXT + "final_layer_norm.", "copy"),
    (_TEXT + r"encoder\.text_projection$", "text_encoder.text_projection.weight", "transpose"),
    (_TEXT + r"resizer\.", "text_projection.", "copy"),
    # Exemplar (geometry) encoder
    (r"geometry_encoder\.(label_embed|cls_embed|boxes_(direct|pool|pos_enc)_project|final_proj)\.",
     r"geometry_encoder.\1.", "copy"),
    (r"geometry_encoder\.points_(direct_project|pool_project|pos_enc_project)\.",
     "point-prompt encoders (transformers' SAM 3 takes boxes only; PCS never uses points)", "drop"),
    (r"geometry_encoder\.img_pre_norm\.", "geometry_encoder.vision_layer_norm.", "copy"),
    (r"geometry_encoder\.norm\.", "geometry_encoder.prompt_layer_norm.", "copy"),
    (r"geometry_encoder\.encode_norm\.", "geometry_encoder.output_layer_norm.", "copy"),
    (r"geometry_encoder\.encode\.(\d+)\.self_attn\.", r"geometry_encoder.layers.\1.self_attn.", "attn"),
    (r"geometry_encoder\.encode\.(\d+)\.cross_attn_image\.", r"geometry_encoder.layers.\1.cross_attn.", "attn"),
    (r"geometry_encoder\.encode\.(\d+)\.linear(\d)\.", r"geometry_encoder.layers.\1.mlp.fc\2.", "copy"),
    (r"geometry_encoder\.encode\.(\d+)\.norm(\d)\.", r"geometry_encoder.layers.\1.layer_norm\2.", "copy"),
    # DETR encoder (image tokens attend to the prompt)
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"detr_encoder.layers.\1.self_attn.", "attn"),
    (r"transformer\.encoder\.layers\.(\d+)\.cross_attn_image\.", r"detr_encoder.layers.\1.cross_attn.", "attn"),
    (r"transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"detr_encoder.layers.\1.mlp.fc\2.", "copy"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm(\d)\.", r"detr_encoder.layers.\1.layer_norm\2.", "copy"),
    # DETR decoder
    (_DEC + r"layers\.(\d+)\.self_attn\.", r"detr_decoder.layers.\1.self_attn.", "attn"),
    (_DEC + r"layers\.(\d+)\.norm2\.", r"detr_decoder.layers.\1.self_attn_layer_norm.", "copy"),
    (_DEC + r"layers\.(\d+)\.ca_text\.", r"detr_decoder.layers.\1.text_cross_attn.", "attn"),
    (_DEC + r"layers\.(\d+)\.catext_norm\.", r"detr_decoder.layers.\1.text_cross_attn_layer_norm.", "copy"),
    (_DEC + r"layers\.(\d+)\.cross_attn\.", r"detr_decoder.layers.\1.vision_cross_attn.", "attn"),
    (_DEC + r"layers\.(\d+)\.norm1\.", r"detr_decoder.layers.\1.vision_cross_attn_layer_norm.", "copy"),
    (_DEC + r"layers\.(\d+)\.linear(\d)\.", r"detr_decoder.layers.\1.mlp.fc\2.", "copy"),
    (_DEC + r"layers\.(\d+)\.norm3\.", r"detr_decoder.layers.\1.mlp_layer_norm.", "copy"),
    (_DEC + r"(query_embed|reference_points|presence_token)\.", r"detr_decoder.\1.", "copy"),
    (_DEC + r"norm\.", "detr_decoder.output_layer_norm.", "copy"),
    (_DEC + r"presence_token_out_norm\.", "detr_decoder.presence_layer_norm.", "copy"),
    (_DEC + r"presence_token_head\.", "detr_decoder.presence_head.", "mlp"),
    (_DEC + r"bbox_embed\.", "detr_decoder.box_head.", "mlp"),
    (_DEC + r"ref_point_head\.", "detr_decoder.ref_point_head.", "mlp"),
    (_DEC + r"boxRPB_embed_x\.", "detr_decoder.box_rpb_embed_x.", "mlp"),
    (_DEC + r"boxRPB_embed_y\.", "detr_decoder.box_rpb_embed_y.", "mlp"),
    # Class scoring: queries against the mean-pooled prompt
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.", "dot_product_scoring.text_mlp_out_norm.", "copy"),
    (r"dot_prod_scoring\.prompt_mlp\.", "dot_product_scoring.text_mlp.", "mlp"),
    (r"dot_prod_scoring\.prompt_proj\.", "dot_product_scoring.text_proj.", "copy"),
    (r"dot_prod_scoring\.hs_proj\.", "dot_product_scoring.query_proj.", "copy"),
    # Mask head
    (r"segmentation_head\.pixel_decoder\.", "mask_decoder.pixel_decoder.", "copy"),
    (r"segmentation_head\.mask_predictor\.mask_embed\.", "mask_decoder.mask_embedder.", "copy"),
    (r"segmentation_head\.instance_seg_head\.", "mask_decoder.instance_projection.", "copy"),
    (r"segmentation_head\.semantic_seg_head\.", "mask_decoder.semantic_projection.", "copy"),
    (r"segmentation_head\.cross_attend_prompt\.", "mask_decoder.prompt_cross_attn.", "attn"),
    (r"segmentation_head\.cross_attn_norm\.", "mask_decoder.prompt_cross_attn_norm.", "copy"),
]
_COMPILED = [(re.compile(pattern), target, kind) for pattern, target, kind in RULES]
_FUSED = {"in_proj_weight": "weight", "in_proj_bias": "bias"}


class MetaCheckpointError(ValueError):
    """A Meta checkpoint that does not convert: keys without a rule, slots left empty, wrong shapes."""


@dataclass
class Conversion:
    """What :func:`convert_state` produced: the transformers state and what it left out, counted."""

    state: dict[str, torch.Tensor]
    tracker_keys: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> number of Meta tensors

    def summary(self) -> str:
        parts = [f"{len(self.state)} tensors converted", f"{self.tracker_keys} tracker tensors skipped"]
        parts += [f"{n} dropped: {reason}" for reason, n in sorted(self.dropped.items())]
        return "; ".join(parts)


def _split3(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A fused [3C, ...] projection -> q, k, v, each its own storage (safetensors rejects shared ones)."""
    return [part.clone() for part in tensor.chunk(3, dim=0)]


def _map_one(key: str, tensor: torch.Tensor) -> tuple[str, list[tuple[str, torch.Tensor]] | str | None]:
    """(kind, [(hf_key, tensor)]) for a mapped key; (kind, reason) for ``drop``; (kind, None) for ``tracker``;
    ("unmapped", None) when no rule (or no suffix form of the matching rule) applies."""
    for pattern, target, kind in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        if kind == "drop":
            return kind, target
        if kind == "tracker":
            return kind, None
        prefix, rest = match.expand(target), key[match.end():]
        if kind == "copy":
            return kind, [(prefix + rest, tensor.clone())]
        if kind == "transpose":
            return kind, [(prefix, tensor.t().contiguous())]
        if kind == "no_cls":
            positions = tensor.shape[1]
            has_cls = math.isqrt(positions - 1) ** 2 == positions - 1 and math.isqrt(positions) ** 2 != positions
            return kind, [(prefix, (tensor[:, 1:] if has_cls else tensor).clone())]
        if kind == "qkv" and rest in ("weight", "bias"):
            return kind, [(f"{prefix}{n}_proj.{rest}", t) for n, t in zip("qkv", _split3(tensor))]
        if kind in ("attn", "clip_attn"):
            if rest in _FUSED:
                return kind, [(f"{prefix}{n}_proj.{_FUSED[rest]}", t) for n, t in zip("qkv", _split3(tensor))]
            if rest.startswith("out_proj."):
                out = "out_proj." if kind == "clip_attn" else "o_proj."
                return kind, [(prefix + out + rest[len("out_proj."):], tensor.clone())]
        if kind == "mlp":
            layer = re.fullmatch(r"layers\.(\d+)\.(weight|bias)", rest)
            if layer:
                return kind, [(f"{prefix}layer{int(layer[1]) + 1}.{layer[2]}", tensor.clone())]
        return "unmapped", None
    return "unmapped", None


def detector_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The image detector's tensors keyed as in Meta's ``Sam3Image``, and the number of tracker tensors.

    With any ``detector.`` key (the released video checkpoint) those are the detector and ``tracker.``
    keys are counted and skipped; anything else stays and is reported as unmapped. Without one (a
    checkpoint of Meta's trainer), every key is the image model's.
    """
    if not any(k.startswith(DETECTOR_PREFIX) for k in state):
        return dict(state), 0
    tracker = sum(k.startswith(TRACKER_PREFIX) for k in state)
    detector = {(k[len(DETECTOR_PREFIX):] if k.startswith(DETECTOR_PREFIX) else k): v
                for k, v in state.items() if not k.startswith(TRACKER_PREFIX)}
    return detector, tracker


def expected_shapes(config: Sam3Config) -> dict[str, tuple[int, ...]]:
    """transformers' ``Sam3Model`` state-dict keys and shapes for ``config`` (built without memory)."""
    with torch.device("meta"):
        model = Sam3Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_state(state: Mapping[str, torch.Tensor], config: Sam3Config, *, progress: bool = False) -> Conversion:
    """Meta's state dict (prefixed or not, see :func:`detector_keys`) -> transformers' keys for ``config``.

    Raises :class:`MetaCheckpointError` naming every Meta key without a rule, every transformers key
    left unfilled, every converted key the config has no slot for and every shape mismatch.
    """
    detector, tracker = detector_keys(state)
    result = Conversion(state={}, tracker_keys=tracker)
    unmapped: list[str] = []
    total = sum(v.numel() * v.element_size() for v in detector.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
        for key in sorted(detector):
            tensor = detector[key]
            kind, mapped = _map_one(key, tensor)
            if kind == "unmapped":
                unmapped.append(key)
            elif kind == "tracker":
                result.tracker_keys += 1
            elif kind == "drop":
                result.dropped[mapped] += 1
            else:
                result.state.update(mapped)
            bar.update(tensor.numel() * tensor.element_size())

    expected = expected_shapes(config)
    unfilled = sorted(set(expected) - set(result.state))
    extra = sorted(set(result.state) - set(expected))
    misshapen = sorted(f"{k} (converted {tuple(result.state[k].shape)}, config {expected[k]})"
                       for k in set(expected) & set(result.state) if tuple(result.state[k].shape) != expected[k])
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} Meta key(s) without a conversion rule: {listing(unmapped, 10)}")
    if unfilled:
        problems.append(f"{len(unfilled)} transformers key(s) left unfilled: {listing(unfilled, 10)}")
    if extra:
        problems.append(f"{len(extra)} converted key(s) the config has no slot for: {listing(extra, 10)}")
    if misshapen:
        problems.append(f"{len(misshapen)} shape mismatch(es): {listing(misshapen, 10)}")
    if problems:
        raise MetaCheckpointError(
            "The Meta checkpoint does not convert to this SAM 3 config: " + "; ".join(problems) + ". Check that the "
            "file is Meta's SAM 3 checkpoint and that --config gives its sizes (default: the released ones)."
        )
    return result


def load_meta_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped where the file allows; unwraps ``{"model": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Meta checkpoint {path} does not exist (expected Meta's sam3.pt).")
    try:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # files from before torch's zip format cannot be memory-mapped
            log.info("%s cannot be memory-mapped (%s); reading it whole.", path, err)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MetaCheckpointError(
            f"{path} is not a readable PyTorch checkpoint, or holds objects other than tensors that "
            "torch.load(weights_only=True) refuses to unpickle. If it is a checkpoint you trust, save its state "
            "dict alone: torch.save({'model': torch.load(path, weights_only=False)['model']}, 'weights.pt')."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise MetaCheckpointError(f"{path} is not a readable PyTorch checkpoint ({err}).") from err
    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise MetaCheckpointError(f"{path} is not a state dict of tensors (nor one under 'model').")
    return dict(raw)


def read_config(path: str | Path | None) -> Sam3Config:
    """A ``Sam3Config`` from a JSON file (plain, or the video layout's ``detector_config``); the released
    sizes when None. Meta's ViT LayerNorm eps (1e-5) is set either way."""
    if path is None:
        config = preset_config("sam3")
    else:
        raw = json.loads(Path(path).read_text())
        raw = raw.get("detector_config") or raw
        if raw.get("model_type") not in (None, "sam3"):
            raise ValueError(f"{path} describes a {raw.get('model_type')!r} model, not SAM 3 ('sam3').")
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "architectures")}
        config = Sam3Config(**raw)
    return with_meta_constants(config)


def with_meta_constants(config: Sam3Config) -> Sam3Config:
    """A copy of ``config`` with the architecture constants of Meta's model that transformers' config
    leaves at other defaults: the ViT's LayerNorm eps."""
    config = copy.deepcopy(config)
    backbone = config.vision_config.backbone_config
    if backbone.layer_norm_eps != META_VIT_LAYER_NORM_EPS:
        log.info("ViT layer_norm_eps %g -> %g (Meta's value).", backbone.layer_norm_eps, META_VIT_LAYER_NORM_EPS)
        backbone.layer_norm_eps = META_VIT_LAYER_NORM_EPS
    return config


def write_directory(conversion: Conversion, config: Sam3Config, output: str | Path) -> Path:
    """config.json + model.safetensors (+ the CLIP tokenizer when open_clip_torch is installed)."""
    output = Path(output)
    stale = sorted(p.name for p in output.glob("*.safetensors*") if p.name != "model.safetensors")
    if stale:
        raise FileExistsError(f"{output} already holds other weights ({', '.join(stale)}): choose an empty directory.")
    output.mkdir(parents=True, exist_ok=True)
    config.architectures = ["Sam3Model"]
    config.save_pretrained(str(output))
    save_file(conversion.state, str(output / "model.safetensors"), metadata={"format": "pt"})
    try:
        Sam3Tokenizer.from_open_clip().save_pretrained(output)
    except FileNotFoundError as err:
        log.warning("No tokenizer files written to %s (%s); loaders fall back to open_clip's vocabulary.", output, err)
    return output


def convert_checkpoint(input_path: str | Path, output: str | Path, *, config: Sam3Config | str | Path | None = None,
                       progress: bool = True) -> Conversion:
    """Meta's ``sam3.pt`` -> an HF-layout directory. ``config``: a ``Sam3Config``, a JSON path, or None
    for the released sizes."""
    config = with_meta_constants(config) if isinstance(config, Sam3Config) else read_config(config)
    conversion = convert_state(load_meta_state(input_path), config, progress=progress)
    write_directory(conversion, config, output)
    return conversion
