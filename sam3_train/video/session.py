"""Frame-by-frame propagation through ``Sam3VideoModel`` with bounded memory and delayed output.

transformers offers two ways to run its video model, and neither fits a long video on a budget:

- ``propagate_in_video_iterator`` wants the whole video preprocessed in the session up front
  (3 x S x S float32 per frame: 12 MB at 1008 px);
- streaming (``model(session, frame=...)``) turns hot-start removal off: it never removes an
  unconfirmed masklet, and it has no delayed output.

:func:`propagate` feeds one frame at a time into a :class:`StreamingSession` but calls the model in
its whole-video mode, so hot-start removal runs, and holds each frame's output back for
``hotstart_delay`` frames exactly as ``propagate_in_video_iterator`` does (the outputs equal that
iterator's on a video loaded whole: tested). After every frame the session is trimmed to what the
tracker can still read: no pixels of finished frames, the last ``max(num_maskmem,
max_object_pointers_in_encoder) - 1`` non-conditioning outputs per object (memory and object
pointers), the ``max_cond_frame_num`` latest conditioning outputs (the ones its memory attention
selects), no full-resolution masks of past frames, and per-frame bookkeeping of the current frame only.

One deliberate difference: transformers adds object pointers from *every* past conditioning frame
(re-conditioning adds one every ``recondition_every_nth_frame`` frames, so this grows without
bound); Meta's SAM 3 reads them from the selected ``max_cond_frame_num`` frames only, which is
what the trimmed session gives. The two agree until an object has more conditioning frames than that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import torch
from transformers import Sam3VideoConfig, Sam3VideoModel
from transformers.models.sam3_video.modeling_sam3_video import (
    Sam3VideoInferenceSession,
    Sam3VideoSegmentationOutput,
)

_DEFAULTS = Sam3VideoConfig()  # SAM 3's settings as transformers ships them


@dataclass(frozen=True)
class TrackingSettings:
    """The video model's detection and delayed-output settings; None keeps the checkpoint's value
    (SAM 3's defaults, from transformers' ``Sam3VideoConfig``, in brackets).

    Args:
        hotstart_delay: frames each output is held back, so masklets found unconfirmed within it are
            removed before anything of them is output [15]; 0 outputs every frame at once.
        hotstart_unmatch_thresh: a masklet born within the delay window and matched by no detection on
            this many frames is removed [8].
        hotstart_dup_thresh: a masklet born within the window that shares its detection with an older
            one on this many frames is removed as a duplicate [8].
        score_threshold_detection: detections scoring above this are matched to masklets [0.5].
        new_det_thresh: an unmatched detection scoring at least this starts a new masklet [0.7].
        det_nms_thresh: mask-IoU NMS among a frame's detections; 0 turns it off [0.1].
        recondition_every_nth_frame: every n-th frame, confident detections re-prompt the masklets
            they overlap [16]; 0 turns it off.
        max_num_objects: most masklets tracked at once [10000].
    """

    hotstart_delay: int | None = None
    hotstart_unmatch_thresh: int | None = None
    hotstart_dup_thresh: int | None = None
    score_threshold_detection: float | None = None
    new_det_thresh: float | None = None
    det_nms_thresh: float | None = None
    recondition_every_nth_frame: int | None = None
    max_num_objects: int | None = None

    @staticmethod
    def default(name: str) -> object:
        """SAM 3's value of setting ``name`` (transformers' ``Sam3VideoConfig`` default)."""
        return getattr(_DEFAULTS, name)

    def apply(self, model: Sam3VideoModel) -> dict[str, object]:
        """Set the given values on ``model`` (the attributes it reads; its config keeps the checkpoint's
        values, which None stands for); returns every setting's value in effect."""
        values = {f.name: getattr(model.config, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                  for f in fields(self)}
        if values["hotstart_delay"] > 0:
            for name in ("hotstart_unmatch_thresh", "hotstart_dup_thresh"):
                if values[name] > values["hotstart_delay"]:
                    raise ValueError(f"{name} ({values[name]}) must not exceed hotstart_delay "
                                     f"({values['hotstart_delay']}): a masklet is judged within the delay window.")
        for name, value in values.items():
            if value is not None and (value < 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(model, name, value)
        return values


class StreamingSession(Sam3VideoInferenceSession):
    """A ``Sam3VideoInferenceSession`` filled one frame at a time, of a video of known length.

    ``num_frames`` reports the whole video's length (the tracker reads it to size its window of
    object pointers) while only the frame being processed is held (see :meth:`trim`).
    """

    def __init__(self, *, num_frames: int, height: int, width: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(video=None, video_height=height, video_width=width, inference_device=device,
                         inference_state_device=device, video_storage_device=device, dtype=dtype)
        self.total_frames = num_frames

    @property
    def num_frames(self) -> int:  # type: ignore[override]
        return self.total_frames

    def add_phrases(self, phrases: list[str],
                    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Register the noun phrases; ``tokenize(list) -> (input_ids [N, 32], attention_mask [N, 32])``."""
        input_ids, attention_mask = tokenize(phrases)
        for i, phrase in enumerate(phrases):
            prompt_id = self.add_prompt(phrase)
            self.prompt_input_ids[prompt_id] = input_ids[i : i + 1].to(self.inference_device)
            self.prompt_attention_masks[prompt_id] = attention_mask[i : i + 1].to(self.inference_device)

    def trim(self, frame_idx: int, *, non_cond_window: int, cond_frames: int | None, hotstart_delay: int,
             unmatch_thresh: int, dup_thresh: int) -> None:
        """Drop what the model can no longer read once frame ``frame_idx`` is done (module docstring)."""
        for idx in [i for i in self.processed_frames or {} if i <= frame_idx]:
            del self.processed_frames[idx]
        oldest = frame_idx - non_cond_window + 1  # the next frame reads frames >= oldest
        for obj_idx, outputs in self.output_dict_per_obj.items():
            non_cond, cond = outputs["non_cond_frame_outputs"], outputs["cond_frame_outputs"]
            for idx in [i for i in non_cond if i < oldest]:
                del non_cond[idx]
            for idx in sorted(cond)[:-cond_frames] if cond_frames is not None else ():
                del cond[idx]
            for out in (*non_cond.values(), *cond.values()):
                out.pop("high_res_masks", None)  # read on their own frame only (memory encoding)
                out.pop("pred_masks", None)
            tracked = self.frames_tracked_per_obj.get(obj_idx, {})
            for idx in [i for i in tracked if i < oldest]:
                del tracked[idx]
            inputs = self.mask_inputs_per_obj.get(obj_idx, {})
            for idx in [i for i in inputs if i <= frame_idx]:
                del inputs[idx]
        for per_frame in (self.obj_id_to_tracker_score_frame_wise, self.suppressed_obj_ids):
            for idx in [i for i in per_frame if i <= frame_idx]:
                del per_frame[idx]
        # Past the hot-start window an object is never removed by these counts again: keep their tail.
        settled = {obj for obj, first in self.obj_first_frame_idx.items() if first <= frame_idx - hotstart_delay}
        for obj in settled & set(self.unmatched_frame_inds):
            self.unmatched_frame_inds[obj] = self.unmatched_frame_inds[obj][-unmatch_thresh:]
        for pair in [p for p in self.overlap_pair_to_frame_inds if p[1] in settled]:
            self.overlap_pair_to_frame_inds[pair] = self.overlap_pair_to_frame_inds[pair][-dup_thresh:]

    def held_bytes(self) -> int:
        """Bytes of every tensor the session holds (frames, features, per-object outputs, inputs)."""
        seen: set[int] = set()

        def size(value: object) -> int:
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage().data_ptr()
                if key in seen:
                    return 0
                seen.add(key)
                return value.untyped_storage().nbytes()
            if isinstance(value, dict):
                return sum(size(v) for v in value.values())
            if isinstance(value, (list, tuple, set)):
                return sum(size(v) for v in value)
            return 0

        return sum(size(v) for v in vars(self).values()) + size(self.cache._vision_features)


@dataclass
class DelayedFrame:
    """One frame's output, released ``hotstart_delay`` frames after it was computed.

    ``output``: transformers' ``Sam3VideoSegmentationOutput`` of the frame (low-res masklet logits
    per object id, scores); ``hidden``: ids not to show on it (suppressed on the frame, or removed by
    hot-start by the time of release); ``phrases``: object id -> its noun phrase.
    """

    frame_idx: int
    output: Sam3VideoSegmentationOutput
    hidden: frozenset[int]
    phrases: dict[int, str]


def propagate(model: Sam3VideoModel, session: StreamingSession,
              frames: Iterable[tuple[int, torch.Tensor]]) -> Iterator[DelayedFrame]:
    """Run ``model`` over ``frames`` ((index, pixels [3, S, S] normalised), in order from 0) and yield
    each frame's :class:`DelayedFrame` ``model.hotstart_delay`` frames later (the rest after the last
    frame), as ``propagate_in_video_iterator`` does; the session is trimmed after each frame."""
    tracker = model.tracker_model.config
    window = max(tracker.num_maskmem, tracker.max_object_pointers_in_encoder) - 1
    cond_frames = tracker.max_cond_frame_num if tracker.max_cond_frame_num > 0 else None  # -1: all
    delay = model.hotstart_delay
    pending: deque[Sam3VideoSegmentationOutput] = deque()
    phrases: dict[int, str] = {}

    def release() -> DelayedFrame:
        done = pending.popleft()
        hidden = set(done.suppressed_obj_ids or ()) | session.hotstart_removed_obj_ids
        return DelayedFrame(done.frame_idx, done, frozenset(hidden), {i: phrases[i] for i in done.obj_id_to_mask})

    for expected, (frame_idx, pixels) in enumerate(frames):
        if frame_idx != expected or frame_idx >= session.num_frames:
            raise ValueError(f"Frame {frame_idx} came as frame number {expected} of a {session.num_frames}-frame "
                             "session: frames must come in order from 0, as many as the session's num_frames.")
        session.add_new_frame(pixels, frame_idx)
        with torch.inference_mode():
            out = model(inference_session=session, frame_idx=frame_idx)  # whole-video mode: hot-start removal on
        for obj_id in out.obj_id_to_mask:
            if obj_id not in phrases:
                phrases[obj_id] = session.prompts[session.obj_id_to_prompt_id[obj_id]]
        session.trim(frame_idx, non_cond_window=window, cond_frames=cond_frames, hotstart_delay=max(delay, 0),
                     unmatch_thresh=model.hotstart_unmatch_thresh, dup_thresh=model.hotstart_dup_thresh)
        if delay > 0:
            session.hotstart_removed_obj_ids.update(out.removed_obj_ids)
        pending.append(out)
        if len(pending) >= max(delay, 1):
            yield release()
    while pending:
        yield release()
