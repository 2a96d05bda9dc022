"""An exponential moving average of the weights, validated and saved in place of them.

Lightning's ``EMAWeightAveraging`` does the work: after every optimiser step it updates an
``AveragedModel`` copy of the module (``decay`` * average + (1 - ``decay``) * weights), swaps the
average in for every validation, writes it as the checkpoint's ``state_dict`` (so ``validate``,
``predict``, ``export`` and a warm start read the average) with the trained weights beside it under
``current_model_state``, and copies it into the module when ``fit`` ends. A resumed run restores both.

What this class adds is LoRA: an adapter checkpoint holds the trained tensors only
(``model/lora.py``), and the average's strict load would miss the frozen base's. On resume they are
taken from the module, which holds the base at that point; the adapters come from the checkpoint.

    sam3-train fit --config configs/X.yaml --trainer.callbacks+=sam3_train.ema.EMA \\
        --trainer.callbacks.decay=0.998

Costs: a second copy of the module (``device="cpu"`` keeps it off the accelerator) and one average
update a step. Not part of SAM 3's recipe; measured on the shapes job in docs/training_shapes.md.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same arguments: ``decay``, ``update_every_n_steps``,
    ``update_starting_at_step``, ``device``, ...) that also resumes LoRA runs."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None and getattr(pl_module, "lora", None) is not None:
            # The module has loaded the checkpoint's (averaged) adapters over its base; the base's tensors,
            # frozen and so the same in the average, complete the average's state.
            own = pl_module.state_dict()
            checkpoint["state_dict"] = {**{k: v for k, v in own.items() if k not in checkpoint["state_dict"]},
                                        **checkpoint["state_dict"]}
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
