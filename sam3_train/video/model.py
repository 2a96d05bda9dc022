"""A detector trained here inside transformers' SAM 3 video model (``Sam3VideoModel``).

SAM 3's video model is the image detector (``detector_model``, a ``Sam3Model``) plus a SAM 2-style
tracker (``tracker_model`` and ``tracker_neck``) that reads the detector's ViT features. Built here:
the released checkpoint's tracker, untouched, with our detector's weights in ``detector_model``.

    video = build_video_model("checkpoints/sam3", "runs/x/checkpoints/last.ckpt")   # or an HF folder

The detector runs as it was trained: :class:`VideoDetector` answers the video model's call
(precomputed vision and text features) with our forward, so prompts get the exemplar encoder's CLS
token like Meta's SAM 3 (``encode_empty_geometry``; transformers' ``Sam3Model`` skips it for text),
and its detections equal :func:`sam3_train.model.postprocess` on the same frame (tested).

The tracker only fits a detector whose ViT output it was built for: image size, patch size, ViT
width, FPN width and FPN scales must equal the checkpoint's (:func:`check_fits`). Everything else
(text encoder, DETR sizes, number of queries) may differ.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Sam3VideoConfig, Sam3VideoModel
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoModel

from sam3_train.box_ops import cxcywh_to_xyxy
from sam3_train.data.batch import Batch
from sam3_train.model import Sam3Detector
from sam3_train.video import cpu_ops

log = logging.getLogger(__name__)

# (what the tracker reads, path in Sam3Config): the sizes a detector must share with the tracker.
TRACKER_FACING = (
    ("image_size", ("vision_config", "backbone_config", "image_size")),
    ("patch_size", ("vision_config", "backbone_config", "patch_size")),
    ("ViT hidden_size", ("vision_config", "backbone_config", "hidden_size")),
    ("FPN hidden_size", ("vision_config", "fpn_hidden_size")),
    ("FPN scale_factors", ("vision_config", "scale_factors")),
)


class DetectorMismatchError(ValueError):
    """A detector whose ViT output does not fit the video checkpoint's tracker."""


class VideoDetector(Sam3Detector):
    """:class:`Sam3Detector` that also takes ``Sam3VideoModel``'s detector call.

    ``forward(batch)`` is the training / image forward. ``forward(vision_embeds=, text_embeds=,
    attention_mask=)`` is what ``Sam3VideoModel.run_detection`` calls once per (frame, phrase):
    the rest of our eval forward on the precomputed features, returned as transformers'
    ``Sam3ImageSegmentationOutput`` (``pred_logits`` [1, Q], ``pred_boxes`` [1, Q, 4] normalised
    xyxy, ``pred_masks`` [1, Q, h, w], ``presence_logits`` [1, 1]).
    """

    def forward(self, batch: Batch | None = None, *, vision_embeds: Any = None, text_embeds: Any = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any):  # type: ignore[override]
        if batch is not None:
            return super().forward(batch)
        if vision_embeds is None or text_embeds is None or attention_mask is None:
            raise ValueError("VideoDetector takes a Batch, or vision_embeds + text_embeds + attention_mask.")
        # Sam3Detector's eval forward after its encoders (one-to-one queries only).
        levels = list(vision_embeds.fpn_hidden_states[:-1])  # the 0.5x level is dropped, as in training
        pos = list(vision_embeds.fpn_position_encoding[:-1])
        out = self.detect(levels, pos, text_embeds.pooler_output, attention_mask.bool())  # [1, L, C], [1, L]
        return Sam3ImageSegmentationOutput(
            pred_masks=out["pred_masks"], pred_boxes=cxcywh_to_xyxy(out["pred_boxes"]), pred_logits=out["pred_logits"],
            presence_logits=out["presence_logit"].unsqueeze(-1), semantic_seg=out["semantic_seg"],
        )

    @classmethod
    def from_detector(cls, detector: Sam3Detector) -> VideoDetector:
        """A copy of ``detector`` (weights, tokenizer, prompt mode) as a :class:`VideoDetector`, in eval mode."""
        video_detector = cls(detector.config, tokenizer=detector.tokenizer, init="transformers",
                             encode_empty_geometry=detector.encode_empty_geometry, dac=False)
        video_detector.load_state_dict(detector.state_dict(), strict=True)
        return video_detector.to(detector.device).eval()


class _FlatPointerTracker(Sam3TrackerVideoModel):
    """transformers' tracker with one fix: object pointers come out [T, B, 1, C] (4-D, and the
    memory concatenation fails) when the memory width equals the tracker width, which only small
    test models have (the released tracker: 256 vs 64). Flattened to [T, B, C] as in the other case."""

    def _process_object_pointers(self, temporal_offsets, pointer_tokens, max_object_pointers_to_use, batch_size,
                                 num_channels, device):
        pointers, pos = super()._process_object_pointers(
            temporal_offsets, pointer_tokens, max_object_pointers_to_use, batch_size, num_channels, device)
        if pointers is not None and pointers.dim() == 4:
            pointers = pointers.reshape(pointers.shape[0], batch_size, -1)
        return pointers, pos


class VideoModel(Sam3VideoModel):
    """transformers' ``Sam3VideoModel`` with one fix: the masks of a frame on which hot-start removes
    a masklet. ``build_outputs`` pairs the frame's tracker masks (one row per masklet tracked when the
    frame began) with the session's object ids *after* the removal, so every masklet listed after a
    removed one is given its predecessor's mask on that frame (Meta's code pairs them with the ids
    the frame began with). Here the rows are paired with the ids they were computed for."""

    def run_tracker_update_execution_phase(self, inference_session, frame_idx, det_out, tracker_update_plan,
                                           reverse=False):
        tracker_update_plan["tracked_obj_ids"] = list(inference_session.obj_ids)  # the tracker masks' rows
        return super().run_tracker_update_execution_phase(inference_session, frame_idx, det_out,
                                                          tracker_update_plan, reverse=reverse)

    def build_outputs(self, inference_session, det_out, tracker_low_res_masks_global, tracker_update_plan,
                      reconditioned_obj_ids=None):
        tracked = tracker_update_plan.get("tracked_obj_ids")
        removed = tracker_update_plan["obj_ids_newly_removed"]
        if tracked is None or not removed:
            return super().build_outputs(inference_session, det_out, tracker_low_res_masks_global,
                                         tracker_update_plan, reconditioned_obj_ids)
        rows = [i for i, obj_id in enumerate(tracked) if obj_id not in removed]
        current = inference_session.obj_ids
        inference_session.obj_ids = [tracked[i] for i in rows]  # what transformers reads as the masks' ids
        try:
            return super().build_outputs(inference_session, det_out, tracker_low_res_masks_global[rows],
                                         tracker_update_plan, reconditioned_obj_ids)
        finally:
            inference_session.obj_ids = current


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        config = config[key] if isinstance(config, dict) else getattr(config, key)
    return config


def check_fits(detector_config: Any, video_config: Sam3VideoConfig, *, detector_source: object = "the detector",
               video_source: object = "the video checkpoint") -> None:
    """Raise :class:`DetectorMismatchError` naming every tracker-facing size that differs."""
    expected = video_config.detector_config
    differing = []
    for name, path in TRACKER_FACING:
        ours, theirs = _get(detector_config, path), _get(expected, path)
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (
                list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            differing.append(f"{name} {ours} (tracker: {theirs})")
    if differing:
        raise DetectorMismatchError(
            f"Detector {detector_source} does not fit the tracker of {video_source}: " + "; ".join(differing)
            + ". The tracker reads the detector's ViT features, so these sizes must equal the checkpoint's: "
            "fine-tune from that checkpoint (model.pretrained) rather than from a preset."
        )


def read_video_config(directory: str | Path) -> Sam3VideoConfig:
    """The ``Sam3VideoConfig`` of a local video checkpoint folder, with a clear error for anything else."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"Video checkpoint {directory} has no config.json: pass a local folder in the facebook/sam3 layout "
            "(Sam3VideoModel.save_pretrained: config.json with detector_config and tracker_config, *.safetensors)."
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "sam3_video":
        raise ValueError(
            f"{config_file} describes a {model_type!r} model, not SAM 3's video model ('sam3_video'): pass the "
            "released video checkpoint (facebook/sam3 layout), which holds the tracker; a detector-only folder "
            "has none."
        )
    return Sam3VideoConfig.from_pretrained(directory)


def _vit_change(video: Sam3VideoModel, detector: Sam3Detector) -> float:
    """Largest relative change of any ViT weight of ``detector`` against the video checkpoint's detector."""
    theirs = dict(video.detector_model.vision_encoder.named_parameters())
    worst = 0.0
    for name, ours in detector.vision_encoder.named_parameters():
        ref = theirs[name].detach().float()
        diff = (ours.detach().float().to(ref.device) - ref).abs().max()
        worst = max(worst, float(diff / ref.abs().max().clamp(min=1e-12)))
    return worst


def build_video_model(video_checkpoint: str | Path, detector: str | Path | Sam3Detector | None = None, *,
                      device: str | torch.device = "cpu", hub_kernels: bool = False) -> VideoModel:
    """``Sam3VideoModel`` from a local video checkpoint, its ``detector_model`` replaced by ``detector``
    (a path for :func:`sam3_train.loading.load_detector`: an HF folder or a ``sam3-train fit`` ``.ckpt``; a
    detector; or None: the checkpoint's own detector, run our way).

    The tracker and its neck stay as released. A detector whose tracker-facing sizes differ is refused
    before any weight is read. ``hub_kernels``: see :func:`sam3_train.video.cpu_ops.install`.
    ``video.sam3_vit_change`` records the largest relative change of the detector's ViT weights
    against the checkpoint's (0 for a ViT frozen in fine-tuning): the tracker reads those features.
    """
    cpu_ops.install(hub_kernels=hub_kernels)
    config = read_video_config(video_checkpoint)
    if detector is None:
        detector = Sam3Detector.from_pretrained(video_checkpoint)
        source: object = f"{video_checkpoint} (its own detector)"
    elif isinstance(detector, (str, Path)):
        source = detector
        if Path(detector).is_dir():  # refuse before reading weights; a .ckpt is checked once loaded
            check_fits(_detector_config(detector), config, detector_source=detector, video_source=video_checkpoint)
        from sam3_train.loading import load_detector  # Lightning only for checkpoints of Lightning runs

        detector = load_detector(detector)
    else:
        source = type(detector).__name__
    check_fits(detector.config, config, detector_source=source, video_source=video_checkpoint)
    video = VideoModel.from_pretrained(video_checkpoint, config=config, dtype=torch.float32)
    if video.tracker_model.mem_dim == video.tracker_model.hidden_dim:
        video.tracker_model.__class__ = _FlatPointerTracker  # small test trackers only (see the class)
    change = _vit_change(video, detector)
    video.detector_model = VideoDetector.from_detector(detector)
    video.config.detector_config = video.detector_model.config
    video.sam3_vit_change = change
    if change > 0:
        log.info("The detector's ViT differs from %s's (largest relative weight change %.3g): the tracker reads the "
                 "fine-tuned features.", video_checkpoint, change)
    return video.to(device).eval()


def _detector_config(directory: str | Path) -> Any:
    """The ``Sam3Config`` of a detector folder, without reading its weights."""
    from sam3_train.model.checkpoint_io import check_directory, read_config

    return read_config(check_directory(directory))


def tiny_video_config(detector_config: Any, *, memory_layers: int = 1, **overrides: Any) -> Sam3VideoConfig:
    """A small ``Sam3VideoConfig`` around ``detector_config`` (e.g. the ``tiny`` preset's) for tests and
    demos: the tracker's width is the detector's FPN width, its grid the detector's token grid.
    ``overrides`` set video-level fields (``hotstart_delay``, ...)."""
    vision = detector_config.vision_config
    width = vision.fpn_hidden_size
    side = vision.backbone_config.image_size
    patch = vision.backbone_config.patch_size
    tracker = {
        "vision_config": vision.to_dict(),
        "prompt_encoder_config": {"hidden_size": width, "image_size": side, "patch_size": patch},
        "mask_decoder_config": {"hidden_size": width, "mlp_dim": 2 * width, "num_attention_heads": 4,
                                "iou_head_hidden_dim": width},
        "memory_attention_hidden_size": width, "memory_attention_num_layers": memory_layers,
        "memory_attention_feed_forward_hidden_size": 2 * width, "memory_encoder_hidden_size": width,
        "memory_encoder_output_channels": 64,  # transformers hard-codes 64 as the memory attention's key width
        "mask_downsampler_embed_dim": width, "memory_fuser_embed_dim": width,
        "memory_fuser_intermediate_dim": 2 * width, "image_size": side,
    }
    return Sam3VideoConfig(detector_config=detector_config.to_dict(), tracker_config=tracker,
                           low_res_mask_size=4 * (side // patch), **overrides)
