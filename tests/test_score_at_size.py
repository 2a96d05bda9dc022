"""benchmarks/score_at_size.py: a checkpoint scored at a common resolution."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_own_size_gives_the_validation_figures_and_presence_does_not_depend_on_size(shapes_root, one_thread, tmp_path):
    """A tiny model made to call every query present (so detections, false positives and presence
    decisions exist to count), validated by Lightning and saved with its data settings: scored at its
    own 112 px the script gives validation's figures; at 224 px the same pairs and the same image-level
    decisions (presence does not depend on the mask size), while the masks are scored on finer ground truth."""
    from conftest import SHAPES_SPLITS, validated_checkpoint
    from score_at_size import score

    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    torch.manual_seed(0)
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, eval_batch_size=4,
                        num_workers=0, eval_max_phrases=2)
    module = Sam3LitModule(preset="tiny", image_size=112)
    with torch.no_grad():  # every query scores ~1: class logit |v|^2 / sqrt(d) and presence far above 0
        scoring = module.detector.dot_product_scoring
        for proj in (scoring.query_proj, scoring.text_proj):
            proj.weight.zero_()
            proj.bias.fill_(1.0)
        module.detector.detr_decoder.presence_head.layer3.bias.fill_(10.0)
    logged, checkpoint = validated_checkpoint(module, dm, tmp_path / "model.ckpt")

    own = score(checkpoint, 112)
    assert own["image_size"] == 112 and own["pairs"] > 0
    assert logged["val/box_precision"] > 0 and 0 < logged["val/IL_precision"] < 1  # detections made and counted
    for key in ("cgF1", "box_cgF1", "pmF1", "box_pmF1", "box_precision", "box_recall", "IL_precision", "IL_recall",
                "IL_FPR"):
        assert own[key] == pytest.approx(logged[f"val/{key}"], rel=1e-6, abs=1e-9), key  # logged as float32

    finer = score(checkpoint, 224)
    assert finer["pairs"] == own["pairs"]
    for key in ("IL_precision", "IL_recall", "IL_FPR", "IL_MCC"):
        assert finer[key] == pytest.approx(own[key], abs=1e-12), key
