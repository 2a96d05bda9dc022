"""SA-Co style JSON -> shards -> Batches: pairs grouped per image, negatives, non-exhaustive pairs; SA-Co
Gold's three annotation sets in one shard, scored as Meta's evaluator scores the three files."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.data.collate import Collator
from sam3_train.data.convert_saco import convert_saco
from sam3_train.data.pipeline import ShardStream
from sam3_train.data.shards import expand_urls
from sam3_train.data.transforms import eval_transforms
from sam3_train.data.tokenizer import Sam3Tokenizer
from sam3_train.metrics import CGF1

H, W = 40, 60


# Two shared cores: torch's intra-op threads only contend in these data tests.
pytestmark = pytest.mark.usefixtures("one_thread")


def _rect(x0, y0, x1, y1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def saco(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (W, H), colour).save(tmp_path / "img" / name)
    masks = {1: [_rect(5, 5, 15, 20), _rect(30, 10, 50, 30)], 4: [_rect(0, 0, 60, 10)]}
    images = [
        {"id": 1, "file_name": "a.jpg", "height": H, "width": W, "text_input": "red car", "is_instance_exhaustive": True,
         "queried_category": 3},
        {"id": 2, "file_name": "a.jpg", "height": H, "width": W, "text_input": "zebra", "is_instance_exhaustive": True},
        {"id": 3, "file_name": "a.jpg", "height": H, "width": W, "text_input": "tree on the left",
         "is_instance_exhaustive": False},
        {"id": 4, "file_name": "b.png", "height": H, "width": W, "text_input": "sky",
         "input_box": [0.0, 0.0, 0.5, 0.25], "input_box_label": [1]},
    ]
    annotations = []
    for pair, ms in masks.items():
        for m in ms:
            rle = rle_ops.encode(m)
            x, y, w, h = rle_ops.to_xywh(rle)
            annotations.append({"id": len(annotations) + 1, "image_id": pair, "bbox": [x / W, y / H, w / W, h / H],
                                "segmentation": rle, "area": float(m.sum()), "iscrowd": 0, "category_id": 1})
    path = tmp_path / "saco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}))
    return {"json": path, "images": tmp_path / "img", "masks": masks}


def test_saco_round_trip(saco, tmp_path):
    result = convert_saco(annotations=saco["json"], images=saco["images"], out=tmp_path / "out", progress=False)
    assert result == {"pattern": str(tmp_path / "out" / "saco-000000.tar"), "written": 2, "skipped": 0}
    stream = ShardStream(urls=expand_urls(result["pattern"]), batch_size=2, transforms=eval_transforms(image_size=W, square=False),
                         collate=Collator(tokenizer=Sam3Tokenizer.from_open_clip()))
    (batch,) = list(stream)
    assert batch.num_images == 2 and batch.phrases == ["red car", "zebra", "tree on the left", "sky"]
    assert batch.pair_image.tolist() == [0, 0, 0, 1]
    assert [t["exhaustive"] for t in batch.targets] == [True, True, False, True]
    car, zebra, tree, sky = batch.targets
    assert zebra["boxes"].shape == (0, 4) and tree["boxes"].shape == (0, 4)  # a negative; an unknown
    # Normalised SA-Co boxes came back as pixels and then as cxcywh normalised by S = W.
    assert torch.allclose(car["boxes"], torch.tensor([[10, 12.5, 10, 15], [40, 20, 20, 20]]) / W)
    for target, ms in ((car, saco["masks"][1]), (sky, saco["masks"][4])):
        assert np.array_equal(target["masks"][:, :H, :W].numpy(), np.stack(ms))
    # The exemplar box of pair 4 ([0, 0, 0.5, 0.25] normalised xywh of the 60 x 40 image).
    assert batch.exemplar_boxes.shape == (4, 1, 4)
    assert batch.exemplar_labels.tolist() == [[-1], [-1], [-1], [1]]
    assert torch.allclose(batch.exemplar_boxes[3, 0], torch.tensor([15, 5, 30, 10]) / W)
    assert batch.input_ids.shape == (4, 32) and batch.attention_mask[1].sum() == 3  # <sot> zebra <eot>


def test_saco_pair_with_broken_segmentation_is_skipped_not_fatal(saco, tmp_path):
    data = json.loads(saco["json"].read_text())
    data["annotations"][0]["segmentation"] = {"size": [H, W], "counts": "garbage!!"}
    data["images"].append({"id": 9, "file_name": "missing.jpg", "height": H, "width": W, "text_input": "x"})
    saco["json"].write_text(json.dumps(data))
    result = convert_saco(annotations=saco["json"], images=saco["images"], out=tmp_path / "out", progress=False)
    assert result["written"] == 2 and result["skipped"] == 2  # the broken pair, the missing file


# ------------------------------------------------------------------- SA-Co Gold: three annotators


def _random_rects(rng: np.random.Generator, k: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(k):
        x0, y0 = (int(v) for v in rng.integers(0, [W - 8, H - 8]))
        out.append((x0, y0, int(rng.integers(x0 + 4, W + 1)), int(rng.integers(y0 + 4, H + 1))))
    return out


@pytest.fixture
def gold(tmp_path):
    """Three SA-Co files (annotators a, b, c) over the same 24 pairs (4 images x 6 phrases): b and c
    agree with a, drop or add an instance, or call the phrase absent; some pairs are non-exhaustive
    in one set, some instances are crowd regions."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    files = [{"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]} for _ in range(3)]
    pair_id = 0
    for i in range(4):
        name = f"photo{i}.jpg"
        Image.new("RGB", (W, H), (40 * i, 90, 160)).save(tmp_path / "img" / name)
        for phrase in ("cat", "dog", "red cup", "tree", "sky", "car"):
            pair_id += 1
            base = _random_rects(rng, int(rng.integers(0, 4)))
            for s, data in enumerate(files):
                kind = 0 if s == 0 else int(rng.integers(0, 4))
                rects = {0: base, 1: base[1:], 2: base + _random_rects(rng, 1), 3: []}[kind]
                exhaustive = bool(s == 0 or rng.random() > 0.12)
                data["images"].append({"id": pair_id, "file_name": name, "height": H, "width": W,
                                       "text_input": phrase, "is_instance_exhaustive": exhaustive})
                for rect in rects:
                    rle = rle_ops.encode(_rect(*rect))
                    x, y, w, h = rle_ops.to_xywh(rle)
                    data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": pair_id,
                                                "bbox": [x / W, y / H, w / W, h / H], "segmentation": rle,
                                                "area": float(w * h), "iscrowd": int(rng.random() < 0.15),
                                                "category_id": 1})
    paths = []
    for letter, data in zip("abc", files):
        paths.append(tmp_path / f"gold_x_merged_{letter}_release_test.json")
        paths[-1].write_text(json.dumps(data))
    return {"jsons": paths, "images": tmp_path / "img", "files": files}


def _shard_metas(pattern: str) -> list[dict]:
    metas = []
    for url in expand_urls(pattern):
        with tarfile.open(url) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def _instances(data: dict, pair_id: int) -> list[tuple[np.ndarray, bool]]:
    return [(rle_ops.decode(a["segmentation"]).astype(bool), bool(a["iscrowd"]))
            for a in data["annotations"] if a["image_id"] == pair_id]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode, numpy 2
def test_saco_three_annotation_sets_round_trip(gold, tmp_path):
    result = convert_saco(annotations=gold["jsons"], images=gold["images"], out=tmp_path / "out", progress=False)
    assert result["written"] == 4 and result["skipped"] == 0
    metas = _shard_metas(result["pattern"])
    checked = {"non_exhaustive_b_or_c": 0, "crowd": 0, "disagree": 0}
    for meta in metas:
        assert meta["source"]["annotation_files"] == [p.name for p in gold["jsons"]]
        for pair_id, q in zip(meta["source"]["pair_ids"], meta["queries"]):
            sets = [(q["exhaustive"], q["instances"]), *((s["exhaustive"], s["instances"]) for s in q["extra_sets"])]
            assert len(sets) == 3
            for (exhaustive, instances), data in zip(sets, gold["files"]):
                entry = next(e for e in data["images"] if e["id"] == pair_id)
                assert exhaustive == entry["is_instance_exhaustive"] and q["phrase"] == entry["text_input"]
                expected = _instances(data, pair_id)
                assert len(instances) == len(expected)
                for inst, (mask, crowd) in zip(instances, expected):
                    assert np.array_equal(rle_ops.decode(inst["rle"]).astype(bool), mask)
                    assert inst.get("crowd", False) == crowd
                    ys, xs = np.nonzero(mask)
                    assert inst["box"] == pytest.approx([xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1], abs=1e-9)
                checked["crowd"] += sum(crowd for _, crowd in expected)
            checked["non_exhaustive_b_or_c"] += not all(e for e, _ in sets[1:])
            checked["disagree"] += len({len(i) for _, i in sets}) > 1
    assert min(checked.values()) > 0, checked  # the fixture exercises what it claims

    # Readers that know nothing of extra_sets see set a, exactly as a one-file conversion writes it.
    single = convert_saco(annotations=gold["jsons"][0], images=gold["images"], out=tmp_path / "one", progress=False)
    assert all("extra_sets" not in q and "annotation_files" not in m["source"]
               for m in _shard_metas(single["pattern"]) for q in m["queries"])
    batches = []
    for pattern in (result["pattern"], single["pattern"]):
        stream = ShardStream(urls=expand_urls(pattern), batch_size=4,
                             transforms=eval_transforms(image_size=W, square=False),
                             collate=Collator(tokenizer=Sam3Tokenizer.from_open_clip()))
        (batch,) = list(stream)
        batches.append(batch)
    assert batches[0].phrases == batches[1].phrases
    for a, b in zip(batches[0].targets, batches[1].targets):
        assert a["exhaustive"] == b["exhaustive"]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode, numpy 2
def test_saco_three_sets_scored_from_shards_match_meta(gold, tmp_path):
    """What the shards carry is what Meta's evaluator reads from the three files: cgF1 of random
    predictions, from targets built out of the shard json, equals ``CGF1Evaluator([a, b, c])``."""
    from test_metrics import _meta_cgf1_module, _rle_json

    meta_eval = _meta_cgf1_module()
    result = convert_saco(annotations=gold["jsons"], images=gold["images"], out=tmp_path / "out", progress=False)

    def target(exhaustive: bool, instances: list[dict]) -> dict:
        masks = [torch.from_numpy(rle_ops.decode(i["rle"]).astype(bool)) for i in instances]
        return {"masks": torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool),
                "crowd": torch.tensor([i.get("crowd", False) for i in instances], dtype=torch.bool),
                "exhaustive": exhaustive}

    rng = np.random.default_rng(1)
    preds, targets, dts = [], [], []
    for meta in _shard_metas(result["pattern"]):
        for pair_id, q in zip(meta["source"]["pair_ids"], meta["queries"]):
            t = target(q["exhaustive"], q["instances"])
            t["extra_sets"] = [target(s["exhaustive"], s["instances"]) for s in q["extra_sets"]]
            # Most of set a's objects, the right edge moved by 0-2 px, and 0-2 random boxes.
            rects = [(int(x), int(y), int(x + w) - int(rng.integers(0, 3)), int(y + h))
                     for x, y, w, h in (i["box"] for i in q["instances"]) if rng.random() < 0.8]
            rects += _random_rects(rng, int(rng.integers(0, 3)))
            masks = torch.from_numpy(np.stack([_rect(*r) for r in rects]) if rects else np.zeros((0, H, W), bool))
            scores = rng.uniform(0.3, 1.0, size=len(rects))
            preds.append({"scores": torch.from_numpy(scores), "masks": masks})
            targets.append(t)
            # Meta's loadRes adds an ndarray "bbox" to box-less results, which the next set's loadRes
            # cannot read: with several GT files, results need a "bbox" (its value is unused for segm).
            dts += [{"image_id": pair_id, "category_id": 1, "score": float(s), "segmentation": _rle_json(m),
                     "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]]} for m, s, r in zip(masks, scores, rects)]
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(dts))
    metric = CGF1(iou_types=("segm",))
    metric.update(preds, targets)
    ours = metric.compute()
    evaluator = meta_eval.CGF1Evaluator([str(p) for p in gold["jsons"]], iou_type="segm")
    theirs = evaluator.evaluate(str(pred_path))
    assert int(ours["num_pairs"]) == len(evaluator.eval_img_ids) and int(ours["num_skipped"]) > 0
    assert 0 < float(ours["cgF1"]) < 100
    for ours_key, meta_key in (("cgF1", "cgF1"), ("cgF1@50", "cgF1@0.5"), ("pmF1", "positive_micro_F1"),
                               ("recall", "recall"), ("precision", "precision")):
        assert float(ours[ours_key]) == 100 * theirs[f"cgF1_eval_segm_{meta_key}"], ours_key
    assert float(ours["IL_MCC"]) == theirs["cgF1_eval_segm_IL_MCC"]


def test_saco_annotation_sets_must_describe_the_same_pairs(gold, tmp_path):
    data = json.loads(gold["jsons"][1].read_text())
    data["images"] = data["images"][1:]
    gold["jsons"][1].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not describe the same pairs"):
        convert_saco(annotations=gold["jsons"], images=gold["images"], out=tmp_path / "out", progress=False)
    data = json.loads(gold["jsons"][2].read_text())
    data["images"][0]["text_input"] = "something else"
    gold["jsons"][2].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="text_input"):
        convert_saco(annotations=[gold["jsons"][0], gold["jsons"][2]], images=gold["images"], out=tmp_path / "out2",
                     progress=False)


def test_saco_gold_through_the_eval_pipeline_matches_meta(gold, tmp_path):
    """Gold shards -> ShardStream -> Batch -> the Lightning module's cgF1 targets -> CGF1 gives Meta's
    evaluator's number on the three files (crowd regions ignored, pairs non-exhaustive in any set
    dropped, best set per pair, every detection scored)."""
    from test_metrics import _meta_cgf1_module, _rle_json

    from sam3_train.lit import cgf1_targets, eval_targets

    result = convert_saco(annotations=gold["jsons"], images=gold["images"], out=tmp_path / "out", progress=False)
    pair_ids = {(meta["image_id"], q["phrase"]): pid for meta in _shard_metas(result["pattern"])
                for pid, q in zip(meta["source"]["pair_ids"], meta["queries"])}
    # The longest side is already W: the eval transform only pads, so masks stay exact.
    stream = ShardStream(urls=expand_urls(result["pattern"]), batch_size=2, shuffle=False,
                         transforms=eval_transforms(image_size=W, square=False),
                         collate=Collator(tokenizer=Sam3Tokenizer.from_open_clip()))
    rng = np.random.default_rng(2)
    metric, dts = CGF1(iou_types=("segm",)), []
    for batch in stream:
        targets = cgf1_targets(batch, eval_targets(batch))
        preds = []
        for p, target in enumerate(targets):
            rects = [(int(x0), int(y0), int(x1) - int(rng.integers(0, 3)), int(y1))
                     for x0, y0, x1, y1 in target["boxes"].tolist() if rng.random() < 0.8]
            rects += _random_rects(rng, int(rng.integers(0, 3)))
            masks = torch.from_numpy(np.stack([_rect(*r) for r in rects]) if rects else np.zeros((0, H, W), bool))
            scores = rng.uniform(0.3, 1.0, size=len(rects))
            preds.append({"scores": torch.from_numpy(scores), "masks": masks})
            pid = pair_ids[(batch.image_ids[int(batch.pair_image[p])], batch.phrases[p])]
            dts += [{"image_id": pid, "category_id": 1, "score": float(s), "segmentation": _rle_json(m),
                     "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]]} for m, s, r in zip(masks, scores, rects)]
        metric.update(preds, targets)
    ours = metric.compute()
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(dts))
    theirs = _meta_cgf1_module().CGF1Evaluator([str(p) for p in gold["jsons"]], iou_type="segm").evaluate(str(pred_path))
    assert 0 < float(ours["cgF1"]) < 100 and int(ours["num_skipped"]) > 0
    for ours_key, meta_key in (("cgF1", "cgF1"), ("pmF1", "positive_micro_F1"), ("recall", "recall")):
        assert float(ours[ours_key]) == 100 * theirs[f"cgF1_eval_segm_{meta_key}"], ours_key
    assert float(ours["IL_MCC"]) == theirs["cgF1_eval_segm_IL_MCC"]
