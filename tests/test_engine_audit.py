"""Pseudo-label quality against withheld labels (sam3_train.engine.audit), on hand-made shards
whose precision, recall and exhaustivity accuracy are counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import png_bytes, write_shards

from sam3_train.data import rle as rle_ops
from sam3_train.engine.audit import matched_instances, pseudo_label_quality

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
H, W = 16, 16


def box(x0: int, y0: int, x1: int, y1: int) -> dict:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return {"box": [x0, y0, x1 - x0, y1 - y0], "rle": rle_ops.encode(mask)}


def sample(queries: list[tuple[str, bool, list[dict]]]) -> dict:
    return {"image_id": 0, "width": W, "height": H,
            "queries": [{"phrase": p, "exhaustive": e, "instances": i} for p, e, i in queries]}


def write(out, prefix, samples: dict[str, dict]) -> list[str]:
    return write_shards(out, prefix, samples, png_bytes(H, W))


A, B, C = box(0, 0, 8, 8), box(8, 8, 16, 16), box(0, 8, 8, 16)
A_SHIFTED = box(0, 0, 8, 6)  # IoU with A: 48 / 64 = 0.75
A_OFF = box(0, 0, 8, 3)      # IoU with A: 24 / 64 = 0.375


def test_quality_counts_matches_exhaustive_pairs_and_negatives(tmp_path):
    labelled = write(tmp_path / "labels", "labelled", {
        "img0": sample([("circle", True, [A, B]), ("star", True, []), ("square", True, [C])]),
        "img1": sample([("circle", True, [A]), ("star", True, [B])]),
        "img2": sample([("circle", True, [])]),  # not in the pool: ignored
    })
    written = write(tmp_path / "pseudo", "pseudo", {
        # circle: A found (shifted, IoU 0.75), B missed, pair not exhaustive; star: a right negative;
        # square: C found twice (the duplicate is a false positive), marked exhaustive: wrong.
        "img0": sample([("circle", False, [A_SHIFTED]), ("star", True, []), ("square", True, [C, C])]),
        # circle: exhaustive with A exactly: right; star: a negative for a present phrase: wrong.
        "img1": sample([("circle", True, [A_OFF, A]), ("star", True, [])]),
    })
    q = pseudo_label_quality(written, labelled)
    # kept: 1 + 2 + 2 = 5, matched: A (img0), C (img0), A (img1) = 3; true: 2 + 1 + 1 + 1 = 5
    assert q["instances"] == {"kept": 5, "true": 5, "matched": 3, "precision": 0.6, "recall": 0.6}
    # exhaustive pairs: img0 star (right), img0 square (wrong: 2 kept, 1 true), img1 circle (wrong:
    # A_OFF is a false positive next to the match), img1 star (wrong)
    assert q["exhaustive"] == {"pairs": 4, "right": 1, "accuracy": 0.25}
    assert q["negatives"] == {"pairs": 2, "right": 1, "accuracy": 0.5}


def test_matching_is_one_to_one_at_the_iou_threshold():
    def flat(*boxes):
        return torch.from_numpy(rle_ops.decode_many([b["rle"] for b in boxes], H, W).astype(bool))

    assert matched_instances(flat(A, A), flat(A)) == 1           # a duplicate matches once
    assert matched_instances(flat(A_OFF), flat(A)) == 0          # IoU 0.375 < 0.5
    assert matched_instances(flat(A_OFF), flat(A), min_iou=0.3) == 1
    assert matched_instances(flat(A_SHIFTED, B), flat(B, A)) == 2
    assert matched_instances(flat(A)[:0], flat(A)) == 0


def test_a_written_sample_without_labels_is_an_error(tmp_path):
    labelled = write(tmp_path / "labels", "labelled", {"img0": sample([("circle", True, [A])])})
    written = write(tmp_path / "pseudo", "pseudo", {"img9": sample([("circle", True, [A])])})
    with pytest.raises(ValueError, match="img9 has no labelled counterpart"):
        pseudo_label_quality(written, labelled)
