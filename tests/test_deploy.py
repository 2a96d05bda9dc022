"""ONNX export and the onnxruntime predictor (sam3_train/deploy/).

Fast: each export-only replacement agrees with what it replaces; fingerprint and thresholds.
Slow (an export of the tiny preset takes about a minute on a 2-core machine): onnxruntime against
the PyTorch detector (logits, boxes, masks, presence, semantic map) for text, box and text+box
prompts with several images and phrases per call; and end to end through the CLI: a LoRA fit on the
shapes data, ``sam3-train export`` of its ``.ckpt`` (adapters merged), ``sam3-train predict`` against
``sam3-train predict-onnx`` on the shapes test split.

Tolerances (float32 on the CPU, measured about 10x below them): logits, boxes and presence logits
1e-5 absolute, mask and semantic logits 5e-5; detections in the prediction files: scores 1e-4,
boxes 0.02 px (the files round to 0.01 px), mask IoU 0.99. float16 graphs: ATOL_FP16 below.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHAPES_SPLITS
from fault_cli import IMAGE_SIZE, fit_config, output, run
from pycocotools import mask as mask_utils

from sam3_train.deploy.export import export_graphs, fingerprint
from sam3_train.deploy.export_ops import (
    encode_boxes_with_roi_tensor,
    encode_prompt_always_with_geometry,
    exportable_copy,
)
from sam3_train.loading import checkpoint_thresholds
from sam3_train.model import build_detector

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")
OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg")
ATOL = {"pred_logits": 1e-5, "pred_boxes": 1e-5, "presence_logit": 1e-5, "pred_masks": 5e-5, "semantic_seg": 5e-5}
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["vit_attention", "detr_encoder_attention", "detr_decoder_attention"]}


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_detector("tiny").eval()


def _features(detector, num_images: int = 2):
    torch.manual_seed(1)
    with torch.no_grad():
        vision = detector.vision_encoder(torch.randn(num_images, 3, detector.image_size, detector.image_size))
    return list(vision.fpn_hidden_states[:-1]), list(vision.fpn_position_encoding[:-1])


def _boxes(num_pairs: int, num_boxes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [P, E, 4] cxcywh inside the image and labels [P, E] with padding (-1) in the last pair."""
    generator = torch.Generator().manual_seed(2)
    centres = 0.25 + 0.5 * torch.rand(num_pairs, num_boxes, 2, generator=generator)
    sizes = 0.05 + 0.3 * torch.rand(num_pairs, num_boxes, 2, generator=generator)
    labels = torch.randint(0, 2, (num_pairs, num_boxes), generator=generator)
    if num_boxes:
        labels[-1, -1] = -1
    return torch.cat([centres, sizes], -1), labels


# ------------------------------------------------------------------------ the export-only replacements
@pytest.mark.parametrize("num_boxes", [0, 1, 3])
def test_roi_tensor_box_encoding_equals_transformers(detector, num_boxes, one_thread):
    levels, _ = _features(detector, 3)
    geometry = detector.geometry_encoder
    features = levels[-1]
    boxes, labels = _boxes(3, num_boxes)
    mask = labels >= 0
    with torch.no_grad():
        ours, ours_mask = encode_boxes_with_roi_tensor(geometry, boxes, mask, labels.clamp(min=0), features)
        theirs, theirs_mask = geometry._encode_boxes(boxes, mask, labels.clamp(min=0), features)
    assert ours.shape == (3, num_boxes, geometry.hidden_size)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)  # the same operator on the same boxes: bit for bit
    assert torch.equal(ours_mask, theirs_mask)


@pytest.mark.parametrize("num_boxes", [0, 2])
def test_prompt_encoding_without_the_branch_equals_encode_prompt(detector, num_boxes, one_thread):
    levels, pos = _features(detector, 3)
    text = torch.randn(3, 32, detector.config.detr_encoder_config.hidden_size)
    text_mask = torch.arange(32)[None] < torch.tensor([[4], [9], [32]])
    boxes, labels = _boxes(3, num_boxes)
    with torch.no_grad():
        ours = encode_prompt_always_with_geometry(detector, text, text_mask, boxes, labels, levels, pos)
        theirs = detector.encode_prompt(text, text_mask, boxes if num_boxes else None,
                                        labels if num_boxes else None, levels, pos)
    assert ours[0].shape[1] == 32 + num_boxes + 1  # the CLS token ends every prompt
    torch.testing.assert_close(ours[0], theirs[0], atol=0, rtol=0)
    assert torch.equal(ours[1], theirs[1])


def test_exportable_copy_detects_as_the_detector_and_leaves_it_alone(detector, one_thread):
    levels, pos = _features(detector, 2)
    text = torch.randn(2, 32, detector.config.detr_encoder_config.hidden_size)
    text_mask = torch.arange(32)[None] < torch.tensor([[5], [12]])
    boxes, labels = _boxes(2, 2)
    copied = exportable_copy(detector)
    with torch.no_grad():
        ours = copied.detect(levels, pos, text, text_mask, boxes, labels)
        theirs = detector.detect(levels, pos, text, text_mask, boxes, labels)
    for key in OUTPUTS:  # eager attention against SDPA: the same arithmetic in another order
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL[key], rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert detector.config._attn_implementation == "sdpa" and "encode_prompt" not in vars(detector)
    transformers_mode = build_detector("tiny", encode_empty_geometry=False)
    with pytest.raises(ValueError, match="encode_empty_geometry=True"):
        exportable_copy(transformers_mode)


def test_in_place_export_switches_the_detector_itself_and_keeps_its_outputs(one_thread, tmp_path):
    """``in_place`` (the released size on a small machine): the same object comes back with the
    replacements on, and it detects as before; a cast of the caller's detector is refused."""
    detector = build_detector("tiny").eval()
    levels, pos = _features(detector, 2)
    text = torch.randn(2, 32, detector.config.detr_encoder_config.hidden_size)
    text_mask = torch.arange(32)[None] < torch.tensor([[5], [12]])
    boxes, labels = _boxes(2, 2)
    with torch.no_grad():
        before = detector.detect(levels, pos, text, text_mask, boxes, labels)
        same = exportable_copy(detector, in_place=True)
        after = detector.detect(levels, pos, text, text_mask, boxes, labels)
    assert same is detector and "encode_prompt" in vars(detector)
    assert detector.config._attn_implementation == "eager"
    for key in OUTPUTS:
        torch.testing.assert_close(after[key], before[key], atol=ATOL[key], rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    with pytest.raises(ValueError, match="in_place export needs a float32 detector and precision float32"):
        export_graphs(detector, tmp_path / "f16", precision="float16", in_place=True)
    assert not (tmp_path / "f16").exists()


def test_fingerprint_and_thresholds_of_a_checkpoint(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"eval_score_threshold": 0.25, "max_detections": 7}, "state_dict": {},
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    assert fingerprint(ckpt) == {"last.ckpt": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert checkpoint_thresholds(ckpt) == {"score_threshold": 0.25, "max_detections": 7, "mask_threshold": 0.0}
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert fingerprint(folder) == {"config.json": hashlib.sha256(b"{}").hexdigest(),
                                   "sub/w.bin": hashlib.sha256(b"\x00\x01").hexdigest()}
    assert checkpoint_thresholds(folder) == {"score_threshold": 0.05, "max_detections": 100, "mask_threshold": 0.0}


# ------------------------------------------------------------------------ onnxruntime against PyTorch
@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    from sam3_train.deploy.runtime import OnnxDetector

    folder = tmp_path_factory.mktemp("onnx_tiny")
    manifest = export_graphs(detector, folder, source={"path": "random tiny"})
    return OnnxDetector(folder, threads=1), manifest, folder


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8), rng.integers(0, 256, (224, 96, 3), dtype=np.uint8)]


def _prompts(kind: str):
    """Two images; three phrases on the first, two on the second; exemplar boxes in pixels."""
    text = [["red star", "small blue circle", "triangle"], ["red star", "green square"]]
    phrases = [["visual"] * 3, ["visual"] * 2] if kind == "boxes" else text
    if kind == "text":
        return phrases, None
    shots = [[[([10, 10, 60, 80], True)], [([100, 20, 150, 90], True), ([20, 90, 70, 140], False)],
              [([5, 5, 50, 50], False)]],
             [[([10, 30, 80, 120], True)], [([40, 100, 90, 200], True), ([0, 0, 30, 30], True)]]]
    return phrases, shots


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "boxes", "text+boxes"])
def test_onnxruntime_equals_pytorch(exported, detector, kind, one_thread):
    runtime, _, _ = exported
    phrases, shots = _prompts(kind)
    batch = runtime.batch(_images(), phrases, shots)
    assert batch.num_images == 2 and batch.num_pairs == 5
    assert batch.exemplar_boxes.shape[1] == (0 if kind == "text" else 2)
    ours = runtime(batch)
    with torch.no_grad():
        theirs = detector(batch)
    for key in OUTPUTS:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL[key], rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert (theirs["pred_logits"][0] - theirs["pred_logits"][1]).abs().max() > 1e-3  # pairs differ: not constants

    # images and phrases in, detections out: postprocess's detections of the PyTorch outputs
    from sam3_train.model import postprocess

    per_image = runtime.predict(_images(), phrases, shots, score_threshold=0.0, max_detections=5)
    expected = postprocess(theirs, batch, original_sizes=batch.original_sizes, score_threshold=0.0, max_detections=5)
    got = [result for image in per_image for result in image]
    assert [len(image) for image in per_image] == [3, 2]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        assert a["masks"].shape == b["masks"].shape
        assert (a["masks"] != b["masks"]).float().mean() < 1e-3  # a pixel may sit on the threshold


@pytest.mark.slow
def test_export_manifest_graphs_and_tokenizer(exported, detector):
    import onnx

    runtime, manifest, folder = exported
    assert manifest["image_size"] == detector.image_size and manifest["num_queries"] == detector.num_queries
    assert manifest["thresholds"] == {"score_threshold": 0.05, "max_detections": 100, "mask_threshold": 0.0}
    assert "tokenizer.json" in manifest["tokenizer_files"]
    assert all((folder / name).is_file() for name in manifest["tokenizer_files"])
    assert torch.equal(runtime.tokenizer(["red star"])[0], detector.tokenize(["red star"])[0])
    for name, file in manifest["graphs"].items():
        model = onnx.load(str(folder / file))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == manifest["inputs"][name]
    # dynamic axes: images, phrases, pairs and exemplar boxes are symbols, not fixed sizes
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(folder / "detector.onnx")).graph.input}
    assert isinstance(dims["text"][0], str) and isinstance(dims["exemplar_boxes"][1], str)
    one = runtime.batch(_images()[:1], [["red star"]])  # one image, one phrase, no box: sizes 1 and 0
    with torch.no_grad():
        torch.testing.assert_close(runtime(one)["pred_logits"], detector(one)["pred_logits"], atol=1e-5, rtol=0)


# float16 graphs: measured on this test's inputs up to 9.2e-4 (logits), 3.2e-4 (boxes), 1.5e-3
# (presence), 5.1e-3 (mask logits), 3.5e-3 (semantic), 1.9e-4 (scores); tolerances about 4x those.
ATOL_FP16 = {"pred_logits": 4e-3, "pred_boxes": 2e-3, "presence_logit": 6e-3, "pred_masks": 2e-2, "semantic_seg": 2e-2}


@pytest.mark.slow
def test_float16_graphs_stay_close_to_float32_pytorch(detector, tmp_path, one_thread):
    from sam3_train.deploy.runtime import OnnxDetector

    manifest = export_graphs(detector, tmp_path, precision="float16")
    assert manifest["precision"] == "float16"
    runtime = OnnxDetector(tmp_path, threads=1)
    for kind in ("text", "text+boxes"):
        phrases, shots = _prompts(kind)
        batch = runtime.batch(_images(), phrases, shots)
        ours = runtime(batch)
        with torch.no_grad():
            theirs = detector(batch)
        for key in OUTPUTS:
            assert ours[key].dtype == torch.float32  # post-processing gets float32
            torch.testing.assert_close(ours[key], theirs[key], atol=ATOL_FP16[key], rtol=0,
                                       msg=lambda m, k=key: f"{kind} {k}: {m}")
        score = lambda out: out["pred_logits"].sigmoid() * out["presence_logit"].sigmoid()[:, None]  # noqa: E731
        assert (score(ours) - score(theirs)).abs().max() < 1e-3
        assert ((ours["pred_masks"] > 0) != (theirs["pred_masks"] > 0)).float().mean() < 5e-3


# ------------------------------------------------------------------------ end to end through the CLI
def _read_jsonl(folder: Path) -> dict[str, dict]:
    lines = (folder / "predictions-rank0.jsonl").read_text().splitlines()
    return {record["key"]: record for record in map(json.loads, lines)}


def _mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def _assert_same_detections(torch_file: dict, onnx_file: dict) -> int:
    """Same images, phrases and detections (score, box, mask) within the stated tolerances; returns
    the number of detections compared."""
    assert onnx_file.keys() == torch_file.keys()
    compared = 0
    for key, record in torch_file.items():
        other = onnx_file[key]
        assert (other["height"], other["width"]) == (record["height"], record["width"])
        assert [p["phrase"] for p in other["phrases"]] == [p["phrase"] for p in record["phrases"]]
        for ours, theirs in zip(other["phrases"], record["phrases"]):
            assert ours["presence"] == pytest.approx(theirs["presence"], abs=1e-4)
            assert len(ours["detections"]) == len(theirs["detections"]), (key, ours["phrase"])
            for a, b in zip(ours["detections"], theirs["detections"]):
                assert a["score"] == pytest.approx(b["score"], abs=1e-4)
                assert np.allclose(a["box"], b["box"], atol=0.02), (a["box"], b["box"])
                ma, mb = _mask(a["rle"]), _mask(b["rle"])
                union = np.logical_or(ma, mb).sum()
                assert union == 0 or np.logical_and(ma, mb).sum() / union >= 0.99
                compared += 1
    return compared


@pytest.mark.slow
def test_lora_fit_exports_and_predict_onnx_writes_what_predict_writes(shapes_root, tmp_path):
    from sam3_train.data import Sam3DataModule, ensure_shapes_shards
    from sam3_train.deploy.runtime import OnnxDetector
    from sam3_train.loading import load_detector

    base = tmp_path / "base"
    torch.manual_seed(3)
    build_detector("tiny", image_size=IMAGE_SIZE).save_pretrained(base)
    # Keep every detection of a barely trained model: thresholds set at fit time reach the export.
    config = fit_config(tmp_path / "run", shapes_root, trainer={"max_steps": 4},
                        model={"pretrained": str(base), "lora": LORA, "lr": 1e-3, "lr_vision": 1e-3,
                               "eval_score_threshold": 0.0, "max_detections": 3})
    proc = run(["fit", "--config", str(config)], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    exported = tmp_path / "exported"
    proc = run(["export", "--detector", str(last), "--output", str(exported)], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    manifest = json.loads((exported / "deploy.json").read_text())
    assert manifest["source"]["sha256"] == {"last.ckpt": hashlib.sha256(last.read_bytes()).hexdigest()}
    assert manifest["thresholds"] == {"score_threshold": 0.0, "max_detections": 3, "mask_threshold": 0.0}
    assert manifest["image_size"] == IMAGE_SIZE

    # The merged LoRA detector under onnxruntime equals it in PyTorch; the adapters moved it off the base.
    merged = load_detector(last).eval()
    runtime = OnnxDetector(exported, threads=1)
    data = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=IMAGE_SIZE,
                          eval_batch_size=4, num_workers=0, eval_max_phrases=3)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    ours = runtime(batch)
    with torch.no_grad():
        theirs, base_out = merged(batch), load_detector(base).eval()(batch)
    for key in OUTPUTS:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL[key], rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert (theirs["pred_logits"] - base_out["pred_logits"]).abs().max() > 1e-4

    test_split = ensure_shapes_shards(shapes_root, splits=SHAPES_SPLITS, max_count=8)["test"]  # conftest's: cached
    writer = {"class_path": "sam3_train.callbacks.PredictionWriter",
              "init_args": {"output_dir": str(tmp_path / "torch"), "overlays": True, "coco_results": True}}
    proc = run(["predict", "--config", str(config), "--ckpt_path", str(last), f"--data.predict_shards={test_split}",
                f"--trainer.callbacks+={json.dumps(writer)}"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    proc = run(["predict-onnx", "--model", str(exported), "--shards", test_split, "--output_dir",
                str(tmp_path / "onnx"), "--overlays", "--coco_results", "--max_phrases", "2", "--batch_size", "2",
                "--threads", "1"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert "predict-onnx: 16 images" in output(proc), output(proc)[-2000:]

    torch_file, onnx_file = _read_jsonl(tmp_path / "torch"), _read_jsonl(tmp_path / "onnx")
    assert len(torch_file) == 16
    assert _assert_same_detections(torch_file, onnx_file) == 16 * 2 * 3  # 2 phrases an image, 3 detections each
    coco = [json.loads((tmp_path / side / "predictions.coco.json").read_text()) for side in ("torch", "onnx")]
    assert [(r["image_id"], r["phrase"]) for r in coco[0]] == [(r["image_id"], r["phrase"]) for r in coco[1]]
    overlays = [sorted(p.name for p in (tmp_path / side / "overlays").iterdir()) for side in ("torch", "onnx")]
    assert overlays[0] == overlays[1] and len(overlays[0]) == 32


def test_parity_benchmark_compares_detections_not_ranks():
    """benchmarks/bench_deploy.py's parity: two scores 1e-7 apart may swap ranks between the paths; the
    box difference is then the partners' (0.5 px here), not the neighbours' (~100 px), and the swap counts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_deploy import detection_differences

    a = {"scores": torch.tensor([0.9, 0.8000001, 0.8]),
         "boxes": torch.tensor([[0.0, 0, 10, 10], [100, 100, 150, 150], [5, 5, 20, 20]])}
    b = {"scores": torch.tensor([0.9, 0.8000001, 0.8]),  # the two near-ties in the other order
         "boxes": torch.tensor([[0.0, 0, 10, 10.5], [5, 5, 20, 20], [100, 100, 150, 150]])}
    score_diff, box_diff, reordered = detection_differences(a, b)
    assert box_diff == pytest.approx(0.5) and reordered
    assert score_diff == pytest.approx(1e-7, abs=2e-7)
    assert detection_differences(a, a) == (0.0, 0.0, False)
