"""Masklets: a video's per-frame masks with stable object ids, in pictures and in a JSON file.

:func:`frame_masklets` turns one released frame of :func:`sam3_train.video.session.propagate` into
masks at the video's size. :class:`MaskletWriter` writes, under its folder:

- ``masklets.json``: YouTube-VIS style (COCO for video). ``videos`` (one: ``file_names``, ``height``,
  ``width``, ``length``), ``categories`` (one per noun phrase: ``id``, ``name``) and ``annotations``,
  one per object: ``id`` (1-based), ``object_id`` (the tracker's id), ``category_id``, ``phrase``,
  ``score`` (its detection score when it was found), ``segmentations`` (per frame: COCO RLE with
  ``counts`` as a string, or null where it is not visible), ``bboxes`` (pixel xywh or null) and
  ``areas``. Ground truth of :mod:`sam3_train.video.moving_shapes` uses the same layout.
- ``overlays/{frame}.png``: each frame with its masklets blended in, one colour per object id;
- ``masklets.gif``: the overlays as an animation (downscaled, and at most ``gif_max_frames`` frames
  spread over the video, since Pillow holds a GIF's frames until it writes the file).

    python -m sam3_train.video.masklets --masklets gt.json --video frames/ --output drawn/   # draw any such file
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from sam3_train.data import rle as rle_ops
from sam3_train.data.frame import InputFrame  # the image path's mask mapping
from sam3_train.video.session import DelayedFrame
from sam3_train.visualize import palette


@dataclass
class Masklets:
    """The visible masklets of one frame: ``ids`` [n] (tracker ids), ``phrases`` n strings,
    ``scores`` [n], ``masks`` [n, H, W] bool at the video's size, ``boxes`` [n, 4] xyxy pixels."""

    ids: list[int]
    phrases: list[str]
    scores: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor


def frame_masklets(frame: DelayedFrame, *, image_size: int, height: int, width: int) -> Masklets:
    """Masks of the objects shown on ``frame`` at (height, width).

    Low-res logits are mapped as the image path maps its masks (``data.frame.InputFrame``: to S x S,
    then to the video's size), thresholded at 0; hidden ids and empty masks are dropped, and where masks of
    one phrase overlap the pixel goes to the object with the higher tracker score, as transformers'
    ``Sam3VideoProcessor.postprocess_outputs`` does.
    """
    out = frame.output
    ids = [i for i in sorted(out.obj_id_to_mask) if i not in frame.hidden]
    if not ids:
        return Masklets([], [], torch.zeros(0), torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0, 4))
    logits = torch.cat([out.obj_id_to_mask[i] for i in ids]).float().cpu()  # [n, h, w]
    # the tracker's frames fill the whole square input: the content is all of it
    square = InputFrame(side=image_size, content=(image_size, image_size), original=(height, width))
    masks = square.mask_logits_to_original(logits) > 0
    keep = masks.flatten(1).any(1).tolist()
    ids = [i for i, k in zip(ids, keep) if k]
    masks = masks[torch.tensor(keep, dtype=torch.bool)]
    phrases = [frame.phrases[i] for i in ids]
    tracker_scores = torch.tensor([float(out.obj_id_to_tracker_score.get(i, 0.0)) for i in ids])
    for phrase in set(phrases):
        group = torch.tensor([p == phrase for p in phrases])
        if int(group.sum()) > 1:
            claims = torch.where(masks[group], tracker_scores[group, None, None], -torch.inf)
            owner = claims.argmax(0)  # [H, W]; ties go to the lower id
            masks[group] &= owner[None] == torch.arange(int(group.sum()))[:, None, None]
    scores = torch.tensor([float(out.obj_id_to_score[i]) for i in ids])
    return Masklets(ids, phrases, scores, masks, _boxes(masks))


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy pixel boxes [n, 4] of [n, H, W] masks (zeros for an empty mask)."""
    boxes = torch.zeros(len(masks), 4)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


def draw(image: np.ndarray, masklets: Masklets, *, alpha: float = 0.5) -> Image.Image:
    """[H, W, 3] uint8 frame with each masklet blended in its id's colour (the same colour on every
    frame, from ``visualize.palette``), its box, and ``phrase #id``."""
    canvas = image.astype(np.float32).copy()
    colours = palette(max(masklets.ids, default=0) + 1)
    for obj_id, mask in zip(masklets.ids, masklets.masks.numpy()):
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colours[obj_id], dtype=np.float32)
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    for obj_id, phrase, box in zip(masklets.ids, masklets.phrases, masklets.boxes.tolist()):
        pen.rectangle(box, outline=colours[obj_id], width=2)
        pen.text((box[0] + 2, box[1] + 1), f"{phrase} #{obj_id}", fill=colours[obj_id])
    return picture


class MaskletWriter:
    """Writes ``masklets.json``, per-frame overlays and a GIF under ``output_dir`` (module docstring).

    Args:
        output_dir: folder to write (created).
        phrases: the noun phrases, in category order.
        file_names: one name per frame of the video.
        height, width: the video's size.
        overlays: write ``overlays/*.png``.
        gif: write ``masklets.gif``.
        gif_max_side: the GIF's longest side in pixels.
        gif_max_frames: most frames in the GIF (evenly spread).
        gif_fps: frames per second of the GIF.
        info: extra fields for the JSON's ``info`` (settings, sources).
        write_json: write ``masklets.json`` (off to draw an existing one, see :func:`draw_masklets_file`).
    """

    def __init__(self, output_dir: str | Path, *, phrases: list[str], file_names: list[str], height: int, width: int,
                 overlays: bool = True, gif: bool = True, gif_max_side: int = 480, gif_max_frames: int = 300,
                 gif_fps: float = 8.0, info: dict[str, Any] | None = None, write_json: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.phrases, self.file_names = list(phrases), list(file_names)
        self.height, self.width = height, width
        self.overlays, self.gif = overlays, gif
        self.gif_stride = max(1, -(-len(file_names) // max(1, gif_max_frames)))  # ceil
        self.gif_scale = min(1.0, gif_max_side / max(height, width))
        self.gif_fps = gif_fps
        self.info = dict(info or {})
        self.write_json = write_json
        self._tracks: dict[int, dict[str, Any]] = {}
        self._gif_frames: list[Image.Image] = []
        if overlays:
            (self.output_dir / "overlays").mkdir(exist_ok=True)

    def add(self, frame_idx: int, image: np.ndarray | None, masklets: Masklets) -> None:
        """Record frame ``frame_idx``'s masklets; ``image`` [H, W, 3] uint8 for the pictures."""
        length = len(self.file_names)
        for obj_id, phrase, score, mask, box in zip(masklets.ids, masklets.phrases, masklets.scores.tolist(),
                                                    masklets.masks.numpy(), masklets.boxes.tolist()):
            track = self._tracks.setdefault(obj_id, {
                "object_id": obj_id, "phrase": phrase, "score": round(score, 5),
                "segmentations": [None] * length, "bboxes": [None] * length, "areas": [None] * length})
            track["segmentations"][frame_idx] = rle_ops.encode(mask)
            track["bboxes"][frame_idx] = [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                          round(box[3] - box[1], 2)]
            track["areas"][frame_idx] = int(mask.sum())
        if image is None or not (self.overlays or self.gif):
            return
        picture = draw(image, masklets)
        if self.overlays:
            picture.save(self.output_dir / "overlays" / f"{Path(self.file_names[frame_idx]).stem}.png")
        if self.gif and frame_idx % self.gif_stride == 0:
            size = (max(1, round(self.width * self.gif_scale)), max(1, round(self.height * self.gif_scale)))
            small = picture.resize(size, Image.BILINEAR) if size != picture.size else picture
            self._gif_frames.append(small.quantize(colors=255))  # 1 byte per pixel until the file is written

    def close(self) -> dict[str, Path]:
        """Write the JSON (and the GIF); returns the written paths by kind."""
        categories = {p: i + 1 for i, p in enumerate(self.phrases)}
        annotations = [{"id": n + 1, "video_id": 1, "category_id": categories[t["phrase"]], "iscrowd": 0, **t}
                       for n, t in enumerate(self._tracks[i] for i in sorted(self._tracks))]
        record = {
            "info": self.info,
            "videos": [{"id": 1, "file_names": self.file_names, "height": self.height, "width": self.width,
                        "length": len(self.file_names)}],
            "categories": [{"id": i, "name": p} for p, i in categories.items()],
            "annotations": annotations,
        }
        paths = {}
        if self.write_json:
            paths["json"] = self.output_dir / "masklets.json"
            paths["json"].write_text(json.dumps(record))
        if self.overlays:
            paths["overlays"] = self.output_dir / "overlays"
        if self.gif and self._gif_frames:
            paths["gif"] = self.output_dir / "masklets.gif"
            first, *rest = self._gif_frames
            first.save(paths["gif"], save_all=True, append_images=rest, loop=0,
                       duration=round(1000 * self.gif_stride / self.gif_fps))
            self._gif_frames = []
        return paths


def read_masklets(path: str | Path) -> dict[str, Any]:
    """A masklets or ground-truth JSON (the layout above), checked for the keys evaluation reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a masklets JSON (YouTube-VIS layout).")
    record = json.loads(path.read_text())
    missing = [k for k in ("videos", "categories", "annotations") if k not in record]
    if missing or len(record.get("videos", [])) != 1:
        raise ValueError(f"{path} is not a one-video masklets JSON (YouTube-VIS layout): "
                         + (f"missing {', '.join(missing)}" if missing else f"{len(record['videos'])} videos"))
    return record


def draw_masklets_file(masklets_json: str | Path, video: str | Path, output_dir: str | Path, **writer_options: Any
                       ) -> dict[str, Path]:
    """Overlays and a GIF of an existing masklets JSON (predictions, or ground truth such as
    ``moving_shapes``' ``gt.json``) on the frames of ``video``; returns the written paths."""
    from sam3_train.video.frames import open_frames

    record, source = read_masklets(masklets_json), open_frames(video)
    meta = record["videos"][0]
    if int(meta["length"]) != len(source):
        raise ValueError(f"{masklets_json} covers {meta['length']} frames, {video} has {len(source)}.")
    height, width = int(meta["height"]), int(meta["width"])
    phrases = [c["name"] for c in record["categories"]]
    writer = MaskletWriter(output_dir, phrases=phrases, file_names=source.names, height=height, width=width,
                           write_json=False, **writer_options)
    annotations = sorted(record["annotations"], key=lambda a: int(a["id"]))
    for f in range(len(source)):
        shown = [a for a in annotations if a["segmentations"][f] is not None]
        masks = torch.from_numpy(np.stack([rle_ops.decode(a["segmentations"][f]) for a in shown])
                                 if shown else np.zeros((0, height, width), np.uint8)).bool()
        names = [a.get("phrase") or phrases[a["category_id"] - 1] for a in shown]
        scores = torch.tensor([float(a.get("score", 1.0)) for a in shown])
        masklets = Masklets([int(a["id"]) for a in shown], names, scores, masks, _boxes(masks))
        writer.add(f, source.read(f), masklets)
    return writer.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Draw a masklets JSON (predictions or ground truth) on its video.")
    parser.add_argument("--masklets", required=True, help="masklets JSON (e.g. masklets.json or gt.json)")
    parser.add_argument("--video", required=True, help="its frames folder or animated image")
    parser.add_argument("--output", required=True, help="folder for overlays/ and masklets.gif")
    parser.add_argument("--gif_max_side", type=int, default=480, help="the GIF's longest side in pixels")
    args = parser.parse_args(argv)
    paths = draw_masklets_file(args.masklets, args.video, args.output, gif_max_side=args.gif_max_side)
    print(", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
