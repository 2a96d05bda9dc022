"""LoRA adapters on the SAM 3 detector through peft: settings, injection, base fingerprint, merge.

    settings = LoraSettings(rank=16, alpha=32, target_modules=["vit_attention", "detr_decoder_attention"])
    base = base_fingerprint(detector)       # before the adapters: names the base they belong to
    apply_lora(detector, settings)          # in place; still a Sam3Detector with its pair-batched forward
    ...                                     # train: only adapters (and modules_to_save) require grad
    merge_lora(detector).save_pretrained("merged/")   # plain HF layout: transformers.Sam3Model loads it

Adapter checkpoints (``Sam3LitModule`` calls these from its checkpoint hooks): ``save_adapters`` keeps
only the trained tensors and records the base; ``check_adapter_base`` refuses adapters of another
base; ``adapter_load_keys`` lets a state dict omit the base's tensors.

Where adapters attach: ``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a
``peft`` LoRA layer that keeps the original as ``base_layer`` and adds ``lora_A`` ([r, in]) and
``lora_B`` ([out, r], zero at the start) with output ``base(x) + alpha / r * B(A(dropout(x)))``. So
a targeted ``q_proj.weight`` is keyed ``q_proj.base_layer.weight`` while adapted, beside
``q_proj.lora_A.default.weight``; every other key is the base model's. The base weights are loaded
before injection (``Sam3Detector.from_pretrained``), and ``merge_lora`` folds the adapters back and
restores the original keys. peft freezes every base parameter; ``modules_to_save`` then unfreezes
whole modules in place (the heads, say): they train in full and are saved with the adapters. (peft's
own ``modules_to_save`` trains a copy beside the original instead; one adapter per model needs none.)

Targets are regular expressions over full module names (``re.fullmatch``, as peft matches a string),
or these names (``TARGETS``), e.g. ``[vit_attention, detr_encoder_attention, detr_decoder_attention]``:
    vit_attention, vit_mlp                      ViT blocks' q/k/v/o projections; fc1/fc2
    text_attention, text_mlp                    CLIP text encoder blocks
    detr_encoder_attention, detr_encoder_mlp    fusion encoder self- and prompt cross-attention; FFN
    detr_decoder_attention, detr_decoder_mlp    decoder self-, text- and image cross-attention; FFN
    heads                                       box and presence heads, the scoring MLPs, the mask
                                                decoder's prompt cross-attention
A pattern that matches no module fails, naming it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from sam3_train.model.checkpoint_io import listing
from sam3_train.model.detector import Sam3Detector

_QKVO = r"(q|k|v|o)_proj"
TARGETS = {
    "vit_attention": rf"vision_encoder\.backbone\.layers\.\d+\.attention\.{_QKVO}",
    "vit_mlp": r"vision_encoder\.backbone\.layers\.\d+\.mlp\.fc[12]",
    "text_attention": r"text_encoder\.text_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj",
    "text_mlp": r"text_encoder\.text_model\.encoder\.layers\.\d+\.mlp\.fc[12]",
    "detr_encoder_attention": rf"detr_encoder\.layers\.\d+\.(self_attn|cross_attn)\.{_QKVO}",
    "detr_encoder_mlp": r"detr_encoder\.layers\.\d+\.mlp\.fc[12]",
    "detr_decoder_attention": rf"detr_decoder\.layers\.\d+\.(self_attn|text_cross_attn|vision_cross_attn)\.{_QKVO}",
    "detr_decoder_mlp": r"detr_decoder\.layers\.\d+\.mlp\.fc[12]",
    "heads": (r"detr_decoder\.(box_head|presence_head)\.layer\d|dot_product_scoring\.(text_mlp\.layer\d|text_proj"
              rf"|query_proj)|mask_decoder\.prompt_cross_attn\.{_QKVO}"),
}
ADAPTER = "default"  # peft's adapter name; one adapter per model


@dataclass(kw_only=True)
class LoraSettings:
    """What LoRA adapts and how (``Sam3LitModule(lora=...)``; YAML ``model.lora: {rank: 16, ...}``).

    Args:
        rank: r, the adapters' inner width.
        alpha: scaling numerator: the update is ``alpha / rank * B A``.
        dropout: dropout on the adapters' input, in training.
        target_modules: module-name regexes or ``TARGETS`` names whose linear layers get adapters.
        modules_to_save: module-name regexes or ``TARGETS`` names trained in full beside the adapters
            (and saved with them), e.g. ``detr_decoder\\.box_head``.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["vit_attention", "detr_encoder_attention", "detr_decoder_attention"])
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be at least 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError(f"model.lora.target_modules is empty: name what to adapt ({', '.join(TARGETS)} or regexes).")
        for pattern in [*self.target_modules, *self.modules_to_save]:
            try:
                re.compile(expand(pattern))
            except re.error as exn:
                raise ValueError(f"model.lora: {pattern!r} is not a valid regular expression ({exn}).") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (hyper-parameters: a checkpoint holding it loads with weights_only)."""
        return asdict(self)


def expand(pattern: str) -> str:
    """A ``TARGETS`` name's regex, or ``pattern`` itself."""
    return TARGETS.get(pattern, pattern)


def _matching(detector: torch.nn.Module, pattern: str, kind: str) -> list[str]:
    regex = re.compile(expand(pattern))
    names = [n for n, _ in detector.named_modules() if n and regex.fullmatch(n)]
    if not names:
        raise ValueError(
            f"model.lora.{kind}: {pattern!r} matches no module of the detector (patterns match full module names, "
            f"e.g. 'detr_decoder.layers.0.self_attn.q_proj'; named groups: {', '.join(TARGETS)})."
        )
    return names


def apply_lora(detector: Sam3Detector, settings: LoraSettings) -> None:
    """Inject LoRA adapters into ``detector`` in place; afterwards only adapters and ``modules_to_save``
    require grad (never the weights SAM 3's forward does not read, see ``freeze_unused_parameters``)."""
    for pattern in settings.target_modules:
        _matching(detector, pattern, "target_modules")
    saved = [name for pattern in settings.modules_to_save for name in _matching(detector, pattern, "modules_to_save")]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules="|".join(f"(?:{expand(p)})" for p in settings.target_modules))
    inject_adapter_in_model(config, detector, adapter_name=ADAPTER)  # freezes every base parameter
    for name in saved:
        detector.get_submodule(name).requires_grad_(True)
    detector.freeze_unused_parameters()


def is_adapted(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@torch.no_grad()
def merge_lora(detector: Sam3Detector) -> Sam3Detector:
    """Fold every adapter into its base weight (peft's ``merge``) and put the base layers back in place:
    the detector's keys are the base model's again. In place; returns ``detector``."""
    tuners = [(n, m) for n, m in detector.named_modules() if isinstance(m, BaseTunerLayer)]
    tuners = [(n, m) for n, m in tuners if not any(n.startswith(f"{o}.") for o, _ in tuners)]  # outermost only
    for name, layer in tuners:
        layer.merge(safe_merge=True)  # safe: a non-finite merged weight raises instead of being written
        parent, _, child = name.rpartition(".")
        setattr(detector.get_submodule(parent) if parent else detector, child, layer.get_base_layer())
    if hasattr(detector, "peft_config"):
        del detector.peft_config
    return detector


def base_fingerprint(module: torch.nn.Module, *, samples: int = 64) -> str:
    """A cheap identity of a model's weights: sha256 over every tensor's name, shape, dtype and
    ``samples`` evenly spaced values (16 hex digits). Equal bases give equal fingerprints on any
    device; a different checkpoint differs with near certainty. Call it before ``apply_lora``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples].to("cpu", copy=True).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ checkpoints
# An adapter checkpoint holds only the trained tensors (adapters, modules_to_save) and, under this key,
# the base they were trained on: {"pretrained": folder or None, "base_fingerprint": base_fingerprint(...)}.
CHECKPOINT_KEY = "sam3_lora"


def save_adapters(checkpoint: dict[str, Any], *, trained: set[str], pretrained: str | None,
                  fingerprint: str | None) -> None:
    """Make a (Lightning) checkpoint an adapter checkpoint, in place: ``state_dict`` keeps the ``trained``
    keys only and ``CHECKPOINT_KEY`` names the base (its ``pretrained`` folder and ``fingerprint``). So does
    the copy of the trained weights that weight averaging (``sam3_train.ema``) keeps beside its average."""
    for key in ("state_dict", "current_model_state"):
        if key in checkpoint:
            checkpoint[key] = {k: v for k, v in checkpoint[key].items() if k in trained}
    checkpoint[CHECKPOINT_KEY] = {"pretrained": pretrained, "base_fingerprint": fingerprint}


def check_adapter_base(checkpoint: dict[str, Any], *, fingerprint: str | None, pretrained: str | None,
                       source: str = "The checkpoint") -> None:
    """Refuse a checkpoint that holds no adapters, or adapters trained on another base than the one whose
    ``fingerprint`` (built from ``pretrained``) they are about to be loaded on. ``source`` begins the message."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise KeyError(f"{source} holds a full model, not LoRA adapters (model.lora is set): load it without "
                       "model.lora, or pass an adapter checkpoint written by a model.lora run.")
    if meta["base_fingerprint"] != fingerprint:
        raise ValueError(
            f"{source} holds LoRA adapters trained on another base model: fingerprint {meta['base_fingerprint']} "
            f"(model.pretrained {meta['pretrained']!r}), this run's base is {fingerprint} "
            f"(model.pretrained {pretrained!r}). Point model.pretrained at the checkpoint the "
            "adapters were trained on" + ("" if meta["pretrained"] else
            "; a randomly initialised base is rebuilt only by the same preset, seed and settings") + "."
        )


def adapter_load_keys(keys: Any, *, trained: set[str], strict: bool) -> Any:
    """The result of ``load_state_dict(adapters, strict=False)`` on an adapted model, with the base's own
    keys (not ``trained``: they come from the base model) no longer missing; ``strict`` refuses a missing
    trained tensor or an unexpected key. ``keys``: torch's ``_IncompatibleKeys``; returns the same type."""
    keys = type(keys)([k for k in keys.missing_keys if k in trained], keys.unexpected_keys)
    if strict and (keys.missing_keys or keys.unexpected_keys):
        raise RuntimeError(f"The LoRA state dict does not fit the model: missing {listing(keys.missing_keys)}; "
                           f"unexpected {listing(keys.unexpected_keys)}.")
    return keys
