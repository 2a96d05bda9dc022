"""The LightningModule in-process: optimiser groups, schedules, overfitting a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

from sam3_train.data import Batch
from sam3_train.lit import Sam3LitModule, eval_targets
from sam3_train.optim import LRSchedule, param_groups, schedule_factor


def test_param_groups_follow_sam3_fine_tuning():
    module = Sam3LitModule(preset="tiny")
    groups = param_groups(module.detector, lr=8e-5, lr_vision=2.5e-5, lr_text=5e-6, layer_decay=0.9, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = {n: p for n, p in module.detector.named_parameters() if p.requires_grad}
    assert len(by_param) == len(named)  # every trainable parameter in exactly one group

    def group(name):
        return by_param[id(named[name])]

    layers = module.detector.config.vision_config.backbone_config.num_hidden_layers  # 4
    # ViT block i sits at depth i + 1; lr = 2.5e-5 * 0.9 ** (layers + 1 - depth)
    assert group("vision_encoder.backbone.layers.0.mlp.fc1.weight")["lr"] == pytest.approx(2.5e-5 * 0.9 ** layers)
    assert group("vision_encoder.backbone.layers.3.mlp.fc1.weight")["lr"] == pytest.approx(2.5e-5 * 0.9)
    assert group("vision_encoder.neck.fpn_layers.0.proj1.weight")["lr"] == pytest.approx(2.5e-5)
    assert group("vision_encoder.backbone.embeddings.patch_embeddings.projection.weight")["lr"] == pytest.approx(
        2.5e-5 * 0.9 ** (layers + 1))
    # Meta's *pos_embed* override: the position embedding trains at the full vision rate.
    assert group("vision_encoder.backbone.embeddings.position_embeddings")["lr"] == pytest.approx(2.5e-5)
    assert group("vision_encoder.backbone.layer_norm.weight")["lr"] == pytest.approx(2.5e-5 * 0.9 ** (layers + 1))
    assert group("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight")["lr"] == 5e-6
    assert group("detr_decoder.layers.0.mlp.fc1.weight")["lr"] == 8e-5
    # As Meta's configs: no weight decay on *bias* and torch.nn.LayerNorm parameters only.
    assert group("detr_decoder.layers.0.mlp.fc1.weight")["weight_decay"] == 0.1
    assert group("detr_decoder.layers.0.mlp.fc1.bias")["weight_decay"] == 0.0
    assert group("detr_decoder.layers.0.mlp_layer_norm.weight")["weight_decay"] == 0.0
    assert group("vision_encoder.backbone.layer_norm.weight")["weight_decay"] == 0.0
    assert group("detr_decoder.query_embed.weight")["weight_decay"] == 0.1
    assert group("text_encoder.text_model.embeddings.token_embedding.weight")["weight_decay"] == 0.1
    assert group("vision_encoder.backbone.embeddings.position_embeddings")["weight_decay"] == 0.1
    assert group("mask_decoder.pixel_decoder.norms.0.weight")["weight_decay"] == 0.1  # a GroupNorm


def test_frozen_encoders_are_left_out_of_the_optimiser():
    module = Sam3LitModule(preset="tiny", freeze_vision=True, freeze_text=True)
    groups = param_groups(module.detector, lr=1, lr_vision=1, lr_text=1, layer_decay=1, weight_decay=0)
    names = {n for n, p in module.detector.named_parameters() if any(p is q for g in groups for q in g["params"])}
    assert names and not any(n.startswith(("vision_encoder.", "text_encoder.", "text_projection.")) for n in names)


def test_inverse_sqrt_schedule_matches_meta_formula():
    # Meta: lr / sqrt((step + timescale - warmup) / timescale) after warm-up, times the cool-down ramp.
    kw = dict(total_steps=1000, kind="inverse_sqrt", warmup_steps=10, cooldown_steps=100, timescale=20)
    assert schedule_factor(4, **kw) == pytest.approx(5 / 10)  # warm-up (step + 1) / warmup
    assert schedule_factor(10, **kw) == pytest.approx(1.0)
    assert schedule_factor(30, **kw) == pytest.approx(1 / math.sqrt((30 + 20 - 10) / 20))
    assert schedule_factor(950, **kw) == pytest.approx(1 / math.sqrt((950 + 10) / 20) * 50 / 100)
    assert schedule_factor(1000, **kw) == 0.0
    assert schedule_factor(500, total_steps=1000, kind="cosine", warmup_steps=0) == pytest.approx(0.5)


def _hand_factor(step, *, total, kind, warmup=0, cooldown=0, timescale=None):
    """The schedule written out per case: warm-up ramp (step + 1) / warmup, then the kind's curve."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else None
    if kind == "constant":
        factor = 1.0
    elif kind == "cosine":
        progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # inverse_sqrt, then the linear cool-down over the last `cooldown` steps
        timescale = timescale or max(warmup, 1)
        factor = 1.0 / math.sqrt((step + timescale - warmup) / timescale) if step > warmup else 1.0
        if cooldown:
            factor *= max(0.0, min(1.0, (total - step) / cooldown))
    return factor * ramp if ramp is not None else factor


@pytest.mark.parametrize("settings", [
    dict(kind="constant", warmup_steps=7),
    dict(kind="cosine", warmup_steps=0),
    dict(kind="cosine", warmup_steps=10),
    dict(kind="inverse_sqrt", warmup_steps=10, cooldown_steps=25, timescale=20),
    dict(kind="inverse_sqrt", warmup_steps=0, cooldown_steps=0),
], ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_lr_schedule_object_gives_the_formula_at_every_step_and_follows_a_new_length(settings):
    """LRSchedule(step) equals the function it replaced inside a functools.partial, bit for bit, and the
    hand-written curve; setting ``total_steps`` moves the curve's end (TimeBudget's public handle)."""
    from functools import partial

    schedule = LRSchedule(total_steps=100, **settings)
    before = partial(schedule_factor, total_steps=100, **settings)  # the factor lit.py built before
    hand = dict(kind=settings["kind"], warmup=settings["warmup_steps"], cooldown=settings.get("cooldown_steps", 0),
                timescale=settings.get("timescale"))
    for step in range(0, 121):
        assert schedule(step) == before(step)
        assert schedule(step) == pytest.approx(_hand_factor(step, total=100, **hand), rel=1e-12, abs=0)
    schedule.total_steps = 60
    for step in range(0, 70):
        assert schedule(step) == schedule_factor(step, total_steps=60, **settings)
        assert schedule(step) == pytest.approx(_hand_factor(step, total=60, **hand), rel=1e-12, abs=0)
    if settings["kind"] == "cosine":
        assert schedule(60) == 0.0 and schedule(30 + settings["warmup_steps"] // 2) == pytest.approx(0.5)


def test_lr_schedule_keeps_its_settings_out_of_the_scheduler_state():
    """As with the partial it replaced, LambdaLR's state_dict holds no schedule settings: a resumed run
    takes its length from its own config (TimeBudget keeps its plan in its own state)."""
    from torch.optim.lr_scheduler import LambdaLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LambdaLR(optimizer, LRSchedule(total_steps=100, kind="cosine"))
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [{}] and state["last_epoch"] == 5
    fresh = LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), LRSchedule(total_steps=400, kind="cosine"))
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total_steps == 400


def test_eval_targets_are_pixels_in_the_content_frame():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    batch = Batch(images=torch.zeros(1, 3, 8, 8), image_sizes=torch.tensor([[4, 8]]), pair_image=torch.tensor([0]),
                  input_ids=torch.zeros(1, 32, dtype=torch.long), attention_mask=torch.ones(1, 32, dtype=torch.long),
                  targets=[{"boxes": torch.tensor([[0.5, 0.25, 0.5, 0.25]]), "masks": masks, "exhaustive": True}])
    (t,) = eval_targets(batch)
    assert t["masks"].shape == (1, 4, 8) and t["masks"].sum() == 8
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 1.0, 6.0, 3.0]]))
    assert t["exhaustive"] is True


def test_overfits_a_fixed_batch_of_eight_images(shapes_batch):
    """Loss on 8 fixed images falls by 40% in 50 steps; its box term by half, its presence term by 90%.

    Fails if gradients, matching or the weighting were wrong (the model would not fit what it sees).
    """
    torch.manual_seed(0)
    module = Sam3LitModule(preset="tiny", model_overrides={"dropout": 0.0})  # the default init (Meta's)
    optimizer = torch.optim.AdamW(module.detector.parameters(), lr=1e-3)
    module.train()
    history = []
    for _ in range(50):
        outputs = module.detector(shapes_batch)
        terms = module.criterion(outputs, shapes_batch.targets)
        loss = module.criterion.weighted_total(terms, num_pairs=shapes_batch.num_pairs)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.detector.parameters(), 1.0)
        optimizer.step()
        history.append({"loss": loss.item(), **{k: v.item() for k, v in terms.items()}})

    def mean(key, part):
        values = [h[key] for h in part]
        return sum(values) / len(values)

    assert all(math.isfinite(h["loss"]) for h in history)
    first, last = history[:1], history[-5:]
    # The total falls to about a third of its start within 50 steps (0.25-0.37 measured over seeds and
    # thread counts; the semantic terms learn slowly), and where it lands depends on float summation
    # order (threads): the margins leave room for that.
    assert mean("loss", last) < 0.6 * mean("loss", first), [round(h["loss"]) for h in history]
    # Meta's init starts each query at its own reference box (the box head's last layer is zero), so the
    # box term starts low (0.40 here; 1.49 from Xavier's) and falls less far: to 0.34 of its start
    # (0.31 on two threads; 0.19 and 0.21 with seeds 1 and 2). Halving it shows the boxes fit.
    assert mean("loss_bbox", last) < 0.5 * mean("loss_bbox", first)
    assert mean("loss_presence", last) < 0.1 * mean("loss_presence", first)
