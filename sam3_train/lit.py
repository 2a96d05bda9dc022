"""``Sam3LitModule``: the SAM 3 detector and its objective as a LightningModule.

    sam3-train fit --config configs/shapes_tiny.yaml

Training: detector forward on a pair batch (DAC halves on), ``Sam3Criterion`` terms logged as
``train/<term>``, their weighted total as ``train/loss``. Validation and test: eval-mode forward,
post-processing to the input frame, cgF1 (masks and boxes), COCO mAP, presence accuracy and the top
query's box localisation (``top_box_iou_median``, ...) logged as ``val/<name>`` / ``test/<name>``;
with named validation sets (``data.val_sets``) each set has its own metric objects and logs
``val/<set>/<name>``. Prediction returns post-processed detections per pair.

Non-finite steps: when the loss of any micro-batch or any gradient is NaN or infinite (on any rank),
the optimiser step is skipped, counted as ``train/skipped_steps`` and named in a warning; the module
adds :class:`~sam3_train.nonfinite.SkipNonFinite` to its Trainer (``configure_callbacks``) unless one is
there, and ties a NaN loss to non-finite outputs so that backward still runs on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim.lr_scheduler import LambdaLR

from sam3_train.data.batch import Batch
from sam3_train.data.frame import InputFrame
from sam3_train.finetune import SourceShare
from sam3_train.losses import Sam3Criterion
from sam3_train.metrics import CGF1, CocoMeanAveragePrecision, PresenceAccuracy, TopQueryLocalisation
from sam3_train.model import (
    ImageSizeError,
    Init,
    Sam3Detector,
    build_detector,
    postprocess,
    set_vit_drop_path,
    state_mismatch,
)
from sam3_train.model import lora as lora_ckpt
from sam3_train.model.denoising import DenoisingSettings
from sam3_train.model.lora import LoraSettings, apply_lora, base_fingerprint
from sam3_train.nonfinite import SkipNonFinite
from sam3_train.optim import LRSchedule, Schedule, param_groups
from sam3_train.resume import ExactResume

log = logging.getLogger(__name__)


class Sam3LitModule(L.LightningModule):
    """SAM 3 detector + objective + metrics.

    Args:
        preset: model size when not loading a checkpoint (``tiny``, ``small``, ``sam3``).
        image_size: input side S (linked from the data module's ``image_size`` by the CLI).
        model_overrides: passed to ``build_detector`` (``image_size``, ``num_queries``, ``dropout``,
            nested sub-config dicts).
        pretrained: local HF-format checkpoint directory (``facebook/sam3`` layout) to fine-tune from;
            overrides ``preset``.
        init: initialisation when training from scratch: ``meta`` (Meta's SAM 3 code, the default),
            ``meta_grid`` (with the reference boxes' centres on a grid), ``xavier`` or ``transformers``
            (see ``Sam3Detector``); ignored with ``pretrained``.
        dac: DAC-DETR one-to-many half in training.
        encode_empty_geometry: run the exemplar-box encoder for text-only prompts too, adding its CLS
            token, as Meta's SAM 3 trains and predicts (the released weights expect it); False equals
            transformers' ``Sam3Model``, which skips it without boxes.
        drop_path: ViT stochastic depth, growing linearly over the blocks to this rate (Meta: 0.1).
        activation_checkpointing: recompute ViT, DETR-encoder and decoder activations in backward.
        freeze_vision, freeze_text: keep those encoders fixed (with ``lora``: their adapters too).
        lora: train LoRA adapters (peft) instead of the whole model, on top of the base that
            ``pretrained`` (or ``preset``) builds; checkpoints then hold only the trained tensors and
            the base's fingerprint, and load on the same base (``sam3_train/model/lora.py``).
        denoising: denoising queries in training (DN-DETR with DINO's negatives), a measured
            departure for training from scratch (``sam3_train/model/denoising.py``); None: SAM 3.
        criterion: the objective (default: SAM 3's segmentation fine-tuning weights).
        lr, lr_vision, lr_text: base learning rates of the transformer/heads, vision and text groups.
        layer_decay: vision learning rate decay per ViT block towards the input.
        weight_decay: AdamW weight decay (none on biases and LayerNorms, as Meta's configs).
        schedule, warmup_steps, cooldown_steps, timescale: learning-rate schedule (see optim.py).
        eval_score_threshold: detections kept for mAP (cgF1 applies its own 0.5).
        max_detections: detections per pair kept for prediction and mAP (cgF1 also reads every
            detection above its 0.5 threshold, as Meta's evaluator scores every query).
        max_consecutive_skipped_steps: optimiser steps in a row skipped for a non-finite loss or
            gradient after which training stops with an error (None: never stop); the limit of the
            ``SkipNonFinite`` callback this module adds.
    """

    def __init__(
        self,
        *,
        preset: str = "tiny",
        image_size: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        pretrained: str | None = None,
        init: Init = "meta",
        dac: bool = True,
        encode_empty_geometry: bool = True,
        drop_path: float = 0.0,
        activation_checkpointing: bool = False,
        freeze_vision: bool = False,
        freeze_text: bool = False,
        lora: LoraSettings | None = None,
        denoising: DenoisingSettings | None = None,
        criterion: Sam3Criterion | None = None,
        lr: float = 8e-5,
        lr_vision: float = 2.5e-5,
        lr_text: float = 5e-6,
        layer_decay: float = 0.9,
        weight_decay: float = 0.1,
        schedule: Schedule = "inverse_sqrt",
        warmup_steps: int = 100,
        cooldown_steps: int = 0,
        timescale: int | None = None,
        eval_score_threshold: float = 0.05,
        max_detections: int = 100,
        max_consecutive_skipped_steps: int | None = 10,
    ):
        super().__init__()
        if max_consecutive_skipped_steps is not None and max_consecutive_skipped_steps < 1:
            raise ValueError(f"max_consecutive_skipped_steps must be at least 1 or None, got {max_consecutive_skipped_steps}")
        # load_from_checkpoint hands back the plain dict that the hyper-parameters keep (weights-only loadable).
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        lora = self.lora.to_dict() if self.lora is not None else None
        denoising_settings = DenoisingSettings(**denoising) if isinstance(denoising, dict) else denoising
        denoising = denoising_settings.to_dict() if denoising_settings is not None else None
        self.save_hyperparameters(ignore=["criterion"])
        if pretrained:
            self.detector: Sam3Detector = Sam3Detector.from_pretrained(
                pretrained, dac=dac, activation_checkpointing=activation_checkpointing,
                encode_empty_geometry=encode_empty_geometry,
            )
            if image_size is not None and image_size != self.detector.image_size:
                raise ValueError(
                    f"data.image_size is {image_size} but the checkpoint {pretrained} was built for "
                    f"{self.detector.image_size} px: set data.image_size: {self.detector.image_size}."
                )
        else:
            overrides = dict(model_overrides or {})
            if image_size is not None:
                overrides["image_size"] = image_size
            try:
                self.detector = build_detector(
                    preset, dac=dac, activation_checkpointing=activation_checkpointing, init=init,
                    encode_empty_geometry=encode_empty_geometry, **overrides
                )
            except ImageSizeError as exn:
                raise ValueError(f"data.image_size={exn.image_size} does not fit the {preset!r} preset: {exn}") from None
        set_vit_drop_path(self.detector.vision_encoder.backbone.layers, drop_path)
        self.detector.denoising = denoising_settings
        self.base_fingerprint: str | None = None
        if self.lora is not None:
            if not pretrained:
                log.warning("LoRA on a randomly initialised %r base (no model.pretrained): its adapter checkpoints load "
                            "only where the same seed rebuilds the same base.", preset)
            self.base_fingerprint = base_fingerprint(self.detector)
            apply_lora(self.detector, self.lora)
        # The text projection is part of Meta's language backbone (its "resizer"): it freezes with the text.
        for flag, module in ((freeze_vision, self.detector.vision_encoder), (freeze_text, self.detector.text_encoder),
                             (freeze_text, self.detector.text_projection)):
            if flag:
                module.requires_grad_(False)
        self.criterion = criterion or Sam3Criterion()
        # A box-only objective never runs the mask decoder in training (eval still predicts masks): no pixel-
        # decoder activations, and the weights only masks read are frozen (no optimiser state, nothing for
        # DDP to wait for).
        self.detector.train_masks = self.criterion.needs_masks
        if not self.criterion.needs_masks:
            self.detector.freeze_mask_path()
        self.val_metrics = self._metrics()
        self.test_metrics = self._metrics()
        # One metric set per named validation set (data.val_sets), made in setup() once the names are
        # known; empty: the single set of val_metrics, logged as val/<name>.
        self.val_set_metrics = torch.nn.ModuleDict()

    def setup(self, stage: str) -> None:
        """Refuse data at another resolution than the model's (e.g. a --ckpt_path whose settings
        replaced model.image_size while data.image_size stayed); make a metric set per named
        validation set (metric states are not persistent: checkpoints do not change)."""
        datamodule = self.trainer.datamodule if self._trainer else None
        names = getattr(datamodule, "val_set_names", None)
        if names and list(self.val_set_metrics.keys()) != list(names):
            self.val_set_metrics = torch.nn.ModuleDict({name: self._metrics() for name in names}).to(self.device)
        data_size = getattr(datamodule, "image_size", None)
        if isinstance(data_size, int) and data_size != self.detector.image_size:
            raise ValueError(
                f"data.image_size is {data_size} px but the model takes {self.detector.image_size} px images "
                f"(preset {self.hparams.preset!r}{', from the checkpoint' if self.trainer.ckpt_path else ''}): "
                f"images would be {'larger' if data_size > self.detector.image_size else 'smaller'} than the "
                f"configured resolution. Set data.image_size: {self.detector.image_size}."
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """What this module's training relies on, in every Trainer (the CLI's, the engine's, a test's),
        unless the Trainer has its own: exact resumption and the skipping of non-finite steps (which the
        NaN loss of ``training_step`` counts on)."""
        present = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        callbacks: list[L.Callback] = []
        if not any(issubclass(t, ExactResume) for t in present):
            callbacks.append(ExactResume())
        if not any(issubclass(t, SkipNonFinite) for t in present):
            callbacks.append(SkipNonFinite(max_consecutive=self.hparams.max_consecutive_skipped_steps,
                                           limit_setting="model.max_consecutive_skipped_steps"))
        sources = getattr(self.trainer.datamodule, "source_names", None) if self._trainer is not None else None
        if sources and not any(issubclass(t, SourceShare) for t in present):
            callbacks.append(SourceShare(names=sources))
        return callbacks

    @staticmethod
    def _metrics() -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict(
            {"cgf1": CGF1(), "map": CocoMeanAveragePrecision(), "presence": PresenceAccuracy(),
             "localisation": TopQueryLocalisation()}
        )

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Batch) -> dict[str, Any]:
        return self.detector(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        outputs = self.detector(batch)
        size = batch.num_pairs
        tensors = [t for t in _tensors(outputs) if t.is_floating_point()]
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            # The matchers cannot assign targets to NaN predictions. A NaN loss tied to every output still
            # runs backward (under DDP every rank must reach the gradient all-reduce); SkipNonFinite skips the step.
            tied = [t.sum() for t in tensors if t.requires_grad]
            if not tied:  # nothing to train through: no backward, which SkipNonFinite counts as non-finite
                return None
            loss = torch.stack(tied).sum() * float("nan")
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
            return loss
        terms = self.criterion(outputs, batch.targets)
        loss = self.criterion.weighted_total(terms, num_pairs=batch.num_pairs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        if self._logs_this_step():
            self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=size)
            self.log("train/pairs", float(size), batch_size=size)
            skipped = getattr(self.trainer.datamodule, "skipped_samples", None) if self._trainer else None
            if skipped is not None:
                self.log("train/skipped_samples", float(skipped), batch_size=size)
        return loss

    def _logs_this_step(self) -> bool:
        """Whether the loggers write this step's values (every ``log_every_n_steps``, as Lightning
        decides it). Per-term losses, learning rates and counters are handed to ``self.log`` only then:
        its ~45 calls a step were ~9% of a small CPU step (docs/benchmarks.md); ``train/loss`` (the
        progress bar) goes every step. Asked before the optimiser step (``SkipNonFinite`` asks the same
        after it, when ``global_step`` has moved past the batch)."""
        if self._trainer is None:
            return True
        every = max(1, self.trainer.log_every_n_steps)
        return (self.trainer.global_step + 1) % every == 0 or self.trainer.should_stop

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._logs_this_step():
            for i, group in enumerate(self.optimizers().param_groups):
                self.log(f"lr/{group.get('name', i)}", group["lr"], batch_size=1)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip under bf16-mixed too. Lightning's mixed-precision plugin refuses to clip for an optimiser
        that unscales inside its step (the fused AdamW), which only fp16's GradScaler needs; bf16-mixed
        has no scaler, so its gradients are the true ones and are clipped as under fp32."""
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _evaluate(self, batch: Batch, metrics: torch.nn.ModuleDict) -> list[dict[str, torch.Tensor]]:
        outputs = self.detector(batch)
        # Every detection cgF1 reads (>= its 0.5) is kept, uncapped as in Meta's evaluator; mAP keeps its top 100.
        preds = postprocess(outputs, batch, score_threshold=self.hparams.eval_score_threshold,
                            max_detections=self.hparams.max_detections, keep_above=metrics["cgf1"].score_threshold)
        targets = eval_targets(batch)
        metrics["cgf1"].update(preds, cgf1_targets(batch, targets))
        metrics["map"].update(preds, targets)
        metrics["presence"].update(outputs["presence_logit"].sigmoid(), targets)
        # Whether boxes localise: every pair's top query, whatever its score (its box and mask only).
        top = postprocess(outputs, batch, score_threshold=0.0, max_detections=1)
        metrics["localisation"].update(top, cgf1_targets(batch, targets))
        return preds

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self._val_metric_set(dataloader_idx))

    def _val_metric_set(self, dataloader_idx: int) -> torch.nn.ModuleDict:
        """The metric set of validation dataloader ``dataloader_idx`` (named sets in data.val_sets order)."""
        if len(self.val_set_metrics) == 0:
            return self.val_metrics
        return list(self.val_set_metrics.values())[dataloader_idx]

    def test_step(self, batch: Batch, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        return self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, metrics: torch.nn.ModuleDict, stage: str) -> None:
        values: dict[str, Any] = {}
        for metric in metrics.values():
            values.update(metric.compute())
            metric.reset()
        self.log_dict({f"{stage}/{k}": float(v) for k, v in values.items()}, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        if len(self.val_set_metrics) == 0:
            self._log_metrics(self.val_metrics, "val")
        for name, metrics in self.val_set_metrics.items():
            self._log_metrics(metrics, f"val/{name}")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        outputs = self.detector(batch)
        preds = postprocess(outputs, batch, original_sizes=batch.original_sizes,
                            score_threshold=self.hparams.eval_score_threshold,
                            max_detections=self.hparams.max_detections)
        return {"batch": batch, "predictions": preds}

    # ------------------------------------------------------------------ checkpoints
    def trained_keys(self) -> set[str]:
        """State-dict keys of the tensors this run trains (with LoRA, all that its checkpoints hold)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """With ``lora`` a state dict need only hold the trained tensors: the base's come from the base
        model (``strict`` still refuses a missing trained tensor or an unexpected key)."""
        if self.lora is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        return lora_ckpt.adapter_load_keys(keys, trained=self.trained_keys(), strict=strict)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora is not None:
            lora_ckpt.save_adapters(checkpoint, trained=self.trained_keys(), pretrained=self.hparams.pretrained,
                                    fingerprint=self.base_fingerprint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming the differing settings, a checkpoint whose tensors do not fit this model."""
        path = getattr(self._trainer, "ckpt_path", None)
        source = f"Checkpoint {path}" if path else "The checkpoint"
        expected = self.state_dict()
        if self.lora is not None:
            lora_ckpt.check_adapter_base(checkpoint, fingerprint=self.base_fingerprint,
                                         pretrained=self.hparams.pretrained, source=source)
            trained = self.trained_keys()
            expected = {k: v for k, v in expected.items() if k in trained}
        problems = state_mismatch(expected, checkpoint.get("state_dict", {}))
        if problems:
            theirs = checkpoint.get("hyper_parameters") or {}
            differing = [f"{k}: checkpoint {theirs[k]!r}, this run {self.hparams.get(k)!r}"
                         for k in ("preset", "image_size", "model_overrides", "pretrained", "lora", "freeze_vision",
                                   "freeze_text")
                         if k in theirs and theirs[k] != self.hparams.get(k)]
            raise KeyError(
                f"{source} does not fit the model"
                + (f": it was written with other model settings ({'; '.join(differing)})" if differing else "")
                + ". Run with the model settings of the run that wrote it (model.preset, data.image_size, "
                "model.model_overrides), or start a new run from weights with model.pretrained. Details: "
                + "; ".join(problems) + "."
            )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        groups = param_groups(self.detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text,
                              layer_decay=h.layer_decay, weight_decay=h.weight_decay)
        # fused: one kernel per step instead of ~10 passes per parameter tensor (the tiny preset's
        # AdamW was ~10% of a CPU step: docs/benchmarks.md).
        optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.999), fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        factor = LRSchedule(total_steps=total, kind=h.schedule, warmup_steps=h.warmup_steps,
                            cooldown_steps=h.cooldown_steps, timescale=h.timescale)
        scheduler = LambdaLR(optimizer, lr_lambda=factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _tensors(value: Any):
    """Every tensor in a nest of dicts, lists and tuples (the detector's outputs)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def eval_targets(batch: Batch) -> list[dict[str, Any]]:
    """Batch targets in the metric's frame: the image content inside the input, pixels, xyxy."""
    return [_in_content_frame(target, InputFrame.of(batch, int(batch.pair_image[p])))
            for p, target in enumerate(batch.targets)]


def cgf1_targets(batch: Batch, targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``eval_targets`` as SA-Co scores them: the source's exhaustive flag (crowd regions are ignored,
    the pair still scored) and the other annotators' sets (``extra_sets``, SA-Co Gold)."""
    out = []
    for p, (raw, target) in enumerate(zip(batch.targets, targets)):
        frame = InputFrame.of(batch, int(batch.pair_image[p]))
        extra = [_in_content_frame(s, frame) for s in raw.get("extra_sets", [])]
        out.append({**target, "exhaustive": bool(raw.get("eval_exhaustive", raw["exhaustive"])), "extra_sets": extra})
    return out


def _in_content_frame(target: dict[str, Any], frame: InputFrame) -> dict[str, Any]:
    """One annotation set (masks [n, S, S], normalised cxcywh boxes) in the content's pixels."""
    return {"masks": frame.crop_content(target["masks"]), "boxes": frame.boxes_to_original(target["boxes"]),
            "exhaustive": bool(target["exhaustive"])}
