"""benchmarks/probe_presence.py and probe_mask_resolution.py: what limits the main job's cgF1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_mask_resolution_ceiling_by_hand():
    from probe_mask_resolution import ceiling_ious, summary

    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = True  # one 4 x 4-grid cell exactly: averaged to +0.5 there, -0.5 around, back to itself
    masks[1, 0, 0] = True  # a quarter of a cell: averaged to 0.25 - 0.5 < 0 everywhere, so nothing comes back
    masks[2] = True
    assert ceiling_ious(masks, 4).tolist() == [1.0, 0.0, 1.0]
    assert ceiling_ious(masks, 8).tolist() == [1.0, 1.0, 1.0]  # the mask's own resolution loses nothing
    # IoU 0.52 clears 1 of the 10 thresholds 0.5:0.95, 0.82 clears 7, 1.0 all 10: (1 + 7 + 10) / 30.
    s = summary(torch.tensor([0.52, 0.82, 1.0]))
    assert s["at_50"] == 1.0 and s["at_75"] == pytest.approx(2 / 3) and s["at_90"] == pytest.approx(1 / 3)
    assert s["matchable_0.5:0.95"] == pytest.approx(18 / 30)
    assert s["median"] == pytest.approx(0.82)


def test_presence_summary_by_hand():
    from probe_presence import summarise

    rows = [{"phrase": "star", "positive": False, "said_present": True, "presence": 0.9},
            {"phrase": "star", "positive": False, "said_present": False, "presence": 0.4},
            {"phrase": "star", "positive": True, "said_present": True, "presence": 0.7},
            {"phrase": "red star", "positive": True, "said_present": False, "presence": 0.6}]
    s = summarise(rows)
    assert s["by_length"]["negative, 1 word"] == {"n": 2, "said_present": 0.5, "presence_said_present": 0.5}
    assert s["by_length"]["positive, 2 words"] == {"n": 1, "said_present": 0.0, "presence_said_present": 1.0}
    assert s["absent_kinds"] == {"star": {"n": 2, "said_present": 0.5, "n_present": 1, "said_present_when_present": 1.0}}


def test_presence_decisions_are_the_metric_s(shapes_root, one_thread, tmp_path):
    """A tiny model whose presence says yes and whose random class scores straddle 0.5, validated by
    Lightning: the probe's share of positive pairs said present is the logged IL_recall, of negative
    pairs the logged IL_FPR (the probe decides a pair as the metric does)."""
    from conftest import SHAPES_SPLITS, validated_checkpoint
    from probe_presence import pair_decisions, summarise

    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    torch.manual_seed(0)
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, eval_batch_size=4,
                        num_workers=0)
    module = Sam3LitModule(preset="tiny", image_size=112)
    with torch.no_grad():
        module.detector.detr_decoder.presence_head.layer3.bias.fill_(10.0)
    logged, checkpoint = validated_checkpoint(module, dm, tmp_path / "model.ckpt")

    rows = pair_decisions(checkpoint)
    positive = [r["said_present"] for r in rows if r["positive"]]
    negative = [r["said_present"] for r in rows if not r["positive"]]
    assert positive and negative and 0 < sum(positive) + sum(negative) < len(rows)  # decisions both ways
    assert sum(positive) / len(positive) == pytest.approx(logged["val/IL_recall"], abs=1e-6)
    assert sum(negative) / len(negative) == pytest.approx(logged["val/IL_FPR"], abs=1e-6)
    assert sum(s["n"] for s in summarise(rows)["by_length"].values()) == len(rows)
