"""Moving shapes: short generated videos with ground-truth masklets, to evaluate video output.

The built-in shapes dataset's shapes (:mod:`sam3_train.data.shapes`: 6 kinds x 6 colours x 2 sizes
on a textured background) move in straight lines, bounce off the borders and turn; some enter after
the first frame or leave before the last, and later shapes occlude earlier ones. A shape is visible
on a frame (it has a mask there) when at least ``MIN_VISIBLE`` of it shows, as in the stills.

    python -m sam3_train.video.moving_shapes --output runs/moving --frames 24 --seed 0

writes ``frames/00000.jpg ...`` and ``gt.json`` (the masklets layout of
:mod:`sam3_train.video.masklets`: one annotation per shape with its per-frame RLE masks, its
category the "colour kind" phrase, and ``phrases``, every phrase it answers: "star", "red star",
"small red star"). Everything derives from the seed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sam3_train.data import rle as rle_ops
from sam3_train.data.shapes import COLOURS, KINDS, MIN_VISIBLE, SIZES, _background, _outline


@dataclass(frozen=True)
class Track:
    """One moving shape: appearance, motion (pixels and radians per frame) and lifetime [first, last]."""

    track_id: int
    kind: str
    colour: str
    size: str
    radius: float
    start: tuple[float, float]
    velocity: tuple[float, float]
    angle: float
    spin: float
    first: int
    last: int

    @property
    def phrases(self) -> list[str]:
        return [self.kind, f"{self.colour} {self.kind}", f"{self.size} {self.colour} {self.kind}"]

    def centre(self, frame: int, side: int) -> tuple[float, float]:
        """Centre on ``frame``: a straight path folded back at the borders (a bounce)."""
        def fold(start: float, step: float) -> float:
            low, high = self.radius, side - self.radius
            span = high - low
            x = (start - low + step * frame) % (2 * span)
            return low + (x if x <= span else 2 * span - x)

        return fold(self.start[0], self.velocity[0]), fold(self.start[1], self.velocity[1])


def make_tracks(seed: int, *, num_frames: int, image_size: int, num_shapes: tuple[int, int] = (2, 4),
                speed: tuple[float, float] = (1.5, 4.0), late_share: float = 0.3) -> list[Track]:
    """The shapes of video ``seed``; about ``late_share`` of them enter later or leave earlier."""
    rng = np.random.default_rng([seed, 7])
    colours = list(COLOURS)
    tracks = []
    for track_id in range(1, int(rng.integers(num_shapes[0], num_shapes[1] + 1)) + 1):
        size = "small" if rng.random() < 0.4 else "large"
        radius = float(rng.uniform(*SIZES[size]) * image_size)
        heading, pace = rng.uniform(0, 2 * math.pi), rng.uniform(*speed)
        first, last = 0, num_frames - 1
        if num_frames >= 6 and rng.random() < late_share:
            if rng.random() < 0.5:
                first = int(rng.integers(1, num_frames // 2))
            else:
                last = int(rng.integers(num_frames // 2, num_frames - 1))
        tracks.append(Track(
            track_id=track_id, kind=KINDS[rng.integers(len(KINDS))], colour=colours[rng.integers(len(colours))],
            size=size, radius=radius, start=(float(rng.uniform(radius, image_size - radius)),
                                             float(rng.uniform(radius, image_size - radius))),
            velocity=(pace * math.cos(heading), pace * math.sin(heading)), angle=float(rng.uniform(0, 2 * math.pi)),
            spin=float(rng.uniform(-0.08, 0.08)), first=first, last=last))
    return tracks


def render(tracks: list[Track], frame: int, *, image_size: int,
           background: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Frame ``frame`` -> (image [S, S, 3] uint8, {track id: visible mask [S, S] bool}); a shape hidden
    below ``MIN_VISIBLE`` has no entry."""
    image = Image.fromarray(background)
    pen = ImageDraw.Draw(image)
    drawn = []
    for track in tracks:
        if not track.first <= frame <= track.last:
            continue
        cx, cy = track.centre(frame, image_size)
        outline = _outline(track.kind, cx, cy, track.radius, track.angle + track.spin * frame)
        pen.polygon(outline, fill=COLOURS[track.colour])
        mask = Image.new("L", (image_size, image_size), 0)
        ImageDraw.Draw(mask).polygon(outline, fill=1)
        drawn.append((track.track_id, np.asarray(mask, dtype=bool)))
    covered = np.zeros((image_size, image_size), dtype=bool)
    visible = {}
    for track_id, full in reversed(drawn):  # later shapes lie on top
        shown = full & ~covered
        covered |= full
        if full.sum() and shown.sum() >= MIN_VISIBLE * full.sum():
            visible[track_id] = shown
    return np.asarray(image), visible


def moving_shapes(seed: int, *, num_frames: int = 24, image_size: int = 224,
                  **track_options) -> tuple[list[Track], Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]]:
    """(tracks, an iterator of rendered frames) of video ``seed``; frames are made as they are read."""
    tracks = make_tracks(seed, num_frames=num_frames, image_size=image_size, **track_options)
    background = _background(np.random.default_rng([seed, 8]), image_size)
    frames = (render(tracks, f, image_size=image_size, background=background) for f in range(num_frames))
    return tracks, frames


def write_moving_shapes(output_dir: str | Path, *, seed: int = 0, num_frames: int = 24, image_size: int = 224,
                        suffix: str = ".jpg", **track_options) -> tuple[Path, Path]:
    """Frames ``output_dir/frames/00000{suffix} ...`` and ``output_dir/gt.json``; returns both paths."""
    frames_dir = Path(output_dir) / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    tracks, frames = moving_shapes(seed, num_frames=num_frames, image_size=image_size, **track_options)
    names = [f"{f:05d}{suffix}" for f in range(num_frames)]
    per_track = {t.track_id: [None] * num_frames for t in tracks}
    for f, (image, visible) in enumerate(frames):
        Image.fromarray(image).save(frames_dir / names[f], **({"quality": 95} if suffix == ".jpg" else {}))
        for track_id, mask in visible.items():
            per_track[track_id][f] = rle_ops.encode(mask)
    categories = sorted({t.phrases[1] for t in tracks})
    annotations = []
    for t in tracks:
        segmentations = per_track[t.track_id]
        annotations.append({
            "id": t.track_id, "video_id": 1, "category_id": categories.index(t.phrases[1]) + 1, "iscrowd": 0,
            "phrase": t.phrases[1], "phrases": t.phrases, "segmentations": segmentations,
            "bboxes": [rle_ops.to_xywh(s) if s else None for s in segmentations],
            "areas": [int(rle_ops.decode(s).sum()) if s else None for s in segmentations]})
    gt = {"info": {"generator": "sam3_train.video.moving_shapes", "seed": seed},
          "videos": [{"id": 1, "file_names": names, "height": image_size, "width": image_size, "length": num_frames}],
          "categories": [{"id": i + 1, "name": p} for i, p in enumerate(categories)],
          "annotations": annotations}
    gt_path = Path(output_dir) / "gt.json"
    gt_path.write_text(json.dumps(gt))
    return frames_dir, gt_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a moving-shapes video with ground-truth masklets.")
    parser.add_argument("--output", required=True, type=Path, help="folder to write frames/ and gt.json into")
    parser.add_argument("--frames", type=int, default=24, help="number of frames")
    parser.add_argument("--image_size", type=int, default=224, help="frame side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    frames_dir, gt_path = write_moving_shapes(args.output, seed=args.seed, num_frames=args.frames,
                                              image_size=args.image_size)
    print(f"frames: {frames_dir}, ground truth: {gt_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
