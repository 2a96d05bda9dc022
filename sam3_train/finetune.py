"""Fine-tuning callbacks: the zero-shot validation and the before / best / last verdict
(:class:`ZeroShotBaseline`), and the logged share of each weighted training source (:class:`SourceShare`).

    trainer:
      callbacks:
        - class_path: sam3_train.finetune.ZeroShotBaseline
          init_args: {monitor: val/domain/cgF1}
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {monitor: val/domain/cgF1, mode: max, save_top_k: 1, filename: "best-{step}"}

:class:`ZeroShotBaseline` runs the validation loop once before the first training step (the model as
loaded: the released weights, or ``model.pretrained``), so every ``val/...`` curve starts at the
zero-shot value, logged at step 0. It records each validation's value of ``metric`` (cgF1) per
validation set (``val/cgF1``, or ``val/<set>/cgF1`` with ``data.val_sets``) and at the end of ``fit``
writes ``finetune_summary.json`` into the run folder (rank 0) and hands :class:`RunSummary
<sam3_train.callbacks.RunSummary>` its lines: per set zero-shot -> best -> last, a flag where the last
value fell more than ``tolerance`` below zero-shot (forgetting), and whether the ``monitor`` metric
ever beat the start.

Keeping the best: Lightning's ``ModelCheckpoint(monitor=...)`` keeps the best fine-tuned checkpoint but
never saves at step 0 (nothing trained yet). The start is compared here instead: when no validation
after it beat the zero-shot value, the verdict says so and names the starting weights
(``model.pretrained``) as the best; ``best_checkpoint`` in the JSON is then that folder.

Resuming (``--ckpt_path last``) does not validate again: the zero-shot values and the history travel
in the checkpoint (``state_dict``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from sam3_train.data.mixing import source_shares

log = logging.getLogger(__name__)
SUMMARY_FILE = "finetune_summary.json"


def set_name(key: str, metric: str) -> str | None:
    """``val/cgF1`` -> ``val`` (the single unnamed set); ``val/domain/cgF1`` -> ``domain``; else None."""
    parts = key.split("/")
    if parts[0] != "val" or parts[-1] != metric or len(parts) not in (2, 3):
        return None
    return parts[1] if len(parts) == 3 else "val"


class ZeroShotBaseline(L.Callback):
    """Validate before training, then judge the fine-tune against that start (module docstring).

    Args:
        monitor: the metric that picks the best checkpoint (as ``ModelCheckpoint(monitor=...)``), e.g.
            ``val/domain/cgF1``; None: the metric of the first validation set.
        mode: ``max`` (higher is better) or ``min``.
        validate_at_start: run the zero-shot validation before the first step; False only records.
        metric: the metric name judged per validation set.
        tolerance: a set whose last value is more than this below its zero-shot value is flagged as
            forgotten (metric units: cgF1 points).
    """

    def __init__(self, *, monitor: str | None = None, mode: str = "max", validate_at_start: bool = True,
                 metric: str = "cgF1", tolerance: float = 1.0):
        if mode not in ("max", "min"):
            raise ValueError(f"ZeroShotBaseline: mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode, self.validate_at_start = monitor, mode, validate_at_start
        self.metric, self.tolerance = metric, tolerance
        self.zero_shot: dict[str, float] | None = None  # every val/ value of the start validation
        self.history: dict[str, list[tuple[int, float]]] = {}  # key -> (step, value) per validation after the start
        self._starting = False

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"zero_shot": self.zero_shot, "history": {k: [list(p) for p in v] for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zero_shot = state_dict.get("zero_shot")
        self.history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state_dict.get("history", {}).items()}

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path:  # a fresh run; a resumed one gets both back from the checkpoint
            self.zero_shot, self.history = None, {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.validate_at_start or self.zero_shot is not None or trainer.global_step > 0:
            return
        if not trainer.enable_validation:
            log.warning("ZeroShotBaseline: validation is off (no val data or limit_val_batches=0): no zero-shot value.")
            return
        # What the training epoch loop does around its own validations (training_epoch_loop.on_advance_end).
        connector = trainer._logger_connector
        first_loop_iter = connector._first_loop_iter
        self._starting = True
        trainer.validating = True
        try:
            trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            self._starting = False
            trainer.training = True
            connector._first_loop_iter = first_loop_iter

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if self._starting:
            self.zero_shot = values
            if trainer.is_global_zero:
                judged = {k: v for k, v in values.items() if set_name(k, self.metric)}
                print("sam3-train: zero-shot " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(judged.items())), flush=True)
            return
        for key, value in values.items():
            if set_name(key, self.metric) or key == self.monitor:
                self.history.setdefault(key, []).append((trainer.global_step, value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            report = self.report(trainer, pl_module)
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / SUMMARY_FILE).write_text(json.dumps(report, indent=1))

    # ---------------------------------------------------------------- the verdict
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _monitor(self) -> str | None:
        if self.monitor is not None:
            return self.monitor
        keys = sorted({k for k in [*(self.zero_shot or {}), *self.history] if set_name(k, self.metric)})
        return keys[0] if keys else None

    def _best(self, points: list[tuple[int, float]]) -> tuple[int, float] | None:
        best = None
        for step, value in points:
            if not math.isnan(value) and (best is None or self._better(value, best[1])):
                best = (step, value)
        return best

    def report(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> dict[str, Any]:
        """``{"monitor", "mode", "sets": {set: {"metric", "zero_shot", "best", "best_step", "last",
        "last_step", "forgot", "at_selected"}}, "beat_start", "best_checkpoint",
        "best_fine_tuned_checkpoint", "start_weights"}``; values None where unknown. ``at_selected`` is
        the set's value at the weights kept as best (the start's when nothing beat it)."""
        zero = self.zero_shot or {}
        monitor = self._monitor()
        start_weights = None
        if pl_module is not None:
            start_weights = getattr(pl_module, "hparams", {}).get("pretrained")
        beat_start, best_checkpoint = None, None
        selected = self._best(self.history.get(monitor, [])) if monitor else None
        checkpoint = next((c for c in trainer.checkpoint_callbacks
                           if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None) if monitor else None
        best_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        if selected is not None:
            start = zero.get(monitor)
            beat_start = start is None or math.isnan(start) or self._better(selected[1], start)
            best_checkpoint = best_path if beat_start else start_weights
        sets: dict[str, dict[str, Any]] = {}
        for key in sorted({k for k in [*zero, *self.history] if set_name(k, self.metric)}):
            points = self.history.get(key, [])
            best, last, start = self._best(points), (points[-1] if points else None), zero.get(key)
            forgot = None
            if start is not None and last is not None:
                drop = (start - last[1]) if self.mode == "max" else (last[1] - start)
                forgot = bool(drop > self.tolerance)
            at_selected = start if beat_start is False else next(
                (v for step, v in points if selected is not None and step == selected[0]), None)
            sets[set_name(key, self.metric)] = {
                "metric": key, "zero_shot": start, "best": best[1] if best else None,
                "best_step": best[0] if best else None, "last": last[1] if last else None,
                "last_step": last[0] if last else None, "forgot": forgot, "at_selected": at_selected}
        return {"monitor": monitor, "mode": self.mode, "sets": sets, "beat_start": beat_start,
                "best_checkpoint": best_checkpoint, "best_fine_tuned_checkpoint": best_path,
                "start_weights": start_weights}

    def summary_lines(self, trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> list[str]:
        """The verdict as RunSummary prints it."""
        report = self.report(trainer, pl_module)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines = [f"  {'zero-shot -> best -> last':<24} ({self.metric}; best by {report['monitor']})"]
        for name, s in report["sets"].items():
            flag = ""
            if s["forgot"]:
                flag = f"  WORSE than zero-shot by {abs(s['zero_shot'] - s['last']):.2f}: forgetting"
            best_at = f" (step {s['best_step']})" if s["best_step"] is not None else ""
            lines.append(f"  {name:<24} {fmt(s['zero_shot'])} -> {fmt(s['best'])}{best_at} -> {fmt(s['last'])}{flag}")
        if report["beat_start"] is False:
            start = report["start_weights"] or "the run's initial weights (no model.pretrained)"
            lines.append(f"  NEVER BEAT ZERO-SHOT on {report['monitor']}: the best weights are the starting ones, {start}")
        elif report["beat_start"] and report["best_checkpoint"]:
            lines.append(f"  best checkpoint          {report['best_checkpoint']}")
        return lines


class SourceShare(L.Callback):
    """Logs ``train/source_share/<name>``: the share of this epoch's training images that came from each
    training source (``Batch.sources``), weighted by images and reduced over ranks (``sync_dist``), so
    a 1:1 mix reads about 0.5 / 0.5. ``Sam3LitModule`` adds it when the data module names sources."""

    def __init__(self, *, names: Sequence[str]):
        self.names = list(names)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sources = getattr(batch, "sources", None)
        if not sources:
            return
        for name, share in source_shares(sources, self.names).items():
            pl_module.log(f"train/source_share/{name}", share, on_step=False, on_epoch=True, sync_dist=True,
                          batch_size=len(sources))
