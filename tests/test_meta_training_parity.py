"""One training step against Meta's (PyPI ``sam3``): loss terms, every gradient, the optimiser's
groups, gradient clipping and one AdamW step, from the same weights on the same batch.

Meta's side is its ``Sam3Image`` at the tiny sizes (tests/meta_reference.py) in training mode, its
``Sam3LossWrapper`` as the released segmentation fine-tuning config sets it up
(``roboflow_v100_full_ft_100_images.yaml``: matcher costs 2 / 5 / 2, one-to-many matcher alpha
0.3, threshold 0.4, top 4, o2m weight 2, class 20 with pos_weight 10 padded to 200 queries,
presence 20, L1 5, GIoU 2, masks 200 / 10 at full resolution, semantic 20 / 30 with focal alpha 0.6
and gamma 2, the loss times sqrt(pairs)) and its optimiser built by its own ``construct_optimizer``
from the config's ``optim`` block. Ours is ``Sam3LitModule`` loading the converted checkpoint,
``Sam3Criterion`` set to the same values, and the module's ``configure_optimizers``.

The batch: two images, four (image, phrase) pairs: two text-only pairs with two instances each, a
pair with text and exemplar boxes (one positive, one negative), and a negative pair (no instance).
Dropout and drop path are 0 on both sides; both mask losses run at full resolution, so nothing is
random. Target boxes lie near some one-to-many predictions so the one-to-many matcher assigns
queries (and no query two targets: see ``test_a_query_matched_to_two_targets``).

Tolerances (measured values in the tests' docstrings). Loss terms to 1e-4, the total to 1e-5.
Gradients: each parameter's to 1e-4 of its largest entry. The key-projection biases of softmax
attention (outside the RoPE ViT) and the box-RPB's output bias have a gradient of exactly 0 in
exact arithmetic (they add one constant to every logit of a softmax row); float32 leaves noise
there, on both sides, which is held under 1e-6 of the model's largest gradient entry. AdamW: from
the same gradients every parameter moves alike to float32 resolution; from each side's own
gradients too, except that AdamW's first step moves an entry by lr x g / (|g| + eps), about
lr x sign(g), so an entry whose gradient is float noise (the zero ones above, and entries where the
two gradients differ by more than 1e-3 of their value) may move by up to 2 lr more on one side.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import import_meta

for _module in ("sam3.model.sam3_image", "hydra", "fvcore"):  # Meta's model; its optimiser code imports the others
    import_meta(_module)  # skips without them, fails under CI

from lightning.pytorch.plugins.precision import Precision  # noqa: E402
from meta_reference import (  # noqa: E402
    build_meta_image_model, cpu_workarounds, focal_loss_on_cpu, meta_checkpoint, meta_datapoint, meta_find_target,
    meta_loss, meta_matcher, meta_optimizer, meta_tensors_as_ours, randomize_,
)
from sam3.model.model_misc import SAM3Output  # noqa: E402

from sam3_train.data import Batch  # noqa: E402
from sam3_train.lit import Sam3LitModule  # noqa: E402
from sam3_train.losses import PackedTargets, Sam3Criterion  # noqa: E402
from sam3_train.losses.matcher import MatchIndices  # noqa: E402
from sam3_train.losses.terms import align_loss  # noqa: E402
from sam3_train.model import preset_config  # noqa: E402
from sam3_train.model.meta_checkpoint import convert_checkpoint  # noqa: E402

CONFIG = preset_config("tiny", text_config={"projection_dim": 512}, dropout=0.0)  # as tests/test_meta_parity.py
# The config's optimiser values (its scratch.lr_* x lr_scale 0.1, lrd_vision_backbone, wd).
OPTIM = dict(lr=8e-5, lr_vision=2.5e-5, lr_text=5e-6, layer_decay=0.9, weight_decay=0.1)
# Our criterion at the config's values (Meta's name in the comment where it differs).
CRITERION = dict(
    weight_align=20.0,  # IABCEMdetr loss_ce
    weight_presence=20.0,  # IABCEMdetr presence_loss
    weight_bbox=5.0, weight_giou=2.0, weight_mask=200.0, weight_dice=10.0,
    weight_semantic=20.0, weight_semantic_dice=30.0,  # SemanticSegCriterion loss_semantic_seg / _dice
    o2m_weight=2.0, o2m_matcher_on_aux=False, scale_by_sqrt_pairs=True,
    align_pos_weight=10.0, align_alpha=0.25, align_gamma=2.0, align_min_target=0.01, pad_num_queries=200,
    presence_alpha=0.5, mask_focal_alpha=0.25, mask_focal_gamma=2.0,
    num_points=None,  # Masks without num_sample_points: full resolution, no random points
    semantic_focal_alpha=0.6, semantic_focal_gamma=2.0,
    semantic_full_resolution=True,  # SemanticSegCriterion(downsample=False)
)
# Our term -> Meta's (suffixes: ours _aux{i}, _o2m; Meta's _aux_{i}, _o2m).
TERMS = {"align": "loss_ce", "presence": "presence_loss", "bbox": "loss_bbox", "giou": "loss_giou",
         "mask": "loss_mask", "dice": "loss_dice", "semantic": "loss_semantic_seg",
         "semantic_dice": "loss_semantic_dice"}
# Gradients that are 0 in exact arithmetic (softmax shift invariance); the ViT's keys are rotated by
# RoPE, so their bias does not shift a row by a constant.
ZERO_IN_EXACT_ARITHMETIC = re.compile(
    r"^(?!vision_encoder\.).*\.k_proj\.bias$|^detr_decoder\.box_rpb_embed_[xy]\.layer2\.bias$"
)
# Building both models and one forward and backward each take 10 to 30 s on 2 cores: the tests that
# share that fixture are slow; the rule test at the end is not.
SLOW = pytest.mark.slow
GRAD_RTOL = 1e-4
GRAD_FLOOR = 1e-6  # x the largest gradient entry of the model

PHRASES = ["red star", "blue circle", "small green square", "yellow triangle"]
PAIR_IMAGE = torch.tensor([0, 0, 1, 1])
EXEMPLAR_BOXES = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                               [[0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.1]],
                               [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                               [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
EXEMPLAR_LABELS = torch.tensor([[-1, -1], [1, 0], [-1, -1], [-1, -1]])  # 1 positive, 0 negative, -1 padding
TARGET_BOXES = [torch.tensor([[0.680, 0.350, 0.075, 0.040], [0.300, 0.630, 0.055, 0.035]]),
                torch.tensor([[0.565, 0.485, 0.045, 0.045]]),
                torch.zeros(0, 4),  # the negative pair
                torch.tensor([[0.640, 0.260, 0.090, 0.028], [0.240, 0.550, 0.075, 0.018]])]


def ellipse_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[n, 4] normalised cxcywh -> [n, size, size] bool: the ellipse inscribed in each box."""
    centres = (torch.arange(size) + 0.5) / size
    y, x = centres[None, :, None], centres[None, None, :]  # [1, size, 1], [1, 1, size]
    cx, cy, w, h = (v[:, None, None] for v in boxes.unbind(-1))  # each [n, 1, 1]
    return ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1


@dataclass
class Step:
    """Both sides after forward and backward on the same batch (gradients under our names)."""

    ours: Sam3LitModule
    meta: torch.nn.Module
    batch: Batch
    our_outputs: dict
    meta_outputs: dict
    our_terms: dict[str, torch.Tensor]
    meta_terms: dict[str, torch.Tensor]
    our_loss: torch.Tensor
    meta_loss: torch.Tensor
    our_grads: dict[str, torch.Tensor | None]
    meta_grads: dict[str, torch.Tensor | None]  # Meta's, mapped to our parameter names

    @property
    def largest_gradient(self) -> float:
        return max(float(g.abs().max()) for g in self.meta_grads.values() if g is not None and g.numel())


@pytest.fixture(scope="module")
def step(tmp_path_factory) -> Step:
    meta = randomize_(build_meta_image_model(CONFIG, matcher=meta_matcher()), seed=0).train()
    root = tmp_path_factory.mktemp("meta_train")
    torch.save(meta_checkpoint(meta), root / "sam3.pt")
    convert_checkpoint(root / "sam3.pt", root / "hf", config=CONFIG, progress=False)
    ours = Sam3LitModule(pretrained=str(root / "hf"), drop_path=0.0, criterion=Sam3Criterion(**CRITERION),
                         warmup_steps=0, **OPTIM).train()

    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    masks = [ellipse_masks(b, 224) for b in TARGET_BOXES]
    input_ids, attention_mask = ours.detector.tokenize(PHRASES)
    batch = Batch(images=images, image_sizes=torch.tensor([[224, 224]] * 2), pair_image=PAIR_IMAGE,
                  input_ids=input_ids, attention_mask=attention_mask, exemplar_boxes=EXEMPLAR_BOXES,
                  exemplar_labels=EXEMPLAR_LABELS, phrases=PHRASES,
                  targets=[{"boxes": b, "masks": m, "exhaustive": True} for b, m in zip(TARGET_BOXES, masks)])

    # Ours: what Sam3LitModule.training_step computes.
    our_outputs = ours.detector(batch)
    our_terms = ours.criterion(our_outputs, batch.targets)
    our_loss = ours.criterion.weighted_total(our_terms, num_pairs=batch.num_pairs)
    our_loss.backward()

    # Meta's: its trainer's _step (forward, back_convert of the targets, the loss) and backward.
    find_target = meta_find_target(TARGET_BOXES, masks, [True] * len(PHRASES))
    datapoint = meta_datapoint(images, PHRASES, PAIR_IMAGE, EXEMPLAR_BOXES, EXEMPLAR_LABELS, find_target)
    with cpu_workarounds(), focal_loss_on_cpu():
        stages = meta(datapoint)
        meta_terms = meta_loss()(stages, [meta.back_convert(find_target)])
    meta_total = meta_terms.pop("core_loss")
    meta_total.backward()
    with SAM3Output.iteration_mode(stages, SAM3Output.IterMode.LAST_STEP_PER_STAGE) as last:
        meta_outputs = last[-1]  # the dict the loss read, with the model's one-to-one match indices

    return Step(
        ours=ours, meta=meta, batch=batch, our_outputs=our_outputs, meta_outputs=meta_outputs,
        our_terms={k: v.detach() for k, v in our_terms.items()},
        meta_terms={k: v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in meta_terms.items()},
        our_loss=our_loss.detach(), meta_loss=meta_total.detach(),
        our_grads={n: None if p.grad is None else p.grad.clone() for n, p in ours.detector.named_parameters()},
        meta_grads=meta_tensors_as_ours(meta, CONFIG, {n: p.grad for n, p in meta.named_parameters()}),
    )


@contextlib.contextmanager
def restored(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters and gradients of ``modules`` as they were on entry, after the block."""
    saved = [(p, p.detach().clone(), None if p.grad is None else p.grad.clone())
             for m in modules for p in m.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad


def meta_term_name(ours: str) -> str:
    match = re.fullmatch(r"loss_(?P<term>[a-z_]+?)(?:_aux(?P<aux>\d+))?(?P<o2m>_o2m)?", ours)
    assert match, ours
    aux = f"_aux_{match['aux']}" if match["aux"] is not None else ""
    return TERMS[match["term"]] + aux + (match["o2m"] or "")


@SLOW
def test_loss_terms_and_total_match_meta(step):
    """Every named term (every layer, both halves, masks, semantic) to 1e-4 and the weighted total to
    1e-5 (measured: 1.3e-5 at most, the one-to-many GIoU of small boxes; 2e-7 for the total)."""
    assert len(step.our_terms) == 27  # 3 layers x (align, bbox, giou) x 2 halves + 3 presence + 4 mask + 2 semantic
    for name, value in step.our_terms.items():
        theirs = step.meta_terms[meta_term_name(name)]
        scale = CRITERION["o2m_weight"] if name.endswith("_o2m") else 1.0  # Meta's o2m terms come weighted
        assert math.isclose(float(value) * scale, float(theirs), rel_tol=1e-4), (name, value, theirs)
    # Meta's o2m halves have no presence term (it reports a zero); ours computes none.
    assert all(float(v) == 0 for k, v in step.meta_terms.items() if k.startswith("presence_loss") and "o2m" in k)
    assert math.isclose(float(step.our_loss), float(step.meta_loss), rel_tol=1e-5)
    # Not a degenerate batch: the one-to-many half has matches, boxes and masks.
    assert float(step.our_terms["loss_bbox_o2m"]) > 0 and float(step.our_terms["loss_mask_o2m"]) > 0


@SLOW
def test_matches_equal_meta_and_no_query_takes_two_targets(step):
    """The same assignments on both sides: one-to-one in every layer (Meta's model matches them),
    one-to-many on the final layer (Meta's quantile-based top 4 and our top 4 agree without ties)."""
    packed = PackedTargets.from_list(step.batch.targets)
    criterion = step.ours.criterion
    layers = [(step.our_outputs, step.meta_outputs)] + list(zip(step.our_outputs["aux_outputs"],
                                                                step.meta_outputs["aux_outputs"]))
    for mine, theirs in layers:
        got = criterion.matcher(mine, packed)
        pair, query, target = theirs["indices"]
        target = target if target is not None else torch.arange(len(packed.boxes))  # Meta: None = every box in order
        assert sorted(zip(*(t.tolist() for t in got))) == sorted(zip(pair.tolist(), query.tolist(), target.tolist()))
    o2m = {k[: -len("_o2m")]: v for k, v in step.meta_outputs.items() if k.endswith("_o2m")}
    theirs = meta_loss().o2m_matcher(o2m, step.meta.back_convert(meta_find_target(TARGET_BOXES, None, [True] * 4)))
    got = criterion.o2m_matcher(step.our_outputs["o2m"], packed)
    assert sorted(zip(*(t.tolist() for t in got))) == sorted(zip(*(t.tolist() for t in theirs)))
    assert len(got) > len(packed.boxes)  # one-to-many: some target has several queries
    queries = list(zip(got.pair.tolist(), got.query.tolist()))
    assert len(set(queries)) == len(queries)  # the case where the two rules differ is not in this batch
    # Presence logits stay inside +-10, where our (transformers') clamp and Meta's discarded one agree.
    presences = [step.our_outputs["presence_logit"]] + [a["presence_logit"] for a in step.our_outputs["aux_outputs"]]
    assert float(torch.stack(presences).detach().abs().max()) < 10


@SLOW
def test_every_gradient_matches_meta(step):
    """Each parameter both have: the same gradient, or none on both sides (frozen, or unused: the
    FPN's last level, CLIP's own projection, the pixel decoder's unused stage). Measured (max |diff|
    / max |gradient| per parameter): 6e-5 in the box head, 4e-5 elsewhere in the decoder, 2e-6 in
    the ViT, 1e-6 or less in the rest; the exact zeros' noise 2e-8 of the largest gradient (4.8e3)."""
    floor = GRAD_FLOOR * step.largest_gradient
    failures, zero_checked = [], 0
    for name, ours in step.our_grads.items():
        theirs = step.meta_grads[name]
        if ours is None or theirs is None:
            assert ours is None and theirs is None, f"{name}: gradient on one side only"
            continue
        scale, diff = float(theirs.abs().max()), float((ours - theirs).abs().max())
        if ZERO_IN_EXACT_ARITHMETIC.search(name):
            zero_checked += 1
            if max(float(ours.abs().max()), scale) > floor:
                failures.append(f"{name}: should be 0, got {float(ours.abs().max()):.3g} and {scale:.3g}")
        elif diff > GRAD_RTOL * scale:
            failures.append(f"{name}: max diff {diff:.3g}, scale {scale:.3g}")
    assert not failures, "\n".join(failures)
    assert zero_checked == 20  # key biases: text 2, exemplar encoder 2, DETR encoder 4, decoder 9, mask head 1; RPB 2
    # The floor separates: every other trained gradient is far above it (the smallest: 50 x the floor).
    trained = [g for n, g in step.meta_grads.items() if g is not None and not ZERO_IN_EXACT_ARITHMETIC.search(n)]
    assert min(float(g.abs().max()) for g in trained) > 10 * floor


@SLOW
def test_optimizer_groups_match_meta(step):
    """Per parameter: Meta's construct_optimizer (layer decay with the *pos_embed* override, weight
    decay off for *bias* and torch.nn.LayerNorm) and our configure_optimizers give the same lr,
    weight decay, betas and eps."""
    ours = step.ours.configure_optimizers()["optimizer"]
    theirs = meta_optimizer(step.meta, **OPTIM).optimizer

    def settings(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple]:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        return {n: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"], group_of[id(p)]["betas"],
                    group_of[id(p)]["eps"]) if id(p) in group_of else None for n, p in model.named_parameters()}

    meta_settings = settings(theirs, step.meta)
    mine = settings(ours, step.ours.detector)
    # Meta's settings under our names: a fused q/k/v parameter's settings go to all three.
    as_ours = meta_tensors_as_ours(step.meta, CONFIG, {
        n: torch.full_like(p, float(i)) for i, (n, p) in enumerate(step.meta.named_parameters())})
    index = {i: n for i, (n, _) in enumerate(step.meta.named_parameters())}
    compared = 0
    for name, value in mine.items():
        if value is None:  # frozen: not in our optimiser (Meta's has it, with no gradient ever)
            assert step.meta_grads[name] is None, name
            continue
        lr, decay, betas, eps = meta_settings[index[int(as_ours[name].flatten()[0])]]
        assert math.isclose(value[0], lr, rel_tol=1e-12), (name, value[0], lr)
        assert (value[1], value[2], value[3]) == (decay, tuple(betas), eps), (name, value, decay, betas, eps)
        compared += 1
    assert compared == sum(p.requires_grad for p in step.ours.detector.parameters())
    # Spot checks of the rule itself: the resizer (our text_projection) trains at the text rate.
    assert mine["text_projection.weight"][:2] == (5e-6, 0.1) and mine["text_projection.bias"][:2] == (5e-6, 0.0)
    assert mine["vision_encoder.backbone.embeddings.position_embeddings"][:2] == (2.5e-5, 0.1)


@SLOW
def test_gradient_clipping_matches_meta(step):
    """Meta's GradientClipper(max_norm=0.1) on its model and Lightning's norm clipping (what
    trainer.gradient_clip_val=0.1 runs) on our optimiser's parameters: the same clipped gradients."""
    from sam3.train.optim.optimizer import GradientClipper

    with restored(step.ours, step.meta):
        optimizer = step.ours.configure_optimizers()["optimizer"]
        norm = torch.nn.utils.get_total_norm([p.grad for p in step.ours.parameters() if p.grad is not None])
        meta_norm = torch.nn.utils.get_total_norm([p.grad for p in step.meta.parameters() if p.grad is not None])
        assert math.isclose(float(norm), float(meta_norm), rel_tol=1e-6) and float(norm) > 0.1  # clipping acts
        Precision().clip_grad_by_norm(optimizer, 0.1)
        GradientClipper(max_norm=0.1, norm_type=2)(step.meta)
        clipped = meta_tensors_as_ours(step.meta, CONFIG, {n: p.grad for n, p in step.meta.named_parameters()})
        for name, p in step.ours.detector.named_parameters():
            if p.grad is None or ZERO_IN_EXACT_ARITHMETIC.search(name):
                continue
            theirs = clipped[name]
            assert float((p.grad - theirs).abs().max()) <= GRAD_RTOL * float(theirs.abs().max()), name
            # Clipping scaled the gradient by 0.1 / norm, as both libraries compute it.
            torch.testing.assert_close(theirs, step.meta_grads[name] * (0.1 / (float(meta_norm) + 1e-6)),
                                       rtol=1e-5, atol=0)


def adamw_step(step: Step, *, meta_gradients_for_ours: bool) -> tuple[dict, dict, dict, dict]:
    """One step of our configure_optimizers' AdamW and of Meta's optimiser (each at its step-0
    values). Returns our updates, Meta's updates under our names, our groups' lr per parameter and
    our parameters before the step."""
    before = {n: p.detach().clone() for n, p in step.ours.detector.named_parameters()}
    meta_before = {n: p.detach().clone() for n, p in step.meta.named_parameters()}
    if meta_gradients_for_ours:
        for name, p in step.ours.detector.named_parameters():
            p.grad = None if step.meta_grads[name] is None else step.meta_grads[name].clone()
    optimizer = step.ours.configure_optimizers()["optimizer"]  # its LambdaLR sets the step-0 rates
    optimizer.step()
    meta_optimizer(step.meta, **OPTIM).step(where=0.0, step=0)  # sets the step-0 values, then steps
    group_lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr_of = {n: group_lr.get(id(p)) for n, p in step.ours.detector.named_parameters()}
    ours = {n: p.detach() - before[n] for n, p in step.ours.detector.named_parameters()}
    theirs = meta_tensors_as_ours(step.meta, CONFIG, {n: p.detach() - meta_before[n]
                                                      for n, p in step.meta.named_parameters()})
    return ours, theirs, lr_of, before


@SLOW
def test_adamw_step_from_the_same_gradients_matches_meta(step):
    """Given Meta's gradients, our optimiser moves every parameter as Meta's does, to float32
    resolution: the same per-parameter lr, weight decay, betas and eps, fused q/k/v or not.
    Measured: updates equal to 5e-6 of the largest update (one float32 rounding of a parameter)."""
    with restored(step.ours, step.meta):
        ours, theirs, lr_of, before = adamw_step(step, meta_gradients_for_ours=True)
    for name, p in step.ours.detector.named_parameters():
        if not p.requires_grad:
            assert not ours[name].any(), name
            continue
        # Rates equal to 1e-12 (Meta scales them in another order), parameters rounded to float32.
        resolution = 2 * torch.finfo(torch.float32).eps * (before[name].abs() + theirs[name].abs())
        assert bool(((ours[name] - theirs[name]).abs() <= resolution).all()), name
        assert theirs[name].abs().max() > 0.5 * lr_of[name], name  # every trained parameter moved


@SLOW
def test_one_adamw_step_matches_meta(step):
    """One AdamW step, each side from its own gradients (before clipping), with its own groups. An
    entry where the two gradients differ by more than 1e-3 of its value (near 0: sign noise) may
    move by up to 2 lr more; every other entry to 1e-4 of its tensor's largest update or to float32
    resolution. Measured: 968 such entries of 4.5 M besides the exact zeros; elsewhere the
    updates differ by one float32 rounding of the parameter at most."""
    with restored(step.ours, step.meta):
        ours, theirs, lr_of, before = adamw_step(step, meta_gradients_for_ours=False)
    failures, loose, total = [], 0, 0
    for name, p in step.ours.detector.named_parameters():
        if not p.requires_grad:
            assert not ours[name].any(), name
            continue
        update, grad = theirs[name], step.meta_grads[name]
        unsure = (step.our_grads[name] - grad).abs() > 1e-3 * grad.abs()
        sure = torch.maximum(torch.full_like(update, 1e-4 * float(update.abs().max())),
                             2 * torch.finfo(torch.float32).eps * (before[name].abs() + update.abs()))
        bound = torch.where(unsure, 2 * lr_of[name] * (1 + 1e-3), sure)
        if bool(((ours[name] - update).abs() > bound).any()):
            failures.append(f"{name}: max diff {float((ours[name] - update).abs().max()):.3g}")
        if not ZERO_IN_EXACT_ARITHMETIC.search(name):
            loose += int(unsure.sum())
            total += unsure.numel()
    assert not failures, "\n".join(failures)
    assert loose < 1e-3 * total  # the allowance covers a handful of entries (measured: 968 of 4.5 M), not the step


def test_a_query_matched_to_two_targets():
    """Where a one-to-many query matches two targets, Meta writes both soft targets into one cell of
    ``positive_target_classes`` (an index_put with a repeated index: the last write stays on the CPU,
    the order is undefined on the GPU); ours keeps the larger (the better-overlapping target). The
    documented deviation, on one pair with query 0 matched to both targets."""
    from sam3.train.loss.loss_fns import IABCEMdetr

    logits = torch.tensor([[0.5, -1.0, 0.2]])
    boxes = torch.tensor([[[0.50, 0.50, 0.20, 0.20], [0.1, 0.1, 0.05, 0.05], [0.8, 0.8, 0.1, 0.1]]])
    targets = [{"boxes": torch.tensor([[0.50, 0.50, 0.20, 0.22], [0.55, 0.50, 0.20, 0.20]]), "exhaustive": True}]
    packed = PackedTargets.from_list(targets)
    indices = MatchIndices(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([0, 1]))  # IoU 0.91, 0.60
    ours = align_loss(logits, boxes, packed, indices, pos_weight=10.0, alpha=0.25, gamma=2.0, pad_num_queries=200)

    def meta_align(order: list[int]) -> float:
        loss = IABCEMdetr(pos_weight=10.0, weak_loss=False, alpha=0.25, gamma=2, use_presence=False, pad_n_queries=200,
                          weight_dict={"loss_ce": 1.0})
        outputs = {"pred_logits": logits[..., None], "pred_boxes_xyxy": torch.cat(
            [boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)}
        pick = torch.tensor(order)
        meta_targets = {"boxes_xyxy": packed.boxes_xyxy, "is_exhaustive": torch.tensor([True])}
        return float(loss.get_loss(outputs, meta_targets, (indices.pair[pick], indices.query[pick],
                                                           indices.target[pick]), num_boxes=2)["loss_ce"])

    def one_target(target: int) -> float:  # the loss with query 0 matched to that target alone
        single = MatchIndices(torch.tensor([0]), torch.tensor([0]), torch.tensor([target]))
        return float(align_loss(logits, boxes, packed, single, pos_weight=10.0, alpha=0.25, gamma=2.0,
                                pad_num_queries=200))

    assert math.isclose(float(ours), one_target(0), rel_tol=1e-6)  # ours: the better target, in any order
    flipped = MatchIndices(indices.pair.flip(0), indices.query.flip(0), indices.target.flip(0))
    assert math.isclose(float(align_loss(logits, boxes, packed, flipped, pos_weight=10.0, alpha=0.25, gamma=2.0,
                                         pad_num_queries=200)), one_target(0), rel_tol=1e-6)
    assert math.isclose(meta_align([0, 1]), one_target(1), rel_tol=1e-6)  # Meta (CPU): the one written last
    assert math.isclose(meta_align([1, 0]), one_target(0), rel_tol=1e-6)
    assert one_target(1) > 1.1 * one_target(0)  # the rules differ by 19 % here
