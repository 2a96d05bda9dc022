"""SA-Co style JSON -> shards -> Batches: pairs grouped per image, negatives, non-exhaustive pairs."""

from __future__ import annotations

import json

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
from sam3_train.model.tokenizer import Sam3Tokenizer

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
