"""LoRA against full fine-tuning: training steps per second, side by side, at the tiny and small presets.

    python benchmarks/bench_lora.py                          # tiny and small, 224 px, 10 timed steps, 3 repeats
    python benchmarks/bench_lora.py --presets small --steps 20 --repeats 5 --rank 16

Per preset both sides start from the same base (a random detector saved as an HF folder and read back
through ``model.pretrained``); the LoRA side adds rank-``r`` adapters on the ViT and the DETR encoder's
and decoder's attention (configs/sam3_lora.yaml's targets), the full side trains every parameter.
Both run the same plain loop as bench_framework.py (detector, objective, fused AdamW over
``param_groups`` as ``Sam3LitModule``, clipping, schedule) on the same pre-materialised shapes batches. Timing: wall clock
from step ``warmup`` to the last step, the two sides interleaved (who goes first alternates), each
measurement restarting from the initial weights, median of ``repeats``. A fp32 1024 x 1024 matmul
rate is printed beside the figures (2-core machines of one kind differ 2x). Saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from bench_framework import materialise  # the same pre-materialised batches (this folder is on sys.path)
from sam3_train.callbacks import matmul_gflops
from sam3_train.lit import Sam3LitModule
from sam3_train.model import build_detector
from sam3_train.model.lora import LoraSettings
from sam3_train.optim import param_groups, schedule_factor

TARGETS = ["vit_attention", "detr_encoder_attention", "detr_decoder_attention"]


def run_steps(module: Sam3LitModule, batches: list, warmup: int) -> float:
    """Seconds per step of the plain training loop over ``batches``, the first ``warmup`` untimed."""
    h = module.hparams
    groups = param_groups(module.detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text,
                          layer_decay=h.layer_decay, weight_decay=h.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.999), fused=True)  # as Sam3LitModule
    scheduler = LambdaLR(optimizer, partial(schedule_factor, total_steps=len(batches), kind=h.schedule,
                                            warmup_steps=h.warmup_steps))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    module.train()
    start = None
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        loss = module.criterion.weighted_total(module.criterion(module.detector(batch), batch.targets),
                                               num_pairs=batch.num_pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def bench_preset(preset: str, batches: list, args, tmp: Path) -> dict:
    base = tmp / f"base_{preset}"
    build_detector(preset, image_size=args.image_size).save_pretrained(base)
    lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05, target_modules=TARGETS)
    modules = {"full": Sam3LitModule(pretrained=str(base)), "lora": Sam3LitModule(pretrained=str(base), lora=lora)}
    initial = {side: copy.deepcopy(m.state_dict()) for side, m in modules.items()}
    times: dict[str, list[float]] = {"full": [], "lora": []}
    for repeat in range(args.repeats):
        for side in (("full", "lora") if repeat % 2 == 0 else ("lora", "full")):
            modules[side].load_state_dict(initial[side])
            torch.manual_seed(repeat)
            times[side].append(run_steps(modules[side], batches, args.warmup))
            print(f"{preset:<6} repeat {repeat} {side:<5} {times[side][-1] * 1e3:8.1f} ms/step", flush=True)
    trainable = {side: sum(p.numel() for p in m.parameters() if p.requires_grad) for side, m in modules.items()}
    full, lora_s = statistics.median(times["full"]), statistics.median(times["lora"])
    return {
        "preset": preset, "s_per_step": times, "full_median_s": full, "lora_median_s": lora_s,
        "steps_per_s": {"full": 1 / full, "lora": 1 / lora_s}, "speedup": full / lora_s,
        "paired_speedup": statistics.median(f / l for f, l in zip(times["full"], times["lora"])),
        "trainable_parameters": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4, help="images per step")
    parser.add_argument("--phrases", type=int, default=4, help="phrases per image")
    parser.add_argument("--steps", type=int, default=12, help="steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("sam3_train").setLevel(logging.ERROR)

    gflops = matmul_gflops()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        batches = materialise(args, Path(tmp) / "shapes")
        for preset in args.presets:
            results.append(bench_preset(preset, batches, args, Path(tmp)))
    pairs = sum(b.num_pairs for b in batches) / len(batches)
    print(f"\n{args.image_size} px, {args.batch_size} images x <= {args.phrases} phrases ({pairs:.1f} pairs/step), "
          f"{args.steps - args.warmup} timed steps x {args.repeats} repeats, {args.threads} thread(s), "
          f"fp32 matmul {gflops:.0f} GFLOP/s; LoRA rank {args.rank} on {', '.join(TARGETS)}")
    print(f"  {'preset':<7}{'full steps/s':>13}{'LoRA steps/s':>14}{'LoRA / full':>13}{'paired':>9}"
          f"{'trained full':>14}{'trained LoRA':>14}")
    for r in results:
        n = r["trainable_parameters"]
        print(f"  {r['preset']:<7}{r['steps_per_s']['full']:>13.2f}{r['steps_per_s']['lora']:>14.2f}"
              f"{r['speedup']:>12.2f}x{r['paired_speedup']:>8.2f}x{n['full']:>14,}{n['lora']:>14,}")
    record = {"benchmark": "lora_vs_full", "image_size": args.image_size, "batch_size": args.batch_size,
              "phrases_per_image": args.phrases, "pairs_per_step": pairs, "timed_steps": args.steps - args.warmup,
              "repeats": args.repeats, "threads": args.threads, "rank": args.rank, "targets": TARGETS,
              "matmul_gflops": gflops, "torch": torch.__version__, "machine": platform.machine(), "presets": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
