"""Cost of SAM 3's objective (matching + loss terms + their backward) next to a detector training step.

The objective runs on synthetic outputs shaped like SAM 3's: P = images x phrases pairs, Q queries
per half (one-to-one and one-to-many), every decoder layer, up to ``max_targets`` instances per pair
(a quarter of the pairs negative). The detector step is a forward and backward of a preset on a batch
of the same number of images and phrases; the objective is then also timed on that preset's own
outputs (boxes moved next to the targets so the one-to-many half matches as in training), which
gives the share of a training step it costs. ``--num-points`` takes several values, one run each.

    python benchmarks/bench_objective.py                                  # CPU, tiny and small
    python benchmarks/bench_objective.py --threads 1 --cpu-time --num-points 12544 4096 0   # shared CPU
    python benchmarks/bench_objective.py --device cuda --image-size 1008 --mask-size 288 --presets small
    python benchmarks/bench_objective.py --no-detector                    # the objective alone

Prints one line per measurement (median of ``--repeats`` after one warm-up) and, with ``--json``,
writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sam3_train.losses import HungarianMatcher, OneToManyMatcher, PackedTargets, Sam3Criterion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# On a shared CPU wall time swings with other people's load; process CPU time (with --threads 1)
# measures the work itself. CUDA runs report wall time.
CLOCK = time.perf_counter


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (by ``CLOCK``) over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = CLOCK()
        fn()
        _sync(device)
        times.append(CLOCK() - start)
    return statistics.median(times)


def synthetic_targets(num_pairs: int, max_targets: int, image_size: int, device: torch.device, g: torch.Generator):
    """P target dicts: boxes cxcywh, box-shaped bool masks [n, S, S]; every fourth pair negative."""
    coords = (torch.arange(image_size, device=device) + 0.5) / image_size
    targets = []
    for p in range(num_pairs):
        n = 0 if p % 4 == 3 else int(torch.randint(1, max_targets + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.02
        boxes = torch.cat([xy, wh], 1).to(device)
        lo, hi = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
        inside_x = (coords[None] >= lo[:, :1]) & (coords[None] <= hi[:, :1])  # [n, S]
        inside_y = (coords[None] >= lo[:, 1:]) & (coords[None] <= hi[:, 1:])
        masks = inside_y[:, :, None] & inside_x[:, None, :]
        targets.append({"boxes": boxes, "masks": masks, "exhaustive": True})
    return targets


def synthetic_outputs(num_pairs: int, num_queries: int, num_layers: int, mask_size: int, device: torch.device):
    """A training-mode output dict with leaf tensors that require grad."""

    def leaf(*shape, boxes=False):
        x = torch.rand(*shape, device=device) * 0.5 + 0.25 if boxes else torch.randn(*shape, device=device)
        return x.requires_grad_(True)

    def layer(presence: bool):
        d = {"pred_logits": leaf(num_pairs, num_queries), "pred_boxes": leaf(num_pairs, num_queries, 4, boxes=True)}
        if presence:
            d["presence_logit"] = leaf(num_pairs)
        return d

    out = layer(True)
    out["pred_masks"] = leaf(num_pairs, num_queries, mask_size, mask_size)
    out["semantic_seg"] = leaf(num_pairs, 1, mask_size, mask_size)
    out["aux_outputs"] = [layer(True) for _ in range(num_layers - 1)]
    out["o2m"] = layer(False)
    out["o2m"]["pred_masks"] = leaf(num_pairs, num_queries, mask_size, mask_size)
    out["o2m"]["aux_outputs"] = [layer(False) for _ in range(num_layers - 1)]
    return out


@torch.no_grad()
def plant_matches(outputs: dict, targets: list[dict], g: torch.Generator) -> None:
    """Move predicted boxes next to the targets, as after some training: one-to-one queries get one
    jittered copy per target, one-to-many queries four, so the one-to-many matcher returns the
    realistic ~4 masks per target (at random init it matches almost nothing)."""
    for half, copies in ((outputs, 1), (outputs["o2m"], 4)):
        for layer in [half, *half.get("aux_outputs", [])]:
            boxes = layer["pred_boxes"]
            for p, t in enumerate(targets):
                near = t["boxes"].repeat(copies, 1)[: boxes.shape[1]]
                jitter = 1 + 0.1 * torch.randn(near.shape, generator=g).to(near.device)
                boxes[p, : near.shape[0]] = (near * jitter).clamp(0.01, 0.99).to(boxes.dtype)


def objective_step(criterion: Sam3Criterion, outputs: dict, targets: list[dict]) -> None:
    terms = criterion(outputs, targets)
    criterion.weighted_total(terms, num_pairs=len(targets)).backward()


def bench_objective(args, device: torch.device, g: torch.Generator) -> dict[str, float]:
    num_pairs = args.images * args.phrases
    targets = synthetic_targets(num_pairs, args.max_targets, args.image_size, device, g)
    outputs = synthetic_outputs(num_pairs, args.queries, args.layers, args.mask_size, device)
    plant_matches(outputs, targets, g)
    packed = PackedTargets.from_list(targets, device=device)
    hungarian, o2m = HungarianMatcher(), OneToManyMatcher()
    res: dict[str, float] = {
        "num_targets": int(packed.num_boxes.sum()),
        "o2m_matches": len(o2m(outputs["o2m"], packed)),
        "o2o_match_1_layer_s": timed(lambda: hungarian(outputs, packed), device, args.repeats),
        "o2m_match_1_layer_s": timed(lambda: o2m(outputs["o2m"], packed), device, args.repeats),
    }
    for points in args.num_points:
        criterion = Sam3Criterion(num_points=points)
        cost = timed(lambda: objective_step(criterion, outputs, targets), device, args.repeats)
        res[f"objective_fwd_bwd_s@{points}"] = cost
    return res


def detector_batch(detector, num_images: int, num_phrases: int, max_targets: int, device, g):
    from sam3_train.data import Batch

    size = detector.image_size
    num_pairs = num_images * num_phrases
    return Batch(
        images=torch.randn(num_images, 3, size, size, generator=g).to(device),
        image_sizes=torch.full((num_images, 2), size, dtype=torch.long, device=device),
        pair_image=torch.arange(num_images, device=device).repeat_interleave(num_phrases),
        input_ids=torch.randint(1, 49000, (num_pairs, 32), generator=g).to(device),
        attention_mask=torch.ones(num_pairs, 32, dtype=torch.long, device=device),
        exemplar_boxes=torch.zeros(num_pairs, 0, 4, device=device),
        exemplar_labels=torch.zeros(num_pairs, 0, dtype=torch.long, device=device),
        targets=synthetic_targets(num_pairs, max_targets, size, device, g),
        phrases=[f"p{i}" for i in range(num_pairs)],
        keys=[f"k{i}" for i in range(num_images)],
    )


def bench_detector(preset: str, args, device: torch.device, g: torch.Generator) -> dict[str, float]:
    """Detector forward + backward, and the objective on its own outputs (leaves cut from the graph).

    A training step costs model + objective (the model's backward from the real loss costs what it
    costs from the stand-in scalar used here), so the objective's share is objective / (model + objective).
    """
    from sam3_train.model import build_detector

    detector = build_detector(preset).to(device).train()
    batch = detector_batch(detector, args.images, args.phrases, args.max_targets, device, g)

    def model_step():  # a stand-in scalar that reaches every output, so the backward covers all heads
        out = detector(batch)
        halves = [out, out["o2m"], *out["aux_outputs"], *out["o2m"]["aux_outputs"]]
        loss = sum(v.float().mean() for h in halves for v in h.values() if isinstance(v, torch.Tensor))
        loss.backward()
        detector.zero_grad(set_to_none=True)

    with torch.no_grad():
        out = detector(batch)

    def detach(x):
        if isinstance(x, torch.Tensor):
            return x.detach().requires_grad_(True)
        if isinstance(x, dict):
            return {k: detach(v) for k, v in x.items()}
        return [detach(v) for v in x]

    leaves = detach(out)
    plant_matches(leaves, batch.targets, g)
    res: dict[str, float] = {
        "queries": out["pred_logits"].shape[1],
        "layers": 1 + len(out["aux_outputs"]),
        "mask_size": out["pred_masks"].shape[-1],
        "num_targets": sum(len(t["boxes"]) for t in batch.targets),
        "o2m_matches": len(OneToManyMatcher()(leaves["o2m"], batch.targets)),
        "model_fwd_bwd_s": timed(model_step, device, args.repeats),
    }
    for points in args.num_points:
        criterion = Sam3Criterion(num_points=points)
        cost = timed(lambda: objective_step(criterion, leaves, batch.targets), device, args.repeats)
        res[f"objective_fwd_bwd_s@{points}"] = cost
        res[f"objective_share_of_step@{points}"] = cost / (cost + res["model_fwd_bwd_s"])
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--phrases", type=int, default=8)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (SAM 3: 6)")
    parser.add_argument("--max-targets", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=224, help="target mask size S (SAM 3: 1008)")
    parser.add_argument("--mask-size", type=int, default=64, help="predicted mask size h (SAM 3: 288)")
    parser.add_argument(
        "--num-points", type=int, nargs="+", default=[12544], help="mask loss points, one run each; 0: full resolution"
    )
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"])
    parser.add_argument("--no-detector", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time instead of wall time")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    args.num_points = [k or None for k in args.num_points]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    report: dict[str, dict] = {}
    num_pairs = args.images * args.phrases
    name = f"objective P={num_pairs} Q={args.queries} L={args.layers} S={args.image_size} h={args.mask_size}"
    report[name] = bench_objective(args, device, g)
    print(name, json.dumps(report[name]), flush=True)
    if not args.no_detector:
        for preset in args.presets:
            report[f"detector {preset}"] = bench_detector(preset, args, device, g)
            print(f"detector {preset}", json.dumps(report[f"detector {preset}"]), flush=True)
    clock = "process CPU time" if args.cpu_time else "wall time"
    threads = torch.get_num_threads()
    report["env"] = {"device": str(device), "threads": threads, "clock": clock, "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
