"""Meta's checkpoint format and Meta's own forward (PyPI ``sam3``) against ours, at the tiny preset.

Meta's ``Sam3Image`` is built at the tiny sizes with random weights (tests/meta_reference.py), saved
as Meta saves ``sam3.pt`` and converted with tools/convert_checkpoint.py; our detector loads the
result and must compute what Meta's model computes.

The tiny preset fits Meta's modules exactly but for one size: Meta's text encoder fixes CLIP's
``text_projection`` at 512 outputs (a weight SAM 3's forward never reads), hence
``text_config.projection_dim=512`` on both sides.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import import_meta
from transformers import Sam3Model

import_meta("sam3.model.sam3_image")  # skips without Meta's sam3 package, fails under CI

from meta_reference import (  # noqa: E402
    build_meta_image_model, cpu_workarounds, meta_checkpoint, meta_datapoint, meta_find_target, randomize_,
    released_meta_video_model, run_meta,
)

from sam3_train.data import Batch  # noqa: E402
from sam3_train.model import Sam3Detector, preset_config  # noqa: E402
from sam3_train.model.meta_checkpoint import (  # noqa: E402
    MetaCheckpointError, convert_checkpoint, convert_state, expected_shapes, read_config,
)

CONFIG = preset_config("tiny", text_config={"projection_dim": 512}, dropout=0.0)  # dropout 0: train-mode parity
FAKE_TRACKER_KEYS = 3
PHRASES = ["red star", "blue circle", "small green square"]
OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg")


@pytest.fixture(scope="module")
def meta_model():
    from sam3.train.matcher import BinaryHungarianMatcherV2

    # Meta's training forward matches queries to targets itself; its released matcher settings.
    matcher = BinaryHungarianMatcherV2(focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2,
                                       stable=False)
    return randomize_(build_meta_image_model(CONFIG, matcher=matcher), seed=0)


@pytest.fixture(scope="module")
def meta_state(meta_model) -> dict[str, torch.Tensor]:
    return meta_checkpoint(meta_model, tracker_keys=FAKE_TRACKER_KEYS)["model"]


@pytest.fixture(scope="module")
def converted(meta_model, tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("meta")
    torch.save(meta_checkpoint(meta_model, tracker_keys=FAKE_TRACKER_KEYS), root / "sam3.pt")
    conversion = convert_checkpoint(root / "sam3.pt", root / "hf", config=CONFIG, progress=False)
    return root / "hf", conversion


@pytest.fixture(scope="module")
def ours(converted) -> Sam3Detector:
    return Sam3Detector.from_pretrained(converted[0]).eval()


def test_conversion_loads_strictly_in_both_loaders(converted, ours, meta_state):
    directory, conversion = converted
    assert (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()
    hf, info = Sam3Model.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert hf_state.keys() == our_state.keys()
    assert all(torch.equal(hf_state[k], our_state[k]) for k in our_state)
    # Hand-checked transforms: a fused qkv split, CLIP's projection transposed, the CLS position dropped.
    qkv = meta_state["detector.backbone.vision_backbone.trunk.blocks.2.attn.qkv.weight"]
    torch.testing.assert_close(our_state["vision_encoder.backbone.layers.2.attention.k_proj.weight"], qkv[64:128])
    in_proj = meta_state["detector.transformer.decoder.layers.1.ca_text.in_proj_bias"]
    torch.testing.assert_close(our_state["detr_decoder.layers.1.text_cross_attn.v_proj.bias"], in_proj[128:])
    projection = meta_state["detector.backbone.language_backbone.encoder.text_projection"]  # [64, 512]
    torch.testing.assert_close(our_state["text_encoder.text_projection.weight"], projection.T)
    pos = meta_state["detector.backbone.vision_backbone.trunk.pos_embed"]  # [1, 1 + 16 * 16, 64]
    torch.testing.assert_close(our_state["vision_encoder.backbone.embeddings.position_embeddings"], pos[:, 1:])
    # Meta's ViT LayerNorm eps travels with the config.
    config = json.loads((directory / "config.json").read_text())
    assert config["vision_config"]["backbone_config"]["layer_norm_eps"] == 1e-5


def test_tracker_keys_are_counted_and_skipped(converted, meta_state):
    _, conversion = converted
    sam2_neck = [k for k in meta_state if ".sam2_convs." in k]  # the tracker's copy of the FPN neck
    assert len(sam2_neck) > 0
    assert conversion.tracker_keys == FAKE_TRACKER_KEYS + len(sam2_neck)
    assert not any("tracker" in k or "sam2" in k for k in conversion.state)
    layers = CONFIG.vision_config.backbone_config.num_hidden_layers
    assert sorted(conversion.dropped.values()) == sorted([layers, 6])  # RoPE caches; point-prompt encoders
    # A checkpoint of Meta's trainer holds the image model's keys unprefixed: the same conversion.
    unprefixed = {k[len("detector."):]: v for k, v in meta_state.items() if k.startswith("detector.")}
    plain = convert_state(unprefixed, CONFIG)
    assert plain.state.keys() == conversion.state.keys() and plain.tracker_keys == len(sam2_neck)


def test_unknown_and_missing_keys_are_named_in_one_error(meta_state):
    state = dict(meta_state)
    state["detector.transformer.decoder.mystery_head.weight"] = torch.zeros(3)
    del state["detector.transformer.decoder.presence_token.weight"]
    with pytest.raises(MetaCheckpointError) as err:
        convert_state(state, CONFIG)
    message = str(err.value)
    assert "1 Meta key(s) without a conversion rule: transformer.decoder.mystery_head.weight" in message
    assert "1 transformers key(s) left unfilled: detr_decoder.presence_token.weight" in message


def test_wrong_config_names_the_shapes(meta_state):
    config = preset_config("tiny", text_config={"projection_dim": 512}, num_queries=7)
    shapes = r"detr_decoder.query_embed.weight \(converted \(50, 64\), config \(7, 64\)\)"
    with pytest.raises(MetaCheckpointError, match=shapes):
        convert_state(meta_state, config)


def test_released_checkpoint_layout_converts_to_the_default_config():
    """The keys and shapes of the released sam3.pt (Meta's own video-model builder at the released sizes,
    no weights): every detector key has a rule and fills the config the tool uses without --config."""
    state = released_meta_video_model().state_dict()
    assert {k.split(".")[0] for k in state} == {"detector", "tracker"}
    config = read_config(None)
    conversion = convert_state(state, config)
    assert conversion.state.keys() == expected_shapes(config).keys()
    assert sum(v.numel() for v in conversion.state.values()) > 800_000_000
    assert conversion.tracker_keys == sum(k.startswith("tracker.") or ".sam2_convs." in k for k in state)
    assert sorted(conversion.dropped.values()) == [6, 32]  # point-prompt encoders; RoPE caches of 32 blocks


def test_command_line_tool(meta_model, tmp_path, capsys):
    path = Path(__file__).parents[1] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.save(meta_checkpoint(meta_model), tmp_path / "sam3.pt")
    (tmp_path / "tiny.json").write_text(CONFIG.to_json_string())
    argv = ["--input", str(tmp_path / "sam3.pt"), "--output", str(tmp_path / "out"),
            "--config", str(tmp_path / "tiny.json"), "--no-progress"]
    assert tool.main(argv) == 0
    assert "tracker tensors skipped" in capsys.readouterr().out
    assert Sam3Detector.from_pretrained(tmp_path / "out").num_queries == 50
    assert tool.main(["--input", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x")]) == 1
    assert "missing.pt does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert tool.main(["--input", str(tmp_path / "bad.pt"), "--output", str(tmp_path / "x")]) == 1
    assert "bad.pt is not a readable PyTorch checkpoint" in capsys.readouterr().err


def prompts(kind: str) -> tuple[list[str], torch.Tensor | None, torch.Tensor | None]:
    """Three pairs over two images; boxes [P, E, 4] normalised cxcywh, labels [P, E] (-1 padding)."""
    if kind == "text":
        return PHRASES, None, None
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]],
                          [[0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.1]],
                          [[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -1], [1, 0], [0, -1]])
    return (["visual"] * 3 if kind == "boxes" else PHRASES), boxes, labels


def both_forwards(meta_model, ours, kind: str, find_target=None) -> tuple[dict, dict]:
    """Our outputs and Meta's (its dict) on the same two images and three pairs."""
    phrases, boxes, labels = prompts(kind)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    pair_image = torch.tensor([0, 0, 1])
    input_ids, attention_mask = ours.tokenize(phrases)
    batch = Batch(images=images, image_sizes=torch.tensor([[224, 224]] * 2), pair_image=pair_image,
                  input_ids=input_ids, attention_mask=attention_mask, exemplar_boxes=boxes, exemplar_labels=labels)
    with torch.no_grad(), cpu_workarounds():
        return ours(batch), run_meta(meta_model, meta_datapoint(images, phrases, pair_image, boxes, labels, find_target))


def assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, name: str, tol: float = 1e-4) -> None:
    """Equal to ``tol`` of the reference's largest magnitude (rel 1e-4)."""
    assert got.shape == ref.shape, name
    assert float((got - ref).abs().max()) <= tol * float(ref.abs().max()), name


@pytest.mark.parametrize("kind", ["text", "boxes", "text+boxes"])
def test_eval_forward_matches_meta(meta_model, ours, kind):
    """Logits, boxes, masks, presence and semantic segmentation equal Meta's to 1e-4 of their scale.
    Text-only prompts too: Meta's always end with the exemplar encoder's CLS token, as ours by default
    (encode_empty_geometry=True); transformers' mode differs there by ~0.6 in the logits."""
    got, ref = both_forwards(meta_model, ours, kind)
    ref = {"pred_logits": ref["pred_logits"].squeeze(-1), "pred_boxes": ref["pred_boxes"],  # both cxcywh
           "pred_masks": ref["pred_masks"], "presence_logit": ref["presence_logit_dec"].squeeze(-1),
           "semantic_seg": ref["semantic_seg"]}
    for key in OUTPUTS:
        assert_close_to_scale(got[key], ref[key], key)
    # Not a comparison of constants: pairs differ, and logits are not clamped flat.
    assert (ref["pred_logits"][0] - ref["pred_logits"][1]).abs().max() > 1e-3
    assert (ref["presence_logit"][0] - ref["presence_logit"][2]).abs() > 1e-3


def test_train_forward_matches_meta(meta_model, ours):
    """Training mode (DAC, dropout 0): both halves' logits, boxes and masks and every earlier decoder
    layer's outputs equal Meta's training forward."""
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.zeros(0, 4), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    target = meta_find_target(boxes, [torch.zeros(len(b), 224, 224, dtype=torch.bool) for b in boxes], [True] * 3)
    meta_model.train(), ours.train()
    try:
        got, ref = both_forwards(meta_model, ours, "text+boxes", find_target=target)
    finally:
        meta_model.eval(), ours.eval()
    pairs = [(got["pred_logits"], ref["pred_logits"].squeeze(-1), "o2o logits"),
             (got["o2m"]["pred_logits"], ref["pred_logits_o2m"].squeeze(-1), "o2m logits"),
             (got["o2m"]["pred_boxes"], ref["pred_boxes_o2m"], "o2m boxes"),
             (got["o2m"]["pred_masks"], ref["pred_masks_o2m"], "o2m masks")]
    assert len(got["aux_outputs"]) == len(ref["aux_outputs"]) == CONFIG.detr_decoder_config.num_layers - 1
    for i, (ours_aux, meta_aux) in enumerate(zip(got["aux_outputs"], ref["aux_outputs"])):
        pairs += [(ours_aux["pred_logits"], meta_aux["pred_logits"].squeeze(-1), f"layer {i} logits"),
                  (ours_aux["pred_boxes"], meta_aux["pred_boxes"], f"layer {i} boxes"),
                  (ours_aux["presence_logit"], meta_aux["presence_logit_dec"].squeeze(-1), f"layer {i} presence"),
                  (got["o2m"]["aux_outputs"][i]["pred_logits"], meta_aux["pred_logits_o2m"].squeeze(-1), f"layer {i} o2m")]
    for mine, theirs, name in pairs:
        assert_close_to_scale(mine, theirs, name)
    assert (got["o2m"]["pred_logits"] - got["pred_logits"]).abs().max() > 1e-3  # the halves differ
