"""Framework overhead: ``Trainer.fit`` on ``Sam3LitModule`` against a plain PyTorch loop, same everything.

    python benchmarks/bench_framework.py                       # tiny, 224 px, 40 timed steps, 5 repeats
    python benchmarks/bench_framework.py --preset small --steps 30

Both sides train the same detector (reset to the same initial weights and seed before every
measurement) on the same pre-materialised batches of the built-in shapes dataset (``N`` batches taken
from ``Sam3DataModule.train_dataloader`` into a list), with the same objective, AdamW parameter
groups, learning-rate schedule and gradient clipping (L2 norm 0.1). The Lightning side is what
``sam3-train fit`` runs: ``Sam3LitModule.training_step`` with its per-term logging, a CSVLogger and
the progress bar; no validation, no checkpoints. The plain side is a ten-line loop.

Timing: wall clock from the start of step ``warmup`` to the end of the last step (setup and teardown
are per run, not per step, and are left out), alternating the two sides, median of ``repeats``.
Overhead = framework time / plain time - 1 (goal: at most 5 %). Saved as JSON (``--out``).
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

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from sam3_train.data import Sam3DataModule
from sam3_train.lit import Sam3LitModule
from sam3_train.optim import param_groups, schedule_factor

SPLITS = {"train": 64, "val": 16, "test": 16}


class StepClock(L.Callback):
    """Wall clock from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()
        self.losses.append(float(outputs["loss"]))  # after the clock: checks, not timing


class Batches:
    """The materialised batches as one iterable (a bare list would be read as a list of loaders)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def materialise(args, root: Path) -> list:
    dm = Sam3DataModule(shapes_root=str(root), shapes_splits=SPLITS, image_size=args.image_size,
                        batch_size=args.batch_size, max_phrases_per_image=args.phrases, num_workers=0,
                        steps_per_epoch=args.steps)
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.train_dataloader())


def run_lightning(module: Sam3LitModule, batches: list, args, log_dir: str) -> tuple[float, list[float]]:
    clock = StepClock(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=len(batches), max_epochs=1,
        gradient_clip_val=0.1, log_every_n_steps=10, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[clock],
        logger=L.pytorch.loggers.CSVLogger(log_dir, name="bench"), default_root_dir=log_dir,
    )
    trainer.fit(module, train_dataloaders=Batches(batches))
    assert trainer.global_step == len(batches), trainer.global_step
    return clock.end - clock.start, clock.losses


def run_plain(module: Sam3LitModule, batches: list, args) -> tuple[float, list[float]]:
    h = module.hparams
    detector, criterion = module.detector, module.criterion
    groups = param_groups(detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text,
                          layer_decay=h.layer_decay, weight_decay=h.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=(0.9, 0.999))
    scheduler = LambdaLR(optimizer, partial(schedule_factor, total_steps=len(batches), kind=h.schedule,
                                            warmup_steps=h.warmup_steps, cooldown_steps=h.cooldown_steps,
                                            timescale=h.timescale))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    module.train()
    start, losses = None, []
    for step, batch in enumerate(Batches(batches)):
        if step == args.warmup:
            start = time.perf_counter()
        outputs = detector(batch)
        terms = criterion(outputs, batch.targets)
        loss = criterion.weighted_total(terms, num_pairs=batch.num_pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())  # read after the clock stops: no sync inside the timed loop
    seconds = time.perf_counter() - start
    return seconds, [float(v) for v in losses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4, help="images per step")
    parser.add_argument("--phrases", type=int, default=4, help="phrases per image")
    parser.add_argument("--steps", type=int, default=45, help="steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--shapes-root", default=None, help="shapes dataset folder (default: a temporary one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "framework.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        batches = materialise(args, Path(args.shapes_root or tmp) / "shapes")
        module = Sam3LitModule(preset=args.preset, image_size=args.image_size)
        initial = copy.deepcopy(module.state_dict())
        times: dict[str, list[float]] = {"lightning": [], "plain": []}
        losses: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            order = ("plain", "lightning") if repeat % 2 == 0 else ("lightning", "plain")  # alternate who goes first
            for side in order:
                module.load_state_dict(initial)
                torch.manual_seed(repeat)
                seconds, step_losses = (run_plain(module, batches, args) if side == "plain"
                                        else run_lightning(module, batches, args, tmp))
                losses[side] = step_losses
                per_step = seconds / (len(batches) - args.warmup)
                times[side].append(per_step)
                print(f"repeat {repeat} {side:<9} {per_step * 1e3:8.1f} ms/step", flush=True)

    plain, lightning = statistics.median(times["plain"]), statistics.median(times["lightning"])
    overhead = 100.0 * (lightning / plain - 1.0)
    # Neighbouring measurements share the machine's load of the moment: the paired ratio is steadier.
    paired = 100.0 * (statistics.median(a / b for a, b in zip(times["lightning"], times["plain"])) - 1.0)
    # Same model, data, objective and optimiser: the last repeat's per-step losses agree on both sides.
    loss_gap = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses["lightning"], losses["plain"]))
    pairs = sum(b.num_pairs for b in batches) / len(batches)
    print(f"\n{args.preset} @ {args.image_size} px, {args.batch_size} images x <= {args.phrases} phrases "
          f"({pairs:.1f} pairs/step), {len(batches) - args.warmup} timed steps x {args.repeats} repeats, "
          f"{args.threads} thread(s)")
    print(f"  plain loop        {plain * 1e3:8.1f} ms/step (median)")
    print(f"  Trainer.fit       {lightning * 1e3:8.1f} ms/step (median)")
    print(f"  framework overhead {overhead:+.1f} % of medians, {paired:+.1f} % median of paired repeats (goal <= 5 %)")
    print(f"  same computation: largest relative per-step loss difference {loss_gap:.1e} "
          f"(first loss {losses['plain'][0]:.3f}, last {losses['plain'][-1]:.3f})")
    result = {
        "benchmark": "framework_overhead", "preset": args.preset, "image_size": args.image_size,
        "batch_size": args.batch_size, "phrases_per_image": args.phrases, "pairs_per_step": pairs,
        "timed_steps": len(batches) - args.warmup, "repeats": args.repeats, "threads": args.threads,
        "torch": torch.__version__, "lightning": L.__version__, "machine": platform.machine(),
        "plain_s_per_step": times["plain"], "lightning_s_per_step": times["lightning"],
        "plain_median_s": plain, "lightning_median_s": lightning, "overhead_percent": overhead, "paired_overhead_percent": paired,
        "max_relative_loss_difference": loss_gap,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
