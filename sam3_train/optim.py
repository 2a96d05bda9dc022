"""Optimiser parameter groups and learning-rate schedules as in SAM 3's fine-tuning configs.

Groups: the vision encoder (its own learning rate, decayed layer by layer towards the input, as
Meta's ``layer_decay_param_modifier`` with its ``*pos_embed*`` override: the position embedding
and the neck train at the full vision rate), the text encoder with the projection of its tokens to
the model width (``text_projection``, Meta's ``language_backbone.resizer``; their own, small
learning rate) and everything else (DETR encoder/decoder, heads). As in Meta's configs, only biases
(``*bias*``) and ``torch.nn.LayerNorm`` parameters are exempt from weight decay; embeddings and
other norms decay.

Schedules return a multiplier of each group's base learning rate for a step:
- ``inverse_sqrt`` (Meta's ``InverseSquareRootParamScheduler``): linear warm-up, then
  1 / sqrt((step + timescale - warmup) / timescale), times a linear cool-down over the last steps;
- ``cosine``: linear warm-up then half a cosine to zero;
- ``constant``: linear warm-up then 1.

:class:`LRSchedule` is the ``LambdaLR`` factor built from these settings; its ``total_steps`` is a
public attribute, which ``callbacks.TimeBudget`` sets when it plans the run's length.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from torch import nn

Schedule = Literal["inverse_sqrt", "cosine", "constant"]
_VIT_LAYER = re.compile(r"^vision_encoder\.backbone\.layers\.(\d+)\.")


# Meta's ``backbone.language_backbone.*``: CLIP and the resizer that projects its tokens to d_model.
_TEXT = ("text_encoder.", "text_projection.")
_FULL_VISION_RATE = re.compile(r"^vision_encoder\.backbone\.embeddings\.position_embeddings$")  # Meta: *pos_embed*


def _layer_norm_parameters(model: nn.Module) -> set[str]:
    """Names of parameters owned by a ``torch.nn.LayerNorm`` (Meta matches the class exactly)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if type(module) is nn.LayerNorm
            for name, _ in module.named_parameters(recurse=False)}


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    lr_vision: float,
    lr_text: float,
    layer_decay: float,
    weight_decay: float,
) -> list[dict]:
    """AdamW groups keyed by (part, vision depth, decay). Frozen parameters are left out.

    Vision depth: the patch embedding and pre-norm 0, ViT block i at i + 1, the position embedding
    and the neck at num_layers + 1; the learning rate is ``lr_vision * layer_decay ** (num_layers + 1 -
    depth)``.
    """
    vit_layers = sum(1 for n, _ in model.named_modules() if re.fullmatch(r"vision_encoder\.backbone\.layers\.\d+", n))
    layer_norms = _layer_norm_parameters(model)
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("vision_encoder."):
            match = _VIT_LAYER.match(name)
            if match:
                depth = int(match.group(1)) + 1
            elif name.startswith("vision_encoder.backbone.") and not _FULL_VISION_RATE.match(name):
                depth = 0
            else:
                depth = vit_layers + 1
            part, rate = f"vision{depth}", lr_vision * layer_decay ** (vit_layers + 1 - depth)
        elif name.startswith(_TEXT):
            part, rate = "text", lr_text
        else:
            part, rate = "transformer", lr
        decay = 0.0 if "bias" in name or name in layer_norms else weight_decay
        key = (part, decay)
        group = groups.setdefault(key, {"params": [], "lr": rate, "weight_decay": decay, "name": f"{part}/wd{decay:g}"})
        group["params"].append(param)
    return list(groups.values())


def schedule_factor(
    step: int,
    *,
    total_steps: int,
    kind: Schedule = "inverse_sqrt",
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    timescale: int | None = None,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    factor = 1.0
    if kind == "inverse_sqrt":
        timescale = timescale or max(warmup_steps, 1)
        if step > warmup_steps:
            factor /= math.sqrt((step + timescale - warmup_steps) / timescale)
        if cooldown_steps:
            factor *= max(0.0, min(1.0, (total_steps - step) / cooldown_steps))
    elif kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        factor = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    elif kind != "constant":
        raise ValueError(f"Unknown schedule {kind!r}: inverse_sqrt, cosine or constant.")
    if warmup_steps:
        factor *= min(1.0, (step + 1) / warmup_steps)
    return factor


class LRSchedule:
    """``schedule(step)``: :func:`schedule_factor` at ``step`` with these settings, for ``LambdaLR``.

    ``total_steps`` is public and may change during a run (``callbacks.TimeBudget`` sets it to the
    planned step count): the next call follows the new length::

        scheduler = LambdaLR(optimizer, LRSchedule(total_steps=40_000, kind="cosine", warmup_steps=1_000))
    """

    # ``LambdaLR.state_dict`` saves a callable's ``__dict__``, and ``load_state_dict`` restores it. The
    # settings live in slots, so that ``__dict__`` stays empty: a resumed run's schedule comes from its
    # config (a new ``max_steps`` included), as it did when the factor was a ``functools.partial``;
    # TimeBudget keeps its own plan in its own state.
    __slots__ = ("total_steps", "kind", "warmup_steps", "cooldown_steps", "timescale", "__dict__")

    def __init__(
        self,
        *,
        total_steps: int,
        kind: Schedule = "inverse_sqrt",
        warmup_steps: int = 0,
        cooldown_steps: int = 0,
        timescale: int | None = None,
    ):
        self.total_steps, self.kind = total_steps, kind
        self.warmup_steps, self.cooldown_steps, self.timescale = warmup_steps, cooldown_steps, timescale

    def __call__(self, step: int) -> float:
        return schedule_factor(step, total_steps=self.total_steps, kind=self.kind, warmup_steps=self.warmup_steps,
                               cooldown_steps=self.cooldown_steps, timescale=self.timescale)

    def __repr__(self) -> str:
        return (f"LRSchedule(total_steps={self.total_steps}, kind={self.kind!r}, warmup_steps={self.warmup_steps}, "
                f"cooldown_steps={self.cooldown_steps}, timescale={self.timescale})")
