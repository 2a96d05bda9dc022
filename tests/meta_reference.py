"""Meta's own SAM 3 image model (PyPI ``sam3``) at any size, on the CPU, for parity tests.

Meta's ``model_builder`` hard-codes the released sizes and precomputes caches on "cuda", so this
module builds the same modules directly, with every size taken from a transformers ``Sam3Config``
(the same object our detector is built from) and the arguments ``model_builder`` passes otherwise.
What runs on the CPU needs a few in-process workarounds, never an edit of site-packages:

- ``PositionEmbeddingSine(precompute_resolution=None)`` and the decoder's ``resolution=None,
  stride=None`` (the builder fills their caches on "cuda");
- ``Tensor.pin_memory`` as the identity while CUDA is unavailable (the exemplar encoder pins a tensor
  even for text-only prompts): :func:`cpu_workarounds`, a context manager;
- the text encoder's ``positional_embedding`` and ``text_projection`` are ``torch.empty`` (a
  checkpoint fills them): :func:`randomize_` fills every parameter.

    model = randomize_(build_meta_image_model(config), seed=0)     # in eval mode
    with torch.no_grad(), cpu_workarounds():
        out = run_meta(model, meta_datapoint(images, phrases, pair_image, boxes, labels))
    checkpoint = meta_checkpoint(model)         # {"model": {"detector." + key: tensor, "tracker.x": ...}}
    released = released_meta_video_model()      # sam3.pt's keys and shapes, no memory

Training forward: build with ``matcher=`` (Meta's ``sam3.train.matcher.BinaryHungarianMatcherV2``),
call ``model.train()`` and pass ``find_target=meta_find_target(boxes, masks, exhaustive)`` to
:func:`meta_datapoint`; ``run_meta`` then returns Meta's training outputs (``pred_logits_o2m``,
``aux_outputs``, matcher ``indices``, ...), ready for Meta's loss. Meta's decoder asserts activation
checkpointing in training, so it is on (as released); dropout and drop-path default to 0 for
deterministic parity.

Training step (tests/test_meta_training_parity.py): :func:`meta_matcher`, :func:`meta_loss` (run it
inside :func:`focal_loss_on_cpu`) and :func:`meta_optimizer` are Meta's matcher, loss and optimiser
as its released fine-tuning config builds them; :func:`meta_tensors_as_ours` maps per-parameter
tensors (gradients, updates) to our detector's names. The optimiser needs hydra-core and fvcore.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Sam3Config

from sam3_train.data.tokenizer import open_clip_vocab_file


def build_meta_image_model(
    config: Sam3Config,
    *,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    sam2_neck: bool = True,
    matcher: Any = None,
) -> nn.Module:
    """Meta's ``Sam3Image`` with the sizes of ``config``, built as ``build_sam3_image_model`` does.

    ``sam2_neck`` adds the tracker's copy of the FPN neck (``sam2_convs``), as the released video
    checkpoint has it. Parameters come out as Meta's constructors leave them (some ``torch.empty``):
    call :func:`randomize_` or load a state dict before use.
    """
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    vit = config.vision_config.backbone_config
    text = config.text_config
    geo, enc, dec, seg = (config.geometry_encoder_config, config.detr_encoder_config,
                          config.detr_decoder_config, config.mask_decoder_config)
    d = config.vision_config.fpn_hidden_size
    if not d == geo.hidden_size == enc.hidden_size == dec.hidden_size == seg.hidden_size:
        raise ValueError("Meta's SAM 3 has one d_model: the FPN, geometry, DETR and mask widths must be equal.")
    if text.intermediate_size != 4 * text.hidden_size or text.projection_dim != 512:
        raise ValueError("Meta's text encoder fixes mlp_ratio 4 and CLIP's text_projection at 512 outputs: "
                         "use text_config intermediate_size = 4 x hidden_size and projection_dim 512.")

    def sine(num_pos_feats: int) -> PositionEmbeddingSine:
        return PositionEmbeddingSine(num_pos_feats=num_pos_feats, normalize=True, temperature=10000,
                                     precompute_resolution=None)

    def attention(heads: int, batch_first: bool, p: float = dropout) -> MultiheadAttention:
        return MultiheadAttention(num_heads=heads, dropout=p, embed_dim=d, batch_first=batch_first)

    trunk = ViT(
        img_size=vit.image_size, pretrain_img_size=vit.pretrain_image_size, patch_size=vit.patch_size,
        embed_dim=vit.hidden_size, depth=vit.num_hidden_layers, num_heads=vit.num_attention_heads,
        mlp_ratio=vit.intermediate_size / vit.hidden_size, norm_layer="LayerNorm", drop_path_rate=drop_path_rate,
        qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=tuple(vit.global_attn_indexes),
        rel_pos_blocks=(), use_rope=True, use_interp_rope=True, window_size=vit.window_size,
        pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
        return_interm_layers=False, bias_patch_embed=False,
    )
    neck = Sam3DualViTDetNeck(position_encoding=sine(d), d_model=d, trunk=trunk,
                              scale_factors=list(config.vision_config.scale_factors), add_sam2_neck=sam2_neck)
    text_encoder = VETextEncoder(
        d_model=d, tokenizer=SimpleTokenizer(bpe_path=str(open_clip_vocab_file())), width=text.hidden_size,
        heads=text.num_attention_heads, layers=text.num_hidden_layers,
        context_length=text.max_position_embeddings, vocab_size=text.vocab_size,
    )
    backbone = SAM3VLBackbone(visual=neck, text=text_encoder, scalp=1)

    encoder = TransformerEncoderFusion(
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=enc.intermediate_size, dropout=dropout,
            pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False,
            pre_norm=True, self_attention=attention(enc.num_attention_heads, True),
            cross_attention=attention(enc.num_attention_heads, True),
        ),
        num_layers=enc.num_layers, d_model=d, num_feature_levels=1, frozen=False, use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu", d_model=d, dim_feedforward=dec.intermediate_size, dropout=dropout,
            cross_attention=attention(dec.num_attention_heads, False), n_heads=dec.num_attention_heads,
            use_text_cross_attention=True,
        ),
        num_layers=dec.num_layers, num_queries=dec.num_queries, return_intermediate=True, box_refine=True,
        num_o2m_queries=0, dac=True, boxRPB="log", d_model=d, frozen=False, interaction_layer=None,
        dac_use_selfatt_ln=True, resolution=None, stride=None, use_act_checkpoint=True, presence_token=True,
    )
    scoring = DotProductScoring(
        d_model=d, d_proj=d,
        prompt_mlp=MLP(input_dim=d, hidden_dim=dec.intermediate_size, output_dim=d, num_layers=2,
                       dropout=dropout, residual=True, out_norm=nn.LayerNorm(d)),
    )
    segmentation = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=seg.num_upsampling_stages, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=True, cross_attend_prompt=attention(seg.num_attention_heads, False, 0.0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=seg.num_upsampling_stages, interpolation_mode="nearest",
                                   hidden_dim=d),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=sine(d), encode_boxes_as_points=False, points_direct_project=True, points_pool=True,
        points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d,
        num_layers=geo.num_layers, roi_size=geo.roi_size, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
        layer=TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=geo.intermediate_size, dropout=dropout,
            pos_enc_at_attn=False, pre_norm=True, self_attention=attention(geo.num_attention_heads, False),
            pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
            cross_attention=attention(geo.num_attention_heads, False),
        ),
    )
    model = Sam3Image(
        backbone=backbone, transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        input_geometry_encoder=geometry, segmentation_head=segmentation, num_feature_levels=1,
        o2m_mask_predict=True, dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
        inst_interactive_predictor=None, matcher=matcher,
    )
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta_device() -> Iterator[None]:
    """Every parameter registered while active is moved to the meta device (shapes, no memory), so
    constructors' initialisers run on nothing; buffers (``.item()`` calls) stay on the CPU."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def released_meta_video_model() -> nn.Module:
    """Meta's own ``build_sam3_video_model`` (the released sizes), every tensor on the meta device.

    Its state dict has the keys and shapes of the released ``sam3.pt`` (Meta loads that file into
    this model strictly: ``detector.`` and ``tracker.`` keys) without 3.4 GB of memory. Its position
    encodings and decoder would precompute caches on "cuda": they are built without (patched in
    ``sam3.model_builder`` for the call only).
    """
    import sam3.model_builder as builder
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    class NoCachePositionEmbedding(PositionEmbeddingSine):
        def __init__(self, *args: Any, precompute_resolution: Any = None, **kwargs: Any):
            super().__init__(*args, precompute_resolution=None, **kwargs)

    class NoCacheDecoder(TransformerDecoder):
        def __init__(self, *args: Any, resolution: Any = None, stride: Any = None, **kwargs: Any):
            super().__init__(*args, resolution=None, stride=None, **kwargs)

    saved = builder.PositionEmbeddingSine, builder.TransformerDecoder
    builder.PositionEmbeddingSine, builder.TransformerDecoder = NoCachePositionEmbedding, NoCacheDecoder
    try:
        with _parameters_on_meta_device():
            return builder.build_sam3_video_model(bpe_path=str(open_clip_vocab_file()), device="meta",
                                                  load_from_HF=False, checkpoint_path=None)
    finally:
        builder.PositionEmbeddingSine, builder.TransformerDecoder = saved


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and non-degenerate, from ``seed``: norms' weights 1 + N(0, 0.1^2) and
    biases N(0, 0.1^2); other matrices N(0, 1 / fan_in); other vectors N(0, 0.1^2). No weight is left
    zero (Meta zeroes the box head's last layer), so every path of the forward is exercised."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
             for p in m.parameters(recurse=False)}
    norm_weights = {id(m.weight) for m in model.modules()
                    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None}
    for _, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if id(p) in norms:
            p.copy_(noise * 0.1 + (1.0 if id(p) in norm_weights else 0.0))
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(noise * 0.1)
    return model


@contextlib.contextmanager
def cpu_workarounds() -> Iterator[None]:
    """``Tensor.pin_memory`` as the identity while CUDA is unavailable (restored on exit)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original  # type: ignore[method-assign]


def meta_checkpoint(model: nn.Module, *, tracker_keys: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """``model``'s weights as Meta's released ``sam3.pt`` stores them: ``{"model": {...}}`` with the
    detector's keys under ``detector.`` and (fake) tracker tensors under ``tracker.``."""
    state = {f"detector.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(tracker_keys):
        state[f"tracker.maskmem_backbone.fake.{i}.weight"] = torch.full((2, 3), float(i))
    return {"model": state}


def meta_datapoint(
    images: torch.Tensor,
    phrases: list[str],
    pair_image: torch.Tensor,
    exemplar_boxes: torch.Tensor | None = None,
    exemplar_labels: torch.Tensor | None = None,
    find_target: Any = None,
) -> Any:
    """Meta's ``BatchedDatapoint`` for P (image, phrase) pairs.

    images [B, 3, S, S]; phrases P strings; pair_image [P]; exemplar_boxes [P, E, 4] normalised cxcywh
    and exemplar_labels [P, E] (1 positive, 0 negative, -1 padding), as in our ``Batch``.
    Meta encodes each distinct phrase once; its box tensors are sequence-first ([E, P, ...]) with a
    padding mask [P, E] that is True on padding.
    """
    from sam3.model.data_misc import BatchedDatapoint, FindStage

    distinct = list(dict.fromkeys(phrases))
    num_pairs = len(phrases)
    if exemplar_boxes is None or exemplar_labels is None:
        exemplar_boxes = torch.zeros(num_pairs, 0, 4)
        exemplar_labels = torch.zeros(num_pairs, 0, dtype=torch.long)
    find = FindStage(
        img_ids=pair_image.long(),
        text_ids=torch.tensor([distinct.index(p) for p in phrases], dtype=torch.long),
        input_boxes=exemplar_boxes.float().transpose(0, 1).contiguous(),
        input_boxes_mask=exemplar_labels < 0,
        input_boxes_label=exemplar_labels.clamp(min=0).long().transpose(0, 1).contiguous(),
        input_points=None,
        input_points_mask=None,
    )
    return BatchedDatapoint(img_batch=images, find_text_batch=distinct, find_inputs=[find],
                            find_targets=[find_target], find_metadatas=[None])


def meta_find_target(boxes: list[torch.Tensor], masks: list[torch.Tensor] | None, exhaustive: list[bool]) -> Any:
    """Meta's ``BatchedFindTarget`` as its collator packs it, from per-pair targets: boxes [n, 4]
    normalised cxcywh, masks [n, H, W] bool (None: no mask targets), exhaustive flags. Object ids are
    numbered per pair in order."""
    from sam3.model.data_misc import BatchedFindTarget
    from sam3.train.data.collator import packed_to_padded_naive

    num_boxes = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    packed = torch.cat([b.float().reshape(-1, 4) for b in boxes])
    object_ids = torch.cat([torch.arange(len(b)) for b in boxes]).long()
    segments = torch.cat(masks).bool() if masks is not None else None
    return BatchedFindTarget(
        num_boxes=num_boxes, boxes=packed, boxes_padded=packed_to_padded_naive(packed, num_boxes),
        repeated_boxes=torch.zeros(0, 4), segments=segments, semantic_segments=torch.zeros(0, dtype=torch.bool),
        is_valid_segment=torch.ones(len(packed), dtype=torch.bool) if masks is not None else None,
        is_exhaustive=torch.tensor(exhaustive, dtype=torch.bool), object_ids=object_ids,
        object_ids_padded=packed_to_padded_naive(object_ids, num_boxes, fill_value=-1),
    )


def run_meta(model: nn.Module, datapoint: Any) -> dict[str, Any]:
    """Meta's forward; its output dict for the last (only) stage. Run inside :func:`cpu_workarounds`."""
    from sam3.model.model_misc import SAM3Output

    outputs = model(datapoint)
    with SAM3Output.iteration_mode(outputs, SAM3Output.IterMode.LAST_STEP_PER_STAGE) as last:
        return last[-1]


# ------------------------------------------------------------------ training: matchers, loss, optimiser
# Meta's released fine-tuning recipe, sam3/train/configs/roboflow_v100/roboflow_v100_full_ft_100_images.yaml
# (its commented "loss to be used for training in case of segmentation" block, and its optim block).


def meta_matcher() -> Any:
    """The one-to-one matcher of Meta's configs (``scratch.matcher``); pass it to
    :func:`build_meta_image_model`, whose training forward matches every layer with it."""
    from sam3.train.matcher import BinaryHungarianMatcherV2

    return BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2,
                                    stable=False)


def meta_loss(matcher: Any = None) -> nn.Module:
    """Meta's ``Sam3LossWrapper`` as its segmentation fine-tuning config builds it, with one process
    (``normalization="local"``: the box count is not all-reduced). Call it as
    ``meta_loss()(model(datapoint), [model.back_convert(find_target)])`` inside :func:`focal_loss_on_cpu`;
    it returns Meta's named terms (one-to-many ones already times ``o2m_weight``) and ``core_loss``.

    The mask loss is at full resolution (``Masks`` without ``num_sample_points``, as configured);
    the semantic loss is ``SemanticSegCriterion`` (the config names it ``sam3.losses.loss_fns``, a
    module path that does not exist; the class lives in ``sam3.train.loss.loss_fns``).
    """
    from sam3.train.loss import loss_fns
    from sam3.train.loss.sam3_loss import Sam3LossWrapper
    from sam3.train.matcher import BinaryOneToManyMatcher

    return Sam3LossWrapper(
        normalization="local",
        matcher=matcher if matcher is not None else meta_matcher(),
        o2m_weight=2.0,
        o2m_matcher=BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4),
        use_o2m_matcher_on_o2m_aux=False,
        loss_fns_find=[
            loss_fns.Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
            loss_fns.IABCEMdetr(weak_loss=False, weight_dict={"loss_ce": 20.0, "presence_loss": 20.0}, pos_weight=10.0,
                                alpha=0.25, gamma=2, use_presence=True, pos_focal=False, pad_n_queries=200,
                                pad_scale_pos=1.0),
            loss_fns.Masks(focal_alpha=0.25, focal_gamma=2.0, weight_dict={"loss_mask": 200.0, "loss_dice": 10.0},
                           compute_aux=False),
        ],
        loss_fn_semantic_seg=loss_fns.SemanticSegCriterion(
            presence_head=True, presence_loss=False, focal=True, focal_alpha=0.6, focal_gamma=2.0, downsample=False,
            weight_dict={"loss_semantic_seg": 20.0, "loss_semantic_presence": 1.0, "loss_semantic_dice": 30.0},
        ),
        scale_by_find_batch_size=True,
    )


@contextlib.contextmanager
def focal_loss_on_cpu() -> Iterator[None]:
    """Meta's loss modules call ``sigmoid_focal_loss(..., triton=True)`` (its default; GPU-only Triton
    kernels): inside this context they get ``triton=False``, the same formula in torch (restored on exit)."""
    from sam3.train.loss import loss_fns

    original = loss_fns.sigmoid_focal_loss

    def without_triton(*args: Any, **kwargs: Any) -> torch.Tensor:
        return original(*args, **{**kwargs, "triton": False})

    loss_fns.sigmoid_focal_loss = without_triton
    try:
        yield
    finally:
        loss_fns.sigmoid_focal_loss = original


def meta_optimizer(
    model: nn.Module,
    *,
    lr: float,
    lr_vision: float,
    lr_text: float,
    layer_decay: float,
    weight_decay: float,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    timescale: int = 20,
) -> Any:
    """Meta's ``Optimizer`` (AdamW and its per-group schedulers) built by Meta's own
    ``construct_optimizer`` from the config's ``optim`` block, with these base values: its ``lr``
    options (transformer default, ``backbone.vision_backbone.*``, ``backbone.language_backbone.*``),
    its ``weight_decay`` options (0 for ``*bias*`` and ``torch.nn.LayerNorm`` modules' parameters)
    and its ``layer_decay_param_modifier`` on the ViT trunk with the ``*pos_embed*`` override.

    The schedulers are the config's ``InverseSquareRootParamScheduler``; with ``warmup_steps=0`` the
    groups start at the base rates (the released warm-up of 20 steps starts at lr 0). Needs hydra-core
    and fvcore (imported by Meta's optimiser module).
    """
    from omegaconf import OmegaConf
    from sam3.train.optim.optimizer import construct_optimizer

    def inverse_sqrt(base_lr: float) -> dict[str, Any]:
        return {"_target_": "sam3.train.optim.schedulers.InverseSquareRootParamScheduler", "base_lr": base_lr,
                "timescale": timescale, "warmup_steps": warmup_steps, "cooldown_steps": cooldown_steps}

    def constant(value: float) -> dict[str, Any]:
        return {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": value}

    options = OmegaConf.create({
        "lr": [
            {"scheduler": inverse_sqrt(lr)},
            {"scheduler": inverse_sqrt(lr_vision), "param_names": ["backbone.vision_backbone.*"]},
            {"scheduler": inverse_sqrt(lr_text), "param_names": ["backbone.language_backbone.*"]},
        ],
        "weight_decay": [
            {"scheduler": constant(weight_decay)},
            {"scheduler": constant(0.0), "param_names": ["*bias*"], "module_cls_names": ["torch.nn.LayerNorm"]},
        ],
    })
    modifiers = [OmegaConf.create({
        "_target_": "sam3.train.optim.optimizer.layer_decay_param_modifier", "_partial_": True,
        "layer_decay_value": layer_decay, "apply_to": "backbone.vision_backbone.trunk",
        "overrides": [{"pattern": "*pos_embed*", "value": 1.0}],
    })]
    return construct_optimizer(model, OmegaConf.create({"_target_": "torch.optim.AdamW"}), options, modifiers)


def meta_tensors_as_ours(
    model: nn.Module, config: Sam3Config, values: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor | None]:
    """Per-parameter tensors of Meta's ``model`` (``values``: its parameter names -> e.g. gradients,
    None for none) under our detector's names, through the checkpoint converter's mapping (fused
    q/k/v split, CLIP's projection transposed, the ViT position embedding's CLS row dropped). Keys
    our detector has but Meta gives no value for map to None; tensors the converter drops (RoPE
    caches, point encoders, the tracker's neck) are left out."""
    from sam3_train.model.meta_checkpoint import convert_state

    missing = float("nan")  # marks "no value" through the conversion, which needs every key
    state = {k: (values[k] if values.get(k) is not None else torch.full_like(v, missing)).detach()
             for k, v in model.state_dict(keep_vars=True).items()}
    return {k: (None if bool(v.isnan().all()) and v.numel() else v)
            for k, v in convert_state(state, config).state.items()}
