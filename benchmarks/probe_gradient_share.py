"""Which loss terms move which parts of the model? (docs/training_shapes.md, issue 28)

For the shapes_tiny model and objective, the norm of each term group's weighted gradient (as the
step sees it: SAM 3's weights, the DAC and denoising halves apart, times sqrt(pairs)) on each part of
the detector, averaged over a few training batches: at the start, and again after ``--steps`` plain
training steps (forward, objective, backward, SAM 3's clipping, fused AdamW with the config's warm-up).
Term groups: ``box`` (L1 + GIoU), ``class`` (the Align loss), ``presence``, ``mask`` (focal + dice),
``semantic`` (semantic segmentation), each with ``_o2m`` / ``_dn`` for the one-to-many and denoising
halves. A box term that is small beside the mask terms on the parts they share (the decoder, the
DETR encoder, the ViT) would be drowned by the mask's weight of 200; this says whether it is.

    python benchmarks/probe_gradient_share.py --steps 600      # ~4 min at two threads
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from bench_step import CONFIG, build, train_step  # noqa: E402
from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.losses.criterion import _KEY  # noqa: E402

PARTS = ("vision_encoder", "text_encoder", "geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder",
         "dot_product_scoring")
TERM_GROUPS = {"bbox": "box", "giou": "box", "align": "class", "presence": "presence", "mask": "mask",
               "dice": "mask", "semantic": "semantic", "semantic_dice": "semantic"}


def part_of(name: str) -> str:
    return next((part for part in PARTS if part in name), "other")


def gradient_norms(detector, criterion, batch) -> dict[str, dict[str, float]]:
    """{term group: {part: norm of that group's weighted gradient on the part}} for one batch."""
    outputs = detector(batch)
    groups: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for key, value in criterion(outputs, batch.targets).items():
        weight = criterion.weight_of(key)
        if weight:
            match = _KEY.match(key)
            groups[TERM_GROUPS[match["term"]] + (match["half"] or "")].append(weight * value)
    named = [(n, p) for n, p in detector.named_parameters() if p.requires_grad]
    norms = {}
    for group, values in groups.items():
        grads = torch.autograd.grad(sum(values) * batch.num_pairs**0.5, [p for _, p in named],
                                    retain_graph=True, allow_unused=True)
        squares: dict[str, float] = collections.defaultdict(float)
        for (name, _), grad in zip(named, grads):
            if grad is not None:
                squares[part_of(name)] += float(grad.pow(2).sum())
        norms[group] = {part: value**0.5 for part, value in squares.items()}
    return norms


def table(detector, criterion, batches, title: str) -> str:
    mean: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for batch in batches:
        for group, parts in gradient_norms(detector, criterion, batch).items():
            for part, value in parts.items():
                mean[group][part] += value / len(batches)
    parts = [p for p in (*PARTS, "other") if any(p in row for row in mean.values())]
    lines = [f"{title}: gradient norm of each term group (rows) on each part (columns), mean of {len(batches)} batches",
             "term".ljust(12) + "".join(p.replace("_encoder", "").replace("_decoder", "_dec")[:14].rjust(15) for p in parts)]
    lines += [group.ljust(12) + "".join(f"{mean[group].get(p, 0.0):15.3g}" for p in parts) for group in sorted(mean)]
    return "\n".join(lines)


def endless(loader):
    while True:  # one epoch is the config's steps_per_epoch
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps between the two readings")
    parser.add_argument("--batches", type=int, default=4, help="batches each reading averages")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as shapes_root:
        module, batches = build(CONFIG, shapes_root, args.batches)  # the readings' batches: bench_step's small split
        # the steps: the config's full training split, streamed
        data = Sam3DataModule(**{**yaml.safe_load(CONFIG.read_text())["data"], "shapes_root": shapes_root,
                                 "num_workers": 0, "seed": args.seed})
        data.prepare_data()
        data.setup("fit")
        stream = data.train_dataloader()
        detector, criterion, h = module.detector.train(), module.criterion, module.hparams
        print(table(detector, criterion, batches, "at the start"), flush=True)
        if not args.steps:
            return
        opt = torch.optim.AdamW(detector.parameters(), lr=h.lr, weight_decay=h.weight_decay, fused=True)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, h.warmup_steps)))
        for i, batch in zip(range(args.steps), endless(stream)):
            train_step(detector, criterion, batch, opt)
            warmup.step()
            if (i + 1) % 100 == 0:
                print(f"step {i + 1}", flush=True)
        print(table(detector, criterion, batches, f"after {args.steps} steps"))


if __name__ == "__main__":
    main()
