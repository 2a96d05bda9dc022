"""Score a checkpoint at a common resolution, so that models trained at different input sizes compare.

    python benchmarks/score_at_size.py runs/a/checkpoints/last.ckpt runs/b/checkpoints/last.ckpt --size 256

Validation scores masks at the model's own input size S: the ground truth is resized to S with the
image (``Sam3LitModule._evaluate``). A 168-px model is then scored against coarser masks than a 224-px
one, and the two cgF1 figures do not compare. Here each checkpoint predicts at its own S on the split
its run validated on (the data settings saved in the checkpoint), its masks and boxes are scaled to
``--size`` (``postprocess``'s ``original_sizes``), and they are scored against the same images' ground
truth prepared at ``--size`` by a second data module (same images, same pairs, in the same order:
checked batch by batch). ``--size`` equal to S gives the run's own validation figures. The built-in
shapes are drawn at 256 px, their native size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3_train.checkpointing import load_checkpoint_file  # noqa: E402
from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.lit import cgf1_targets, eval_targets  # noqa: E402
from sam3_train.loading import load_module  # noqa: E402
from sam3_train.metrics.cgf1 import CGF1  # noqa: E402
from sam3_train.model.postprocess import postprocess  # noqa: E402

KEYS = ("cgF1", "box_cgF1", "cgF1@50", "pmF1", "IL_MCC")


def data_module(settings: dict, image_size: int, split: str) -> Sam3DataModule:
    """The checkpoint's data module at ``image_size``, set up for ``split`` (one worker: the order is
    the shards' own)."""
    kwargs = {k: v for k, v in settings.items() if not k.startswith("_")}
    dm = Sam3DataModule(**{**kwargs, "image_size": image_size, "num_workers": 0})
    dm.prepare_data()
    dm.setup("validate" if split == "val" else "test")
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    if isinstance(loader, list):
        raise ValueError("the run validated on named val_sets: score one set at a time (not supported here)")
    return loader


@torch.no_grad()
def score(checkpoint: str | Path, size: int, *, split: str = "val") -> dict[str, float]:
    """Every figure of :class:`CGF1` (cgF1 and its parts, masks and boxes) of ``checkpoint`` on ``split``,
    scored at ``size`` px, with the model's ``image_size`` and the ``pairs`` read."""
    module = load_module(checkpoint).eval()
    settings = load_checkpoint_file(checkpoint, mmap=True).get("datamodule_hyper_parameters")
    if not settings:
        raise ValueError(f"{checkpoint} holds no data module settings (not a `sam3-train fit` checkpoint)")
    own, common = data_module(settings, module.detector.image_size, split), data_module(settings, size, split)
    metric = CGF1()
    pairs = 0
    for batch, reference in zip(own, common, strict=True):
        if batch.num_pairs != reference.num_pairs or not torch.equal(batch.pair_image, reference.pair_image):
            raise RuntimeError("the two data modules disagree on the pairs of a batch")
        outputs = module.detector(batch)
        sizes = torch.tensor([[size, size]] * batch.images.shape[0])
        preds = postprocess(outputs, batch, original_sizes=sizes, score_threshold=module.hparams.eval_score_threshold,
                            max_detections=module.hparams.max_detections, keep_above=metric.score_threshold)
        metric.update(preds, cgf1_targets(reference, eval_targets(reference)))
        pairs += batch.num_pairs
    values = {k: float(v) for k, v in metric.compute().items()}
    return {"image_size": module.detector.image_size, "pairs": pairs, **values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--size", type=int, default=256, help="the resolution scored at (default 256: the shapes' own)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        row = score(checkpoint, args.size, split=args.split)
        print(f"{checkpoint}: model {row['image_size']} px, scored at {args.size} px on {row['pairs']} {args.split} "
              "pairs: " + ", ".join(f"{k} {row[k]:.3f}" for k in KEYS), flush=True)


if __name__ == "__main__":
    main()
