"""Data engine review: export what verifiers rejected or flagged, import an edited COCO JSON back."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import EngineFrame, png_bytes
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.engine import (
    ExhaustivityVerifier,
    ScoreVerifier,
    StabilityVerifier,
    VerifierChain,
    export_review,
    import_review,
    pseudo_sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 24, 32
KEY = "00000007_photo"
FRAME = EngineFrame(H, W)
box_mask = FRAME.box_mask


def candidate(phrase, scores, masks, loose=None):
    return FRAME.candidate(scores, masks, phrase=phrase, key=KEY, loose=loose)


@pytest.fixture
def reviewed(tmp_path):
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8),
                                     ExhaustivityVerifier(low=0.2, high=0.7)])
    k1, r1 = box_mask(1, 1, 6, 6), box_mask(10, 2, 14, 6)
    pairs = [
        # flagged: r1 is unstable (16 px against a 36 px loose mask); 0.05 is below the export floor
        chain(candidate("red square", [0.95, 0.9, 0.05], [k1, r1, box_mask(20, 20, 22, 22)],
                        loose=[k1, box_mask(9, 1, 15, 7), box_mask(20, 20, 22, 22)])),
        chain(candidate("circle", [0.9, 0.45], [box_mask(2, 12, 8, 18), box_mask(20, 4, 26, 10)])),  # uncertain
        chain(candidate("star", [0.99], [box_mask(16, 14, 22, 20)])),  # confident: not exported
        chain(candidate("blue star", [0.3], [box_mask(16, 14, 22, 20)])),  # uncertain, written as a mined negative
    ]
    image = png_bytes(H, W, value=90)
    base = {"image_id": 7, "width": W, "height": H, "queries": [], "source": {"dataset": "pool"}}
    meta, _ = pseudo_sample(base, pairs, negatives=["blue star"])
    stats = export_review(out_dir=tmp_path / "review", images=[(image, "png", meta, pairs)])
    coco = json.loads((tmp_path / "review" / "review.json").read_text())
    return {"coco": coco, "samples": {KEY: meta}, "stats": stats, "dir": tmp_path / "review", "r1": r1,
            "image": image, "meta": meta, "pairs": pairs}


def test_export_holds_flagged_pairs_with_kept_and_rejected_instances(reviewed):
    coco, out = reviewed["coco"], reviewed["dir"]
    assert reviewed["stats"] == {"pairs": 3, "annotations": 5, "images": 1}
    assert sorted(c["name"] for c in coco["categories"]) == ["blue star", "circle", "red square"]  # one per phrase
    pairs = {e["sam3_train"]["phrase"]: e for e in coco["images"]}
    assert pairs["blue star"]["sam3_train"]["exhaustive"] is True  # as written (a negative), not the chain's verdict
    assert pairs["red square"]["sam3_train"]["exhaustive"] is False and pairs["red square"]["sam3_train"]["flags"]
    status = [(a["sam3_train"]["phrase"], a["sam3_train"]["status"], a["sam3_train"]["rejected_by"])
              for a in coco["annotations"]]
    assert status == [("blue star", "rejected", "score"), ("circle", "kept", None), ("circle", "rejected", "score"),
                      ("red square", "kept", None), ("red square", "rejected", "stability")]
    rejected = next(a for a in coco["annotations"] if a["sam3_train"]["rejected_by"] == "stability")
    assert np.array_equal(rle_ops.decode(rejected["segmentation"]), reviewed["r1"].numpy().astype(np.uint8))
    assert all(a["sam3_train"]["key"] == KEY for a in coco["annotations"])
    assert (out / "images" / f"{KEY}.png").is_file()
    for entry in coco["images"]:
        picture = Image.open(out / entry["sam3_train"]["overlay"])
        assert picture.size == (W, H) and np.asarray(picture).std() > 0  # masks were painted


def test_export_of_every_pair_adds_the_unflagged_ones_and_round_trips(reviewed, tmp_path):
    """``only_flagged=False`` (the front's ``--all``): the confident "star" pair comes too, with its
    kept instance and no flags; importing that export unedited changes nothing."""
    image = (reviewed["image"], "png", reviewed["meta"], reviewed["pairs"])
    stats = export_review(out_dir=tmp_path / "all", images=[image], only_flagged=False)
    coco = json.loads((tmp_path / "all" / "review.json").read_text())
    assert stats == {"pairs": 4, "annotations": 6, "images": 1}
    pairs = {e["sam3_train"]["phrase"]: e for e in coco["images"]}
    assert sorted(pairs) == ["blue star", "circle", "red square", "star"]
    star = pairs["star"]["sam3_train"]
    assert star["flags"] == [] and star["exhaustive"] is True
    (kept,) = [a for a in coco["annotations"] if a["image_id"] == pairs["star"]["id"]]
    assert kept["sam3_train"]["status"] == "kept" and kept["bbox"] == [16.0, 14.0, 6.0, 6.0]
    without_id = lambda entries: [{k: v for k, v in e.items() if k != "id"} for e in entries]  # noqa: E731
    assert without_id(e for e in coco["images"] if e["sam3_train"]["phrase"] != "star") == without_id(
        reviewed["coco"]["images"])  # the flagged pairs exactly as the default export has them
    samples, changed = import_review(coco, reviewed["samples"])
    assert changed == [] and samples == reviewed["samples"]


def test_import_unedited_changes_nothing(reviewed):
    samples, changed = import_review(reviewed["coco"], reviewed["samples"])
    assert changed == [] and samples == reviewed["samples"]


def test_import_changes_exactly_the_edited_labels(reviewed, tmp_path):
    coco, before = copy.deepcopy(reviewed["coco"]), reviewed["samples"][KEY]
    by = {(a["sam3_train"]["phrase"], a["sam3_train"]["status"]): a for a in coco["annotations"]}
    # red square: accept the rejected instance, add a missed one as a polygon, mark the pair exhaustive
    del by[("red square", "rejected")]["sam3_train"]
    square = next(c["id"] for c in coco["categories"] if c["name"] == "red square")
    square_image = next(e["id"] for e in coco["images"] if e["sam3_train"]["phrase"] == "red square")
    coco["annotations"].append({"id": 99, "image_id": square_image, "category_id": square, "iscrowd": 0,
                                "segmentation": [[20, 10, 28, 10, 28, 16, 20, 16]], "bbox": [20, 10, 8, 6]})
    next(e for e in coco["images"] if e["sam3_train"]["phrase"] == "red square")["sam3_train"]["exhaustive"] = True
    # circle: the kept instance is wrong; deleting it (and leaving the pair non-exhaustive)
    coco["annotations"].remove(by[("circle", "kept")])
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(coco))
    samples, changed = import_review(path, reviewed["samples"])
    assert changed == [(KEY, "circle"), (KEY, "red square")]
    after = {q["phrase"]: q for q in samples[KEY]["queries"]}
    old = {q["phrase"]: q for q in before["queries"]}
    assert after["star"] == old["star"]  # never exported: untouched
    assert after["circle"]["instances"] == [] and after["circle"]["exhaustive"] is False
    square_q = after["red square"]
    assert square_q["exhaustive"] is True and len(square_q["instances"]) == 3
    assert square_q["instances"][0] == old["red square"]["instances"][0]  # the kept instance, byte for byte
    assert np.array_equal(rle_ops.decode(square_q["instances"][1]["rle"]), reviewed["r1"].numpy().astype(np.uint8))
    added = rle_ops.decode(square_q["instances"][2]["rle"])
    assert added[10:16, 20:28].all() and added.sum() == added[10:17, 20:29].sum()  # the polygon, nothing else
    assert {k: v for k, v in samples[KEY].items() if k != "queries"} == \
        {k: v for k, v in before.items() if k != "queries"}
    assert reviewed["samples"][KEY] == before  # the input metas are not modified in place


def test_import_refuses_unknown_samples(reviewed):
    coco = copy.deepcopy(reviewed["coco"])
    coco["images"][0]["sam3_train"]["key"] = "99999999_other"
    with pytest.raises(ValueError, match="99999999_other"):
        import_review(coco, reviewed["samples"])
