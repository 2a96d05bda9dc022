"""Can the decoder learn to refine a box that starts next to its object? (docs/training_shapes.md)

Trains the shapes_tiny model on the denoising queries' box terms only (L1 + GIoU of noised
ground-truth boxes, sam3_train/model/denoising.py): no matching, class, mask or presence term. A
decoder that reads where its object lies moves the noised boxes onto it and the GIoU loss falls
below the noise's own value, which this prints first (the loss of a zero refinement).

    python benchmarks/probe_box_refinement.py --steps 300 --lr 1e-3            # fresh batches
    python benchmarks/probe_box_refinement.py --steps 150 --fixed-batch         # one batch of 4 images

Prints the mean ``loss_giou_dn`` of the last layer and the first every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sam3_train.box_ops import cxcywh_to_xyxy, elementwise_iou_and_giou
from sam3_train.data import Sam3DataModule
from sam3_train.losses import Sam3Criterion
from sam3_train.lit import Sam3LitModule
from sam3_train.losses.targets import PackedTargets
from sam3_train.model.denoising import DenoisingSettings, make_denoising_queries


def zero_refinement_loss(datamodule: Sam3DataModule, settings: DenoisingSettings, batches: int = 20) -> float:
    """GIoU loss of the noised boxes themselves against their targets (what a decoder that does not
    move them scores), over ``batches`` training batches."""
    losses = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        packed = PackedTargets.from_list(batch.targets)
        dn = make_denoising_queries(packed, settings, num_learned_queries=1)
        _, giou = elementwise_iou_and_giou(cxcywh_to_xyxy(dn.reference[dn.indices.pair, dn.indices.query]),
                                           packed.boxes_xyxy[dn.indices.target])
        losses.append((1 - giou).mean())
        if i + 1 >= batches:
            break
    return float(torch.stack(losses).mean())


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes-root", default="datasets/shapes")
    parser.add_argument("--shapes-splits", default=None, help='JSON split sizes, e.g. \'{"train": 64, "val": 16, "test": 16}\' '
                        "(default: the built-in dataset's)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient norm clip (SAM 3: 0.1); 0: none")
    parser.add_argument("--box-noise", type=float, default=1.0)
    parser.add_argument("--fixed-batch", action="store_true", help="repeat the first batch (fresh noise each step)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    settings = DenoisingSettings(groups=2, box_noise=args.box_noise, negatives=False)
    module = Sam3LitModule(  # configs/shapes_tiny.yaml's model
        preset="tiny", init="meta", denoising=settings.to_dict(),
        model_overrides={"num_queries": 20, "dropout": 0.0, "vision_config": {"scale_factors": [2.0, 1.0, 0.5]}},
        criterion=Sam3Criterion(num_points=1024, align_min_target=1.0),
    )
    splits = json.loads(args.shapes_splits) if args.shapes_splits else None
    datamodule = Sam3DataModule(shapes_root=args.shapes_root, shapes_splits=splits, image_size=224, batch_size=4, max_phrases_per_image=6,
                                negative_share=0.0, num_workers=0, steps_per_epoch=max(args.steps, 20), seed=args.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    print(f"zero refinement (the noised boxes themselves): loss_giou_dn {zero_refinement_loss(datamodule, settings):.3f}")

    detector = module.detector.train()
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    batches = iter(datamodule.train_dataloader())
    first = next(batches)
    last, first_layer, means, start = [], [], [], time.time()
    for step in range(args.steps):
        batch = first if args.fixed_batch or step == 0 else next(batches)
        terms = module.criterion(detector(batch), batch.targets)
        loss = sum(module.criterion.weight_of(k) * v for k, v in terms.items()
                   if k.endswith("_dn") and ("bbox" in k or "giou" in k))
        optimizer.zero_grad()
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(detector.parameters(), args.clip)
        optimizer.step()
        last.append(terms["loss_giou_dn"].item())
        first_layer.append(terms["loss_giou_aux0_dn"].item())
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            n = len(last)
            means.append(sum(last) / n)
            print(f"step {step + 1}: loss_giou_dn {sum(last) / n:.3f} (first layer {sum(first_layer) / n:.3f}), "
                  f"{time.time() - start:.0f} s", flush=True)
            last, first_layer = [], []
    return means


if __name__ == "__main__":
    main()
