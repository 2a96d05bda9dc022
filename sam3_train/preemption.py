"""Preemption and dying ranks: save at a step boundary on SIGTERM / SIGUSR1, requeue under SLURM, and
exit with a clear message when a collective fails because another rank died or hung.

    #SBATCH --signal=SIGUSR1@90      # SLURM: SIGUSR1 90 s before the time limit
    srun sam3-train fit --config configs/sam3_finetune.yaml --ckpt_path last

On the signal, the handler only notes it. At the end of the current training step (of the current
gradient-accumulation window) all ranks agree on it (one all-reduce per step), save ``last.ckpt``
where ``--ckpt_path last`` finds it (atomically, see checkpointing.py), rank 0 runs ``scontrol
requeue`` when the signal is SLURM's requeue signal (SIGUSR1) under SLURM, and every rank exits with
status 128 + signal number. SIGTERM under SLURM saves without requeueing: SLURM requeues preempted
jobs itself, and ``scancel`` must stay a cancel. Lightning's own
SLURM handler saves from inside the signal handler instead: in the middle of a step, and under DDP
possibly in the middle of a collective, so its checkpoint cannot resume exactly. This callback
replaces Lightning's SIGTERM / SIGUSR1 handlers for the duration of training (sanity check included).

A signal during validation is acted on at the next training step; the ``--signal`` lead time must
cover the rest of a validation plus one checkpoint write.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from sam3_train.dist import any_rank, is_peer_failure
from sam3_train.resume import mid_accumulation

log = logging.getLogger(__name__)


def _slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    """Checkpoint-and-exit on a termination signal (see the module docstring).

    Args:
        signals: names of the signals acted on (``SIGTERM``: schedulers, Kubernetes, ``kill``;
            ``SIGUSR1``: SLURM's ``--signal`` warning).
        requeue: run ``scontrol requeue $SLURM_JOB_ID`` after saving; None: under SLURM (with
            Lightning's auto-requeue on, its default) and only for its requeue signal (SIGUSR1).
    """

    def __init__(self, *, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool | None = None):
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"Preemption(signals=...): {unknown} are not signal names (e.g. SIGTERM, SIGUSR1).")
        self.signals = tuple(signals)
        self.requeue = requeue
        self.received: int = 0
        self._previous: dict[int, Any] = {}
        self.saved_path: Path | None = None

    # ---- signal handling ------------------------------------------------------------------------
    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum  # nothing else here: a handler runs between two bytecodes of anything

    def _install(self) -> None:
        if self._previous or not _in_main_thread():
            return
        for name in self.signals:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._note)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning registers its own handlers just before; replace them

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Back to Lightning's handlers, which its own teardown (next) replaces by the ones from before fit.
        self._restore()

    # ---- acting at a step boundary --------------------------------------------------------------
    def _should_requeue(self, trainer: L.Trainer, signum: int) -> bool:
        if self.requeue is not None:
            return self.requeue
        environment = getattr(trainer.strategy, "cluster_environment", None) or getattr(
            trainer._accelerator_connector, "cluster_environment", None)
        return (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
                and signum == int(environment.requeue_signal or signal.SIGUSR1) and _slurm_job_id() is not None)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """``last.ckpt`` of the first ModelCheckpoint (where ``--ckpt_path last`` looks), else
        ``{default_root_dir}/hpc_ckpt_{N}.ckpt`` (which Lightning resumes from by itself under SLURM)."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        root = Path(trainer.default_root_dir)
        numbers = [int(p.stem.split("_")[-1]) for p in root.glob("hpc_ckpt_*.ckpt") if p.stem.split("_")[-1].isdigit()]
        return root / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = any_rank(self.received, device=pl_module.device)  # every rank, every step: they must agree
        if not signum or mid_accumulation(trainer):
            return
        name = signal.Signals(signum).name
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = path
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None:  # what the loop does right after this hook: log this step's metrics
            connector.update_train_step_metrics()
        requeue = self._should_requeue(trainer, signum)
        if trainer.is_global_zero:
            print(f"sam3-train: {name} received: saved {path} at step {trainer.global_step}; "
                  + ("requeueing the SLURM job." if requeue else "resume with the same command plus --ckpt_path last."),
                  file=sys.stderr, flush=True)
            if requeue:
                job = _slurm_job_id()
                result = subprocess.run(["scontrol", "requeue", str(job)], check=False)
                if result.returncode != 0:
                    log.warning("scontrol requeue %s failed (exit %d): resubmit the job by hand.", job, result.returncode)
        raise SystemExit(128 + signum)

    # ---- a rank that died or hung -----------------------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if trainer.world_size > 1 and is_peer_failure(exception):
            timeout = getattr(trainer.strategy, "_timeout", None)
            first = (str(exception).strip().splitlines() or [type(exception).__name__])[0]
            print(f"sam3-train: rank {trainer.global_rank} of {trainer.world_size}: a collective operation failed "
                  f"({type(exception).__name__}: {first[:300]}). Another rank most likely died or stopped "
                  f"responding; this rank exits instead of waiting (collective timeout {timeout}; set it with "
                  "trainer.strategy DDPStrategy's timeout). Resume with the same command plus --ckpt_path last.",
                  file=sys.stderr, flush=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
