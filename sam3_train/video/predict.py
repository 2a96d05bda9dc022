"""``sam3-train predict-video``: masklets of noun phrases through a video, with a detector trained here.

    sam3-train predict-video --video clip/ --phrases "red star" "blue circle" \
        --video_checkpoint checkpoints/sam3 --detector runs/x/checkpoints/last.ckpt --output runs/x/video
    sam3-train predict-video ... --gt gt.json          # also score them (metrics.json)
    sam3-train predict-video ... --hotstart_delay 0    # no delayed output

``--video``: a folder of frames (JPG/PNG, natural name order) or an animated GIF / WebP / PNG.
``--video_checkpoint``: the released video model folder (facebook/sam3 layout; its tracker is used
as is). ``--detector``: a ``sam3-train fit`` .ckpt (LoRA adapters are merged) or an HF-layout folder;
omitted, the checkpoint's own detector. Writes ``masklets.json``, ``overlays/*.png`` and
``masklets.gif`` under ``--output`` (see :mod:`sam3_train.video.masklets`). Frames are read one at a
time and the session keeps a bounded window of them (:mod:`sam3_train.video.session`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sam3_train.video.frames import frame_size, model_inputs, open_frames
from sam3_train.video.masklets import MaskletWriter, frame_masklets, read_masklets
from sam3_train.video.model import build_video_model
from sam3_train.video.session import StreamingSession, TrackingSettings, propagate


def predict_video(*, video: str | Path, phrases: list[str], video_checkpoint: str | Path,
                  detector: str | Path | None, output: str | Path, settings: TrackingSettings | None = None,
                  device: str = "cpu", overlays: bool = True, gif: bool = True, max_frames: int | None = None,
                  gt: str | Path | None = None, hub_kernels: bool = False, progress: bool = True) -> dict[str, Any]:
    """Track ``phrases`` through ``video`` and write the outputs; returns a summary (paths, counts,
    settings in effect, and the metrics when ``gt`` is given)."""
    phrases = list(dict.fromkeys(p.strip() for p in phrases if p and p.strip()))
    if not phrases:
        raise ValueError("No noun phrase given: pass at least one with --phrases (e.g. --phrases \"red star\").")
    if gt is not None and not Path(gt).is_file():
        raise FileNotFoundError(f"--gt {gt} does not exist: pass a masklets JSON (e.g. moving_shapes' gt.json).")
    source = open_frames(video)
    num_frames = len(source) if max_frames is None else min(max_frames, len(source))
    model = build_video_model(video_checkpoint, detector, device=device, hub_kernels=hub_kernels)
    values = (settings or TrackingSettings()).apply(model)
    height, width = frame_size(source)
    side = model.detector_model.image_size
    session = StreamingSession(num_frames=num_frames, height=height, width=width, device=device)
    session.add_phrases(phrases, model.detector_model.tokenize)
    info = {"video": str(video), "phrases": phrases, "video_checkpoint": str(video_checkpoint),
            "detector": str(detector) if detector else None, "settings": values,
            "vit_relative_change": getattr(model, "sam3_vit_change", 0.0)}
    writer = MaskletWriter(output, phrases=phrases, file_names=source.names[:num_frames], height=height, width=width,
                           overlays=overlays, gif=gif, info=info)
    inputs = tqdm(model_inputs(source, side, limit=num_frames), total=num_frames, desc="predict-video", unit="frame",
                  disable=not progress)
    start = time.perf_counter()
    objects: set[int] = set()
    for frame in propagate(model, session, inputs):
        masklets = frame_masklets(frame, image_size=side, height=height, width=width)
        objects.update(masklets.ids)
        writer.add(frame.frame_idx, source.read(frame.frame_idx) if overlays or gif else None, masklets)
    seconds = time.perf_counter() - start
    paths = writer.close()
    summary: dict[str, Any] = {"frames": num_frames, "objects": len(objects), "seconds_per_frame": seconds / num_frames,
                               "paths": {k: str(v) for k, v in paths.items()}, "settings": values}
    if gt is not None:
        from sam3_train.video.evaluate import evaluate_masklets

        summary["metrics"] = evaluate_masklets(read_masklets(paths["json"]), read_masklets(gt), phrases=phrases)
        metrics_path = Path(output) / "metrics.json"
        metrics_path.write_text(json.dumps(summary["metrics"], indent=1) + "\n")
        summary["paths"]["metrics"] = str(metrics_path)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3-train predict-video",
        description="Masklets of noun phrases through a video: a detector trained here inside SAM 3's video model.")
    parser.add_argument("--video", required=True, help="folder of frames (JPG/PNG) or an animated GIF/WebP/PNG")
    parser.add_argument("--phrases", required=True, nargs="+", help="one or more noun phrases, e.g. \"red star\"")
    parser.add_argument("--video_checkpoint", required=True,
                        help="local video model folder (facebook/sam3 layout: detector and tracker weights)")
    parser.add_argument("--detector", default=None,
                        help="our detector: a sam3-train fit .ckpt or an HF-layout folder "
                             "(default: the checkpoint's own)")
    parser.add_argument("--output", required=True, help="folder for masklets.json, overlays/ and masklets.gif")
    parser.add_argument("--gt", default=None, help="ground-truth masklets JSON: also write metrics.json")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--max_frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--no_overlays", action="store_true", help="skip the per-frame PNG overlays")
    parser.add_argument("--no_gif", action="store_true", help="skip the animated GIF")
    parser.add_argument("--hub_kernels", action="store_true",
                        help="use transformers' Hub kernels for mask NMS and hole filling (CUDA, network) instead of "
                             "the built-in CPU versions")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    settings = parser.add_argument_group("detection and delayed output (default: the checkpoint's; SAM 3's shown)")
    for f in fields(TrackingSettings):
        kind = int if "int" in str(f.type) else float
        settings.add_argument(f"--{f.name}", type=kind, default=None,
                              help=f"{_HELP[f.name]} (SAM 3: {TrackingSettings.default(f.name)})")
    return parser


_HELP = {
    "hotstart_delay": "frames each output is held back so unconfirmed masklets can be removed first; 0: none",
    "hotstart_unmatch_thresh": "remove a masklet born within the delay that no detection matched on this many frames",
    "hotstart_dup_thresh": "remove a masklet born within the delay that shares an older one's detection this often",
    "score_threshold_detection": "detections scoring above this are matched to masklets",
    "new_det_thresh": "an unmatched detection scoring at least this starts a new masklet",
    "det_nms_thresh": "mask-IoU NMS among a frame's detections (0: off)",
    "recondition_every_nth_frame": "every n-th frame confident detections re-prompt the masklets they overlap (0: off)",
    "max_num_objects": "most masklets tracked at once",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = TrackingSettings(**{f.name: getattr(args, f.name) for f in fields(TrackingSettings)})
    try:
        summary = predict_video(
            video=args.video, phrases=args.phrases, video_checkpoint=args.video_checkpoint, detector=args.detector,
            output=args.output, settings=settings, device=args.device, overlays=not args.no_overlays,
            gif=not args.no_gif, max_frames=args.max_frames, gt=args.gt, hub_kernels=args.hub_kernels,
            progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError) as err:  # bad paths, sizes, checkpoints, settings
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sam3-train predict-video: error: {message}", file=sys.stderr)
        return 2
    paths = summary["paths"]
    print(f"predict-video: {summary['frames']} frames, {summary['objects']} objects, "
          f"{summary['seconds_per_frame']:.3f} s/frame on {args.device} ({torch.get_num_threads()} threads); "
          + ", ".join(f"{k} {v}" for k, v in paths.items()))
    if "metrics" in summary:
        m = summary["metrics"]
        print(f"metrics: cgF1 {m['cgF1']:.2f}, pmF1 {m['pmF1']:.2f}, IL_MCC {m['IL_MCC']:.3f}, identity consistency "
              f"{m['identity_consistency']:.3f} ({m['consistent_tracks']:.0f}/{m['gt_tracks']:.0f} tracks), "
              f"{m['id_switches']:.0f} id switches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
