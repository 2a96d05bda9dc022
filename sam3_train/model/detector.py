"""The SAM 3 detector for training: transformers' ``Sam3Model`` with a pair-batched forward.

``Sam3Detector`` *is* a ``transformers.Sam3Model`` (same modules, same state-dict keys and shapes,
same ``config``), so one checkpoint file serves both. What it adds is what training needs:

- a forward on a :class:`~sam3_train.data.Batch` of (image, phrase) pairs: the vision encoder runs
  once per image and the text encoder once per distinct phrase; their features are gathered per pair,
  and everything after (exemplar-box encoder, DETR encoder, decoder, heads) runs per pair;
- every decoder layer's class logits, boxes and presence logit (``aux_outputs``);
- DAC dual supervision in training (``o2m``, see :mod:`sam3_train.model.decoder`);
- activation checkpointing for the ViT, the DETR encoder, the decoder and the mask decoder.

    detector = build_detector("tiny")
    out = detector(batch)   # keys below

Output dict (P pairs, Q queries, h = w = 4 x the ViT token grid):
    pred_logits     [P, Q]        class logits, final layer, one-to-one half
    pred_boxes      [P, Q, 4]     normalised cxcywh
    pred_masks      [P, Q, h, w]  mask logits
    presence_logit  [P]
    semantic_seg    [P, 1, h, w]  logits
    aux_outputs     list over earlier layers of {pred_logits, pred_boxes, presence_logit}
    o2m             (training with DAC) {pred_logits, pred_boxes, pred_masks,
                                         aux_outputs: [{pred_logits, pred_boxes}]}
    dn              (training with ``denoising``) {pred_logits [P, D], pred_boxes [P, D, 4],
                                         indices (their fixed assignment), aux_outputs}
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Sam3Config, Sam3Model
from transformers.masking_utils import create_bidirectional_mask

from sam3_train.data.batch import Batch
from sam3_train.model import checkpoint_io
from sam3_train.losses.targets import PackedTargets
from sam3_train.model.decoder import run_decoder
from sam3_train.model.denoising import DenoisingQueries, DenoisingSettings, make_denoising_queries
from sam3_train.model.presets import preset_config
from sam3_train.data.tokenizer import Sam3Tokenizer


Init = Literal["transformers", "xavier", "meta", "meta_grid", "meta_sincos", "meta_sincos_local"]
_DEFAULT_INIT = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding, torch.nn.LayerNorm,
                 torch.nn.GroupNorm)


class Sam3Detector(Sam3Model):
    """SAM 3 image detector with training-time outputs.

    Args:
        config: the transformers ``Sam3Config``.
        dac: duplicate the queries into one-to-one and one-to-many halves in training mode.
        activation_checkpointing: recompute ViT, DETR-encoder and decoder layers and the mask decoder in
            the backward pass.
        encode_empty_geometry: run the exemplar-box encoder for every pair, text-only ones included,
            so every prompt ends with the encoder's CLS token: what Meta's SAM 3 always does, and how
            the released weights were trained (the default). ``False`` is transformers' inference,
            which skips the encoder when no pair of the batch has a box; a text-only pair then gets
            the CLS token only when another pair of its batch has a box, so its output depends on
            the rest of the batch. Use ``False`` only to compare with transformers.
        train_masks: run the mask decoder (instance masks, semantic map) in training mode. ``False``
            for box-only objectives: the pixel decoder's activations are then never made, which is
            most of the step's memory at 1008 px (benchmarks/bench_memory.py). Eval always predicts masks.
        tokenizer: the CLIP tokenizer; built from open_clip's shipped vocabulary when first needed.
        init: how a model trained from scratch starts: ``meta`` (the default: what Meta's SAM 3 code
            does, see :meth:`reset_parameters_as_meta`), ``meta_grid`` (the same, with the reference
            boxes' centres on a grid over the image, see :meth:`place_reference_centres_on_grid`),
            ``xavier`` (Xavier-uniform linear weights, zero biases) or ``transformers`` (normal, std
            0.02, for every weight). Loading a checkpoint overwrites it. At small widths transformers'
            init leaves the heads ignoring their input (a presence logit constant across pairs) and
            starts every query at the same box.
        denoising: add denoising queries in training (DN-DETR/DINO, a departure for training from
            scratch: :mod:`sam3_train.model.denoising`); ``None`` (SAM 3's recipe) by default.
    """

    # transformers' flag for activation_checkpointing_enable (Sam3Model leaves it False); its only
    # checkpointing layers are the ViT blocks and CLIP's, which run under torch.utils.checkpoint unchanged.
    supports_gradient_checkpointing = True

    def __init__(
        self,
        config: Sam3Config,
        *,
        dac: bool = True,
        activation_checkpointing: bool = False,
        encode_empty_geometry: bool = True,
        train_masks: bool = True,
        tokenizer: Sam3Tokenizer | None = None,
        init: Init = "meta",
        denoising: DenoisingSettings | None = None,
    ):
        super().__init__(config)
        if init == "xavier":
            self.reset_linear_layers()
        elif init in ("meta", "meta_grid", "meta_sincos", "meta_sincos_local"):
            self.reset_parameters_as_meta()
            if init == "meta_grid":
                self.place_reference_centres_on_grid()
            if init in ("meta_sincos", "meta_sincos_local"):
                self.set_sincos_vit_positions()
            if init == "meta_sincos_local":
                self.start_box_rpb_local()
        elif init != "transformers":
            raise ValueError(f"Unknown init {init!r}: 'transformers', 'xavier', 'meta', 'meta_grid', 'meta_sincos' "
                             "or 'meta_sincos_local'.")
        self.freeze_unused_parameters()
        self.dac = dac
        self.encode_empty_geometry = encode_empty_geometry
        self.train_masks = train_masks
        self.denoising = denoising
        self._tokenizer = tokenizer
        self.set_activation_checkpointing(activation_checkpointing)

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_linear_layers(self) -> None:
        """Xavier-uniform weights and zero biases for every linear layer (from-scratch training)."""
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()

    @torch.no_grad()
    def reset_parameters_as_meta(self) -> None:
        """Initialise as Meta's SAM 3 code does when it builds the model (before loading weights).

        - ViT blocks and the CLIP text encoder keep transformers' init (Meta's ViT: truncated normal,
          std 0.02; CLIP's own scheme);
        - every other linear, conv and norm layer takes PyTorch's default (``reset_parameters``),
          which is what Meta's modules get, except that
        - the DETR encoder and decoder (Meta's ``TransformerWrapper``) take Xavier-uniform for every
          weight matrix but the box head, query embeddings and reference boxes; query embeddings and
          reference boxes are standard normal, so the queries start apart, at boxes spread over the
          image (transformers' std 0.02 puts them all at the centre with the same size); the box
          head's last layer is zero, so the first layer's boxes are the reference boxes.
        """
        keep = [self.vision_encoder.backbone, self.text_encoder]
        kept = {id(m) for root in keep for m in root.modules()}
        kept.discard(id(self.vision_encoder.backbone.embeddings.patch_embeddings.projection))  # Meta: PyTorch default
        for module in self.modules():
            if id(module) not in kept and isinstance(module, _DEFAULT_INIT):
                module.reset_parameters()
        for transformer in (self.detr_encoder, self.detr_decoder):
            for name, param in transformer.named_parameters():
                if param.dim() > 1 and not name.startswith(("box_head.", "query_embed.", "reference_points.")):
                    torch.nn.init.xavier_uniform_(param)
        decoder = self.detr_decoder
        torch.nn.init.normal_(decoder.query_embed.weight)
        torch.nn.init.normal_(decoder.reference_points.weight)
        torch.nn.init.zeros_(decoder.box_head.layer3.weight)
        torch.nn.init.zeros_(decoder.box_head.layer3.bias)

    @torch.no_grad()
    def place_reference_centres_on_grid(self) -> None:
        """Move the reference boxes' centres to the cells of a grid over the image, keeping their drawn
        sizes: ``rows = floor(sqrt(Q))``, ``cols = ceil(Q / rows)``, filled row by row (20 queries: 4 x 5).

        A departure from Meta's init, for training from scratch: Meta's standard-normal draw can put
        most of a few queries in one part of the image (one tiny-model start had 13 of 20 centres in one
        quarter), and such a start stalled on the class loss for thousands of steps
        (docs/training_shapes.md). Measured to 3,000 steps on four seeds of that model, it was worse
        (val cgF1 2.27 against 4.00 from Meta's draw), and one grid start stalled too: it is kept so that
        the measurement reproduces, not as a recipe. A fine-tuned model loads its reference boxes.
        """
        reference = self.detr_decoder.reference_points.weight  # [Q, 4] cxcywh before the sigmoid
        queries = reference.shape[0]
        rows = max(1, math.isqrt(queries))
        cols = -(-queries // rows)
        cell = torch.arange(queries, device=reference.device)
        centres = torch.stack([(cell % cols + 0.5) / cols, (cell // cols + 0.5) / rows], dim=1)
        reference[:, :2] = torch.logit(centres.to(reference.dtype))

    @torch.no_grad()
    def set_sincos_vit_positions(self) -> None:
        """Start the ViT's (learned) absolute position embedding at MAE's 2-D sine-cosine table
        (temperature 10,000; half the channels encode x, half y) instead of a normal draw of std 0.02.

        A departure from Meta's init, for training from scratch (``init: meta_sincos``): drawn at std
        0.02 the embedding is small beside the patch embedding (~0.6), and the image features barely
        know where they are (a linear probe recovers a token's x and y with R^2 0.10 from the ViT's
        output and 0.2 from the level the DETR encoder reads, against 0.9 from this start;
        docs/training_shapes.md). A box, or a mask of one instance among several alike, needs that.
        The embedding stays a trained parameter; a fine-tuned model loads its own.
        """
        embedding = self.vision_encoder.backbone.embeddings.position_embeddings  # [1, side * side, C]
        side, channels = math.isqrt(embedding.shape[1]), embedding.shape[2]
        if side * side != embedding.shape[1] or channels % 4:
            raise ValueError(f"sine-cosine positions need a square grid and channels divisible by 4, got "
                             f"{embedding.shape[1]} tokens x {channels}")
        omega = 1.0 / 10000 ** (torch.arange(channels // 4, dtype=torch.float64) / (channels // 4))
        grid = torch.arange(side, dtype=torch.float64)
        y, x = torch.meshgrid(grid, grid, indexing="ij")
        phase_x, phase_y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
        table = torch.cat([phase_x.sin(), phase_x.cos(), phase_y.sin(), phase_y.cos()], dim=1)
        embedding.copy_(table.to(embedding.dtype).unsqueeze(0))

    @torch.no_grad()
    def start_box_rpb_local(self, *, outside: float = 12.0, half: float = 3.0) -> None:
        """Start the decoder's box relative-position bias (the two MLPs that map a token's log-scaled
        distances to a query box's edges, per axis, to one bias per head) so that cross-attention looks
        near each query's box: every head gets ``-outside`` per log-unit a token lies outside the box,
        head 1 also ``+half`` per log-unit towards the box's low edge (left / top part), head 2 towards
        its high edge (right / bottom part), so two heads read different halves of the box. Four of the
        first layer's hidden units are set (the other units and biases keep Meta's draw, with zero output
        weights for the four).

        A departure from Meta's init, for training from scratch (part of ``init: meta_sincos_local``):
        drawn as Meta does, the bias varies by ~0.4 across the image, so cross-attention starts uniform
        (normalised entropy 0.999) and every query reads the same average whatever its box; on synthetic
        memory the decoder then learns to refine a box several times more slowly (docs/training_shapes.md).
        """
        # Input per axis: (token - low edge, token - high edge), log-scaled; inside the box d_low > 0 > d_high.
        units = torch.tensor([[-1.0, 0.0],   # relu(-d_low): how far before the low edge (outside)
                              [0.0, 1.0],    # relu(d_high): how far past the high edge (outside)
                              [0.0, -1.0],   # relu(-d_high): how far before the high edge (the low part)
                              [1.0, 0.0]])   # relu(d_low): how far past the low edge (the high part)
        for mlp in (self.detr_decoder.box_rpb_embed_x, self.detr_decoder.box_rpb_embed_y):
            first, second = mlp.layer1, mlp.layer2
            first.weight[:4] = units.to(first.weight.dtype)
            first.bias[:4] = 0.0
            second.weight[:, :4] = 0.0
            second.weight[:, :2] = -outside
            second.bias.zero_()
            if second.weight.shape[0] >= 3:
                second.weight[1, 2] = half
                second.weight[2, 3] = half

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the ViT blocks, the DETR encoder and decoder layers and the mask decoder in backward.

        The ViT runs transformers' own forward: its blocks are switched through transformers' public
        ``activation_checkpointing_enable`` (``torch.utils.checkpoint(use_reentrant=False)`` around each
        block; ``gradient_checkpointing_enable`` is its deprecated alias in transformers 5). That switch
        also reaches CLIP's text blocks, which run once per distinct phrase and stay as they were. The
        DETR encoder, decoder and mask decoder run in our own pair-batched loops, which read
        ``self.activation_checkpointing``.
        """
        self.activation_checkpointing = enabled
        if enabled:
            self.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self.text_encoder.activation_checkpointing_disable()
        else:
            self.activation_checkpointing_disable()

    def freeze_unused_parameters(self) -> None:
        """``requires_grad=False`` for the weights SAM 3's forward never reads, so plain DDP works.

        They stay in the state dict (checkpoint compatibility): the FPN's last (0.5x) level, which the
        detector drops; CLIP's own ``text_projection`` (SAM 3 projects every token with its own); the
        pixel decoder's upsampling stages beyond the FPN levels it receives.
        """
        unused = [self.vision_encoder.neck.fpn_layers[-1], self.text_encoder.text_projection]
        pixel_decoder = self.mask_decoder.pixel_decoder
        used_stages = len(self.config.vision_config.scale_factors) - 2  # levels given to it, minus one
        unused += list(pixel_decoder.conv_layers[used_stages:]) + list(pixel_decoder.norms[used_stages:])
        for module in unused:
            module.requires_grad_(False)

    def freeze_mask_path(self) -> None:
        """``requires_grad=False`` for what only the masks read, for box-only training
        (``train_masks=False``): the mask decoder and the FPN levels finer than the one the DETR
        encoder reads (the 4x and 2x levels of the released model)."""
        self.mask_decoder.requires_grad_(False)
        for level in self.vision_encoder.neck.fpn_layers[:-2]:
            level.requires_grad_(False)

    @property
    def num_queries(self) -> int:
        return self.config.detr_decoder_config.num_queries

    @property
    def image_size(self) -> int:
        return self.config.vision_config.backbone_config.image_size

    @property
    def tokenizer(self) -> Sam3Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Sam3Tokenizer.from_open_clip()
        return self._tokenizer

    def tokenize(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Phrases -> (input_ids [N, 32], attention_mask [N, 32]) on the model's device."""
        input_ids, attention_mask = self.tokenizer(phrases)
        return input_ids.to(self.device), attention_mask.to(self.device)

    # ------------------------------------------------------------------ encoders
    @staticmethod
    def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drops the token columns past the longest phrase (SAM 3's tokenizer pads every phrase to 32).

        Every consumer of the text masks padding (the text encoder is causal, the fusion encoder, the
        decoder and the scoring mask it as keys), so the real tokens' features are the same up to float
        rounding, and a batch of short phrases (shapes: 6 tokens) no longer pays for 32."""
        if attention_mask.numel() == 0:
            return input_ids, attention_mask
        length = int(attention_mask.any(dim=0).nonzero().max()) + 1 if attention_mask.any() else 1
        return input_ids[:, :length], attention_mask[:, :length]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features [P, L', C] and mask [P, L'] bool, L' the longest phrase's tokens
        (``trim_text_padding``); each distinct phrase is encoded once."""
        input_ids, attention_mask = self.trim_text_padding(input_ids, attention_mask)
        tokens = torch.cat([input_ids, attention_mask], dim=1)
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        length = input_ids.shape[1]
        hidden = self.text_encoder(
            input_ids=unique[:, :length], attention_mask=unique[:, length:], return_dict=True
        ).last_hidden_state  # [U, L, text hidden]
        # index_select, not [inverse]: the backward of advanced indexing is index_put_(accumulate=True), whose
        # CPU kernel adds repeated rows with atomics from several threads in a racy order (not bitwise reproducible).
        return self.text_projection(hidden).index_select(0, inverse), attention_mask.bool()

    def encode_prompt(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor | None,
        box_labels: torch.Tensor | None,
        image_levels: list[torch.Tensor],
        image_pos: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens followed by the encoded exemplar boxes and the CLS token: [P, L + E + 1, C] and
        its mask [P, L + E + 1] bool (padding boxes, label -1, masked out). Only the text [P, L, C]
        when no pair has a box and ``encode_empty_geometry`` is off (transformers' behaviour)."""
        num_pairs = text.shape[0]
        has_boxes = boxes is not None and box_labels is not None and bool((box_labels >= 0).any())
        if not (has_boxes or self.encode_empty_geometry):
            return text, text_mask
        if boxes is None or box_labels is None:
            boxes = text.new_zeros(num_pairs, 0, 4)
            box_labels = torch.zeros(num_pairs, 0, dtype=torch.long, device=text.device)
        cpu_autocast = text.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast:
            # transformers hands roi_align float16 for bfloat16 features, which torchvision's CPU
            # autocast kernel rejects; on the CPU the (small) exemplar encoder runs in float32.
            image_levels, image_pos = [x.float() for x in image_levels], [x.float() for x in image_pos]
        with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
            return self.append_geometry(text, text_mask, boxes.float() if cpu_autocast else boxes.to(text.dtype),
                                        box_labels, image_levels, image_pos)

    def append_geometry(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: torch.Tensor,
        box_labels: torch.Tensor,
        image_levels: list[torch.Tensor],
        image_pos: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exemplar encoder's tokens (E boxes, then its CLS) appended to the text: [P, L + E + 1, C]
        and the mask [P, L + E + 1] bool. ``boxes`` [P, E, 4] normalised cxcywh (E may be 0) in the
        dtype the encoder runs in, ``box_labels`` [P, E]: 1 positive, 0 negative, -1 padding."""
        geometry = self.geometry_encoder(
            box_embeddings=boxes,
            box_mask=box_labels >= 0,
            box_labels=box_labels.clamp(min=0),
            img_feats=tuple(image_levels),
            img_pos_embeds=tuple(image_pos),
        )
        prompt = torch.cat([text, geometry.last_hidden_state], dim=1)
        return prompt, torch.cat([text_mask, geometry.attention_mask.bool()], dim=1)

    def encode_fusion(
        self, features: torch.Tensor, pos: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """DETR encoder: image tokens [P, N, C] attend to the prompt. Returns memory, its pos, (H, W)."""
        encoder = self.detr_encoder
        flat, pos_flat, _ = encoder._prepare_multilevel_features([features], [pos])
        mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=flat, attention_mask=prompt_mask, encoder_hidden_states=prompt
        )
        hidden = flat
        for layer in encoder.layers:
            step = partial(layer, prompt_feats=prompt, vision_pos_encoding=pos_flat, prompt_cross_attn_mask=mask)
            use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            hidden = checkpoint(step, hidden, use_reentrant=False) if use_ckpt else step(hidden)
        return hidden, pos_flat, (features.shape[-2], features.shape[-1])

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> dict[str, Any]:  # type: ignore[override]
        num_images = batch.images.shape[0]
        vision = self.vision_encoder(batch.images)
        # As transformers does: the 0.5x FPN level is dropped and the DETR encoder reads the 1x level.
        pair_image = batch.pair_image
        levels = [level.index_select(0, pair_image) for level in vision.fpn_hidden_states[:-1]]  # [P, C, h_i, w_i]; see encode_text
        pos = [p[pair_image] if p.shape[0] == num_images else p.expand(len(pair_image), -1, -1, -1)
               for p in vision.fpn_position_encoding[:-1]]

        text, text_mask = self.encode_text(batch.input_ids, batch.attention_mask)
        denoising = None
        if self.training and self.denoising is not None and batch.targets:
            packed = PackedTargets.from_list(batch.targets, device=batch.images.device)
            denoising = make_denoising_queries(packed, self.denoising, num_learned_queries=self.num_queries)
        return self.detect(levels, pos, text, text_mask, batch.exemplar_boxes, batch.exemplar_labels,
                           denoising=denoising)

    def detect(
        self,
        levels: list[torch.Tensor],
        pos: list[torch.Tensor],
        text: torch.Tensor,
        text_mask: torch.Tensor,
        exemplar_boxes: torch.Tensor | None = None,
        exemplar_labels: torch.Tensor | None = None,
        *,
        denoising: DenoisingQueries | None = None,
    ) -> dict[str, Any]:
        """Everything after the image and text encoders, per (image, phrase) pair: prompt, fusion,
        decoder, heads. ``levels``/``pos``: the FPN levels the detector reads and their position
        encodings, one row per pair; ``text`` [P, L, C] projected, ``text_mask`` [P, L] bool.
        ``denoising``: training-only denoising queries, whose outputs come back under ``"dn"``."""
        prompt, prompt_mask = self.encode_prompt(text, text_mask, exemplar_boxes, exemplar_labels, levels, pos)
        memory, memory_pos, shape = self.encode_fusion(levels[-1], pos[-1], prompt, prompt_mask)

        dac = self.dac and self.training
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        states = run_decoder(
            self.detr_decoder,
            vision_features=memory,
            vision_pos=memory_pos,
            text_features=prompt,
            text_mask=prompt_mask,
            spatial_shape=shape,
            dac=dac,
            activation_checkpointing=use_ckpt,
            denoising=denoising,
        )
        logits = self.dot_product_scoring(
            decoder_hidden_states=states.hidden, text_features=prompt, text_mask=prompt_mask
        ).squeeze(-1)  # [layers, P, copies * Q]
        q = self.num_queries
        one, many = slice(0, q), slice(q, 2 * q)
        learned = (2 if dac else 1) * q  # the denoising queries follow
        if denoising is not None:
            dn = slice(learned, learned + denoising.num_queries)
            out_dn = {
                "pred_logits": logits[-1, :, dn], "pred_boxes": states.boxes[-1, :, dn], "indices": denoising.indices,
                "aux_outputs": [{"pred_logits": logits[i, :, dn], "pred_boxes": states.boxes[i, :, dn]}
                                for i in range(len(logits) - 1)],
            }
        out: dict[str, Any] = {
            "pred_logits": logits[-1, :, one],
            "pred_boxes": states.boxes[-1, :, one],
            "presence_logit": states.presence_logits[-1],
            "aux_outputs": [
                {"pred_logits": logits[i, :, one], "pred_boxes": states.boxes[i, :, one],
                 "presence_logit": states.presence_logits[i]}
                for i in range(len(logits) - 1)
            ],
        }
        if dac:
            out["o2m"] = {
                "pred_logits": logits[-1, :, many],
                "pred_boxes": states.boxes[-1, :, many],
                "aux_outputs": [
                    {"pred_logits": logits[i, :, many], "pred_boxes": states.boxes[i, :, many]}
                    for i in range(len(logits) - 1)
                ],
            }
        if denoising is not None:
            out["dn"] = out_dn
        if self.train_masks or not self.training:
            # The pixel decoder works at 4x the token grid per pair (288 x 288 x 256 at 1008 px): with
            # activation checkpointing it is recomputed in backward like the transformer layers.
            decode = partial(checkpoint, self.mask_decoder, use_reentrant=False) if use_ckpt else self.mask_decoder
            masks = decode(
                decoder_queries=states.hidden[-1, :, :learned],  # no masks for denoising queries
                backbone_features=levels,
                encoder_hidden_states=memory,
                prompt_features=prompt,
                prompt_mask=prompt_mask,
            )
            out["pred_masks"], out["semantic_seg"] = masks.pred_masks[:, one], masks.semantic_seg
            if dac:
                out["o2m"]["pred_masks"] = masks.pred_masks[:, many]
        return out

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> Sam3Detector:  # type: ignore[override]
        """Load an HF-format checkpoint directory (config.json + safetensors; never a hub).

        Reads the released ``facebook/sam3`` layout (a video config whose ``detector_config`` is the
        detector, weights under ``detector_model.``; tracker weights are skipped) and directories
        written by :meth:`save_pretrained` or ``tools/convert_checkpoint.py`` (Meta's ``sam3.pt``).
        Its tokenizer files are used when present. Missing or unexpected keys and wrong shapes fail
        with a message that names them. ``kwargs`` go to the constructor: ``dac``,
        ``activation_checkpointing``, ``encode_empty_geometry`` (default True, Meta's behaviour), ...
        """
        directory = checkpoint_io.check_directory(directory)
        config = checkpoint_io.read_config(directory)
        tokenizer = kwargs.pop("tokenizer", None) or Sam3Tokenizer.from_dir_or_open_clip(directory)
        kwargs.setdefault("init", "transformers")  # never drawn: the loader builds on the meta device
        # transformers' own loader: it builds the model on the meta device (no random init of weights that
        # are overwritten next: 840 M at the released size), reads sharded files, strips the released
        # layout's ``detector_model.`` prefix and skips its tracker weights (Sam3Model's base_model_prefix
        # and _keys_to_ignore_on_load_unexpected). Its strictness is not ours: a missing key is initialised
        # at random with a warning and a misshapen one raises a generic error after a printed table. So it
        # only reports them (ignore_mismatched_sizes, output_loading_info), and we fail with one message.
        detector, info = super().from_pretrained(
            directory, config=config, tokenizer=tokenizer, dtype=torch.float32, local_files_only=True,
            ignore_mismatched_sizes=True, output_loading_info=True, **kwargs,
        )
        problems = checkpoint_io.loading_problems(info)
        if problems:
            raise KeyError(checkpoint_io.mismatch_message(directory, problems))
        detector.freeze_unused_parameters()  # the loaded weights are new Parameters, all requiring grad
        return detector.train()  # transformers hands back eval mode; a module starts in train mode

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:  # type: ignore[override]
        """config.json + model.safetensors (readable by ``transformers.Sam3Model.from_pretrained``) + tokenizer."""
        super().save_pretrained(str(directory), **kwargs)
        self.tokenizer.save_pretrained(directory)


def build_detector(preset: str = "tiny", *, dac: bool = True, activation_checkpointing: bool = False,
                   encode_empty_geometry: bool = True, init: Init = "meta",
                   denoising: DenoisingSettings | None = None, **overrides: Any) -> Sam3Detector:
    """A randomly initialised detector of a preset size (``tiny``, ``small``, ``sam3``).

    ``overrides`` go to :func:`sam3_train.model.presets.preset_config` (``image_size``,
    ``num_queries``, ``dropout`` or nested sub-config dicts).
    """
    return Sam3Detector(
        preset_config(preset, **overrides),
        dac=dac,
        activation_checkpointing=activation_checkpointing,
        encode_empty_geometry=encode_empty_geometry,
        init=init,
        denoising=denoising,
    )
