"""Lightning callbacks: prediction files, W&B validation pictures, the step rate with an early ETA,
the end-of-run summary, and training for a time budget."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from sam3_train.data import rle
from sam3_train.data.batch import Batch
from sam3_train.optim import LRSchedule
from sam3_train.visualize import denormalise, label_map, overlay, slug

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions-rank{r}.jsonl`` (one line per image: its phrases' detections) under
    ``output_dir``, each rank its own file; with ``overlays`` a PNG per (image, phrase); with
    ``coco_results`` also a COCO results file ``predictions.coco.json`` (all ranks merged by rank 0).

    A line: ``{"key", "height", "width", "phrases": [{"phrase", "presence", "detections":
    [{"score", "box" [x0, y0, x1, y1] pixels, "rle"}]}]}``.

    A COCO result: ``{"image_id", "category_id", "bbox" [x, y, w, h] pixels, "score", "segmentation"
    (RLE), "phrase"}``; ``image_id`` is the sample json's (the COCO id for converted COCO data).
    Category ids come from ``categories`` (a COCO annotations JSON: its category names, underscores
    read as spaces, as the COCO converter makes phrases) or, without it, number the sorted phrases
    from 1; ``categories.json`` next to the results lists the ids used.
    """

    def __init__(self, *, output_dir: str = "predictions", overlays: bool = False, max_overlays: int = 200,
                 coco_results: bool = False, categories: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overlays = overlays
        self.max_overlays = max_overlays
        self.coco_results = coco_results
        self.categories = categories
        if categories is not None and not Path(categories).is_file():
            raise FileNotFoundError(f"PredictionWriter.categories: {categories} is not a file (a COCO annotations JSON)")
        self._written = 0
        self._coco: list[dict] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.open(rank=trainer.global_rank)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.write(prediction["batch"], prediction["predictions"], rank=trainer.global_rank, batch_idx=batch_idx)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close(rank=trainer.global_rank, world_size=trainer.world_size, barrier=trainer.strategy.barrier)

    # The writing itself, also called outside Lightning (sam3_train.deploy's onnxruntime predictor).
    def open(self, *, rank: int = 0) -> None:
        """Start this rank's files."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._path = self.output_dir / f"predictions-rank{rank}.jsonl"
        self._file = self._path.open("w")
        self._coco = []

    def write(self, batch: Batch, preds: list[dict], *, rank: int = 0, batch_idx: int = 0) -> None:
        """One batch's post-processed detections (``postprocess``'s list, one dict per pair)."""
        sizes = batch.original_sizes if batch.original_sizes is not None else batch.image_sizes
        for i in range(batch.num_images):
            height, width = sizes[i].tolist()
            key = batch.keys[i] if batch.keys else f"{rank}-{batch_idx}-{i}"
            phrases = []
            for p in (batch.pair_image == i).nonzero().flatten().tolist():
                pred = preds[p]
                phrase = batch.phrases[p] if batch.phrases else ""
                detections = [
                    {"score": round(float(s), 5), "box": [round(float(c), 2) for c in b],
                     **({"rle": rle.encode(m.cpu().numpy())} if "masks" in pred else {})}
                    for s, b, m in zip(pred["scores"], pred["boxes"], pred.get("masks", [None] * len(pred["scores"])))
                ]
                phrases.append({"phrase": phrase, "presence": float(pred["presence"]), "detections": detections})
                if self.coco_results:
                    image_id = batch.image_ids[i] if batch.image_ids else key
                    self._coco.extend(_coco_result(image_id, phrase, d) for d in detections)
                if self.overlays and "masks" in pred and self._written < self.max_overlays:
                    self._write_overlay(batch, i, p, pred, key, (height, width))
            self._file.write(json.dumps({"key": key, "height": height, "width": width, "phrases": phrases}) + "\n")
        self._file.flush()

    def _write_overlay(self, batch: Batch, image: int, pair: int, pred: dict, key: str, size: tuple[int, int]) -> None:
        h, w = batch.image_sizes[image].tolist()
        content = Image.fromarray(denormalise(batch.images[image])[:h, :w])
        picture = np.asarray(content.resize((size[1], size[0]), Image.BILINEAR))  # back to the original size
        labels = [f"{batch.phrases[pair]} {s:.2f}" for s in pred["scores"].tolist()]
        folder = self.output_dir / "overlays"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{key}-{pair}-{slug(batch.phrases[pair])}.png"
        overlay(picture, pred["masks"], boxes=pred["boxes"], labels=labels).save(folder / name)
        self._written += 1

    def close(self, *, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None) -> None:
        """Close this rank's files; after ``barrier`` (every rank's files written) rank 0 merges the COCO results."""
        self._file.close()
        if self.coco_results:
            rank_file = self.output_dir / f"predictions-rank{rank}.coco.json"
            rank_file.write_text(json.dumps(self._coco))
        if barrier is not None:
            barrier()
        if rank != 0:
            return
        if self.coco_results:
            self._merge_coco(world_size)
        log.info("Predictions written to %s", self.output_dir)
        print(f"predictions: {self.output_dir}/predictions-rank*.jsonl"
              + (f", COCO results {self.output_dir}/predictions.coco.json" if self.coco_results else "")
              + (f", overlays in {self.output_dir}/overlays" if self.overlays else ""))

    def _merge_coco(self, world_size: int) -> None:
        """Rank 0: every rank's results in one file, phrases given category ids."""
        results = []
        for rank in range(world_size):
            part = self.output_dir / f"predictions-rank{rank}.coco.json"
            results.extend(json.loads(part.read_text()))
            part.unlink()
        phrases = sorted({r["phrase"] for r in results})
        if self.categories is not None:
            from sam3_train.data.convert_coco import category_phrase

            ids = {category_phrase(c["name"]): int(c["id"]) for c in json.loads(Path(self.categories).read_text())["categories"]}
            unknown = [p for p in phrases if p not in ids]
            if unknown:
                raise ValueError(f"PredictionWriter: phrases {unknown[:5]} are not categories of {self.categories}")
        else:
            ids = {p: i + 1 for i, p in enumerate(phrases)}
        for r in results:
            r["category_id"] = ids[r["phrase"]]
        (self.output_dir / "predictions.coco.json").write_text(json.dumps(results))
        categories = [{"id": ids[p], "name": p} for p in phrases]
        (self.output_dir / "categories.json").write_text(json.dumps(categories, indent=1))


def _coco_result(image_id: str | int, phrase: str, detection: dict) -> dict:
    """One detection of the JSONL record as a COCO result (xywh box); category id set at the merge."""
    x0, y0, x1, y1 = detection["box"]
    result = {"image_id": image_id, "category_id": None, "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
              "score": detection["score"], "phrase": phrase}
    if "rle" in detection:
        result["segmentation"] = detection["rle"]
    return result


class ValidationImages(L.Callback):
    """Logs ground truth and predicted masks of the first ``num_images`` validation images per phrase:
    to W&B as ``wandb.Image`` with one label map per mask set, and as PNG overlays under
    ``{default_root_dir}/overlays/step{N}`` for every logger (with named validation sets: one image
    list ``val/<set>/examples`` and one folder ``step{N}/<set>`` per set)."""

    def __init__(self, *, num_images: int = 4, max_phrases: int = 3):
        self.num_images = num_images
        self.max_phrases = max_phrases
        self.last_dir: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking or outputs is None:
            return
        out_dir = Path(trainer.default_root_dir) / "overlays" / f"step{trainer.global_step:06d}"
        sets = getattr(trainer.datamodule, "val_set_names", None) if trainer.datamodule is not None else None
        if sets:  # named validation sets (data.val_sets): a folder and a W&B key per set
            out_dir = out_dir / sets[dataloader_idx]
        key = f"val/{sets[dataloader_idx]}/examples" if sets else "val/examples"
        out_dir.mkdir(parents=True, exist_ok=True)
        panels = []
        for i in range(min(self.num_images, batch.num_images)):
            h, w = batch.image_sizes[i].tolist()
            picture = denormalise(batch.images[i])[:h, :w]
            for p in (batch.pair_image == i).nonzero().flatten().tolist()[: self.max_phrases]:
                pred = outputs[p]
                keep = pred["scores"] >= 0.5
                truth = batch.targets[p]["masks"][:, :h, :w]
                phrase = batch.phrases[p] if batch.phrases else str(p)
                side = np.concatenate([np.asarray(overlay(picture, truth)),
                                       np.asarray(overlay(picture, pred["masks"][keep], boxes=pred["boxes"][keep]))], 1)
                Image.fromarray(side).save(out_dir / f"img{i}-{slug(phrase)}.png")
                panels.append((picture, truth, pred["masks"][keep], phrase))
        self.last_dir = out_dir
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                images = [
                    wandb.Image(picture, caption=phrase, masks={
                        "ground_truth": {"mask_data": label_map(truth), "class_labels": _labels(phrase, len(truth))},
                        "prediction": {"mask_data": label_map(pred), "class_labels": _labels(phrase, len(pred))},
                    })
                    for picture, truth, pred, phrase in panels
                ]
                logger.experiment.log({key: images, "trainer/global_step": trainer.global_step})


def _labels(phrase: str, n: int) -> dict[int, str]:
    return {0: "background", **{i + 1: f"{phrase} #{i + 1}" for i in range(max(n, 1))}}


def matmul_gflops(size: int = 1024, seconds: float = 0.3, dtype: torch.dtype = torch.float32) -> float:
    """This machine's ``size`` x ``size`` matmul rate in GFLOP/s (fp32 unless ``dtype``; best of repeats
    over ``seconds``): the yardstick that makes a step time comparable across machines (they differ up
    to 2x)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class RunSummary(L.Callback):
    """Prints, on rank 0, the measured step rate and an ETA early in ``fit`` (steps ``skip`` to
    ``skip + window`` after the start, next to this machine's matmul rate), and at the end the last
    validation metrics (per named validation set), the whole run's step rate and where things are; with
    a :class:`~sam3_train.finetune.ZeroShotBaseline` callback also its verdict per validation set
    (zero-shot -> best -> last, forgetting, whether the fine-tune beat the start).

    Args:
        skip: steps left out of the measurement (warm-up: first allocations, worker start).
        window: steps the early measurement spans.
    """

    def __init__(self, *, skip: int = 10, window: int = 20):
        self.skip, self.window = skip, window
        self._start_step: int | None = None
        self._marks: dict[int, float] = {}
        self.gflops: float | None = None
        self.fit_start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step, self._marks = None, {}
        self.fit_start = time.perf_counter()
        if trainer.is_global_zero and pl_module.device.type == "cpu":
            self.gflops = matmul_gflops()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._start_step is None:
            self._start_step = trainer.global_step
        done = trainer.global_step - self._start_step
        if done in (self.skip, self.skip + self.window) and done not in self._marks:
            self._marks[done] = time.perf_counter()
            if done == self.skip + self.window and trainer.is_global_zero:
                print(self._eta_line(trainer), flush=True)

    def step_seconds(self) -> float | None:
        """Seconds per optimiser step over the early window (None until it has passed)."""
        if len(self._marks) < 2:
            return None
        return (self._marks[self.skip + self.window] - self._marks[self.skip]) / self.window

    def _eta_line(self, trainer: L.Trainer) -> str:
        per_step = self.step_seconds()
        machine = f" on a machine whose 1024x1024 fp32 matmul runs at {self.gflops:.0f} GFLOP/s" if self.gflops else ""
        line = f"sam3-train: {per_step:.3f} s a step (steps {self.skip}-{self.skip + self.window}){machine}"
        if trainer.max_steps and trainer.max_steps > 0:
            left = trainer.max_steps - trainer.global_step
            line += f"; {left:,} steps left: about {left * per_step / 60:.0f} min of training, validation aside"
        return line

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        lines = ["", "sam3-train: fit finished"]
        names = ("cgF1", "cgF1@50", "IL_MCC", "pmF1", "mAP", "presence_accuracy")
        sets = getattr(trainer.datamodule, "val_set_names", None) if trainer.datamodule is not None else None
        for prefix in [f"val/{s}/" for s in sets] if sets else ["val/"]:
            for key in (prefix + name for name in names):
                if key in metrics:
                    lines.append(f"  {key:<24} {metrics[key]:.2f}")
        for callback in trainer.callbacks:
            # finetune.ZeroShotBaseline (same layer, not imported): per set zero-shot -> best -> last, the verdict
            if callable(getattr(callback, "summary_lines", None)):
                lines += callback.summary_lines(trainer, pl_module)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "last_model_path", ""):
            lines.append(f"  checkpoint               {ckpt.last_model_path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                lines.append(f"  W&B run                  {logger.experiment.dir}")
            elif logger.log_dir:
                lines.append(f"  {type(logger).__name__:<24} {logger.log_dir}")
        for callback in trainer.callbacks:
            if isinstance(callback, ValidationImages) and callback.last_dir is not None:
                lines.append(f"  overlays                 {callback.last_dir}")
        steps = trainer.global_step - (self._start_step or 0)
        if self.fit_start is not None and steps > 0:
            minutes = (time.perf_counter() - self.fit_start) / 60
            machine = f", matmul {self.gflops:.0f} GFLOP/s" if self.gflops else ""
            lines.append(f"  time                     {minutes:.1f} min for {steps:,} steps (validation included{machine})")
        print("\n".join(lines))


class TimeBudget(L.Callback):
    """Train for a wall-clock budget instead of a step count: ``minutes`` of ``fit``, validation included.

    After ``measure`` steps it works out how many steps the rest of the budget holds at the measured
    step rate, and stops there (Lightning's ``should_stop``, so the last step is validated and
    checkpointed); it plans again after every validation with that validation's measured time.
    The learning-rate schedule follows the plan: the ``total_steps`` of each ``optim.LRSchedule`` the
    trainer's LambdaLRs step becomes the planned step count, so a cosine schedule still ends at zero
    when the budget does. ``trainer.max_steps`` stays an upper bound. The plan is saved in checkpoints
    and a resumed run keeps the budget left.

    The step count then depends on the machine and its load: two runs are no longer bitwise equal
    (a fixed ``max_steps`` is; README). Add it from the command line::

        sam3-train fit --config configs/shapes_tiny.yaml \\
            --trainer.callbacks+=sam3_train.callbacks.TimeBudget --trainer.callbacks.minutes=15

    Args:
        minutes: the budget for training and validation, from the start of ``fit`` (setup aside).
        measure: steps timed before the first plan (the first ``skip`` left out as warm-up).
        skip: warm-up steps not timed.
    """

    def __init__(self, minutes: float, *, measure: int = 30, skip: int = 10):
        if minutes <= 0:
            raise ValueError(f"TimeBudget: minutes must be positive, got {minutes}")
        if measure <= skip:
            raise ValueError(f"TimeBudget: measure ({measure}) must be larger than skip ({skip})")
        self.minutes, self.measure, self.skip = minutes, measure, skip
        self.planned_steps: int | None = None
        self.spent = 0.0  # seconds of earlier fit sessions (a resumed run)
        self.validation_seconds: float | None = None  # the last validation's duration
        self._start: float | None = None
        self._first_step = 0
        self._timer: tuple[int, float] | None = None  # (steps, seconds) of training since the timing started
        self._val_start: float | None = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        spent = self.spent + (time.perf_counter() - self._start if self._start is not None else 0.0)
        return {"planned_steps": self.planned_steps, "spent": spent, "validation_seconds": self.validation_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned_steps = state_dict.get("planned_steps")
        self.spent = float(state_dict.get("spent", 0.0))
        self.validation_seconds = state_dict.get("validation_seconds")

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_step = trainer.global_step
        self._timer = None
        if self.planned_steps is not None:  # resumed: the restored schedule follows the saved plan
            self._set_schedule(trainer, self.planned_steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        done = trainer.global_step - self._first_step
        if done == self.skip and self._timer is None:
            self._timer = (trainer.global_step, time.perf_counter())
        elif done == self.measure:
            self._plan(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.planned_steps is not None and trainer.global_step >= self.planned_steps:
            trainer.should_stop = True  # the epoch loop validates before it stops

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._val_start is None:
            return
        seconds = time.perf_counter() - self._val_start
        self.validation_seconds = seconds
        if self._timer is not None:  # training time excludes validation
            steps, since = self._timer
            self._timer = (steps, since + seconds)
        self._val_start = None
        if self.planned_steps is not None and trainer.global_step < self.planned_steps:
            self._plan(trainer)

    # ---------------------------------------------------------------- the plan
    def step_seconds(self, trainer: L.Trainer) -> float | None:
        if self._timer is None or trainer.global_step <= self._timer[0]:
            return None
        steps, since = self._timer
        return (time.perf_counter() - since) / (trainer.global_step - steps)

    def _plan(self, trainer: L.Trainer) -> None:
        per_step = self.step_seconds(trainer)
        if per_step is None or self._start is None:
            return
        left = self.minutes * 60 - self.spent - (time.perf_counter() - self._start)
        interval = trainer.val_check_batch if isinstance(trainer.val_check_batch, int) else 0
        per_validation = self.validation_seconds or 0.0
        cost = per_step + (per_validation / interval if interval and trainer.limit_val_batches else 0.0)
        planned = trainer.global_step + max(0, int((left - per_validation) / cost))  # the final validation too
        if trainer.max_steps and trainer.max_steps > 0:
            planned = min(planned, trainer.max_steps)
        planned = max(planned, trainer.global_step + 1)
        if planned != self.planned_steps:
            self.planned_steps = planned
            self._set_schedule(trainer, planned)
            if trainer.is_global_zero:
                print(f"sam3-train: time budget {self.minutes:g} min: {per_step:.3f} s a step"
                      f"{f', {per_validation:.0f} s a validation' if per_validation else ''}; "
                      f"training stops at step {planned:,}", flush=True)

    @staticmethod
    def _set_schedule(trainer: L.Trainer, total_steps: int) -> None:
        """Set ``total_steps`` of every :class:`~sam3_train.optim.LRSchedule` the trainer's LambdaLRs step."""
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            schedules = [fn for fn in getattr(scheduler, "lr_lambdas", ()) if isinstance(fn, LRSchedule)]
            if not schedules:
                continue
            for schedule in schedules:
                schedule.total_steps = total_steps
            # the current rates follow the new schedule at once, not from the next step
            for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
                group["lr"] = group["initial_lr"] * fn(scheduler.last_epoch)
