"""How much mask IoU does the mask head's resolution allow? (docs/training_shapes.md, issue 28)

The detector predicts mask logits on a grid of ``R x R`` (2x the token grid in configs/shapes_tiny.yaml:
24 x 24 at 168 px; SAM 3's 4x: 48 x 48) that evaluation upsamples bilinearly to the input and
thresholds at 0. The best such logit map is not known in closed form; this takes a good one: each val
ground-truth mask (at the config's input size) area-averaged onto ``R x R``, minus 0.5, upsampled the
way evaluation upsamples, thresholded at 0. Its IoU with the mask is what a perfect model at that
resolution reaches near enough: the ceiling of mask IoU, and, averaged over the metric's IoU thresholds
0.5:0.95, of the share of instances a mask can match at all.

    python benchmarks/probe_mask_resolution.py                    # configs/shapes_tiny.yaml's val split
    python benchmarks/probe_mask_resolution.py --resolutions 24 48 96 --images 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from bench_step import CONFIG  # noqa: E402
from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.metrics.cgf1 import IOU_THRESHOLDS  # noqa: E402

THRESHOLDS = torch.as_tensor(IOU_THRESHOLDS)  # the metric's IoU thresholds, 0.5:0.95


def ceiling_ious(masks: torch.Tensor, resolution: int) -> torch.Tensor:
    """IoU of each mask [n, S, S] (bool) with itself area-averaged to ``resolution`` and upsampled back
    bilinearly (the evaluation's upsampling), thresholded at logit 0: [n]."""
    side = masks.shape[-1]
    low = F.adaptive_avg_pool2d(masks[:, None].float(), resolution) - 0.5
    back = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[:, 0] > 0
    inter = (back & masks).flatten(1).sum(1)
    union = (back | masks).flatten(1).sum(1)
    return inter / union.clamp(min=1)


def summary(ious: torch.Tensor) -> dict[str, float]:
    matched = (ious[:, None] >= THRESHOLDS[None]).float().mean(0)  # share of instances at each threshold
    return {"median": float(ious.median()), "mean": float(ious.mean()), "at_50": float(matched[0]),
            "at_75": float(matched[5]), "at_90": float(matched[8]), "matchable_0.5:0.95": float(matched.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--shapes-root", help="default: the config's data.shapes_root")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[24, 48, 96])
    parser.add_argument("--images", type=int, default=200, help="val images read")
    args = parser.parse_args(argv)
    data = yaml.safe_load(args.config.read_text())["data"]
    side = data["image_size"]
    dm = Sam3DataModule(shapes_root=args.shapes_root or data["shapes_root"], image_size=side, eval_batch_size=8,
                        num_workers=0)
    dm.prepare_data()
    dm.setup("validate")
    masks, images = [], 0
    for batch in dm.val_dataloader():
        for image in range(batch.num_images):
            # Every phrase of an image lists its instances again ("star", "red star", ...): one copy each.
            mine = [t["masks"] for i, t in zip(batch.pair_image.tolist(), batch.targets) if i == image and len(t["boxes"])]
            if mine:
                masks.append(torch.unique(torch.cat(mine).flatten(1), dim=0).reshape(-1, side, side))
        images += batch.num_images
        if images >= args.images:
            break
    all_masks = torch.cat(masks)
    areas = all_masks.flatten(1).sum(1).float()
    print(f"{args.config.name}: {len(all_masks)} val instances in {images} images at {side} px; median side "
          f"{float(areas.median().sqrt()):.1f} px (the square root of the median area)")
    out = {}
    for resolution in args.resolutions:
        out[resolution] = summary(ceiling_ious(all_masks, resolution))
        s = out[resolution]
        print(f"  {resolution:>3} x {resolution:<3} mask IoU ceiling: median {s['median']:.3f}, mean {s['mean']:.3f}; "
              f"instances matchable at IoU 0.5 {s['at_50']:.2f}, 0.75 {s['at_75']:.2f}, 0.9 {s['at_90']:.2f}, "
              f"over 0.5:0.95 {s['matchable_0.5:0.95']:.2f}")
    return out


if __name__ == "__main__":
    main()
