"""The detector against transformers' Sam3Model, DAC invariants, pair batching, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Sam3Config, Sam3Model

from sam3_train.data import Batch
from sam3_train.model import Sam3Detector, build_detector
from sam3_train.model.decoder import run_decoder
from sam3_train.box_ops import cxcywh_to_xyxy
from sam3_train.model.postprocess import postprocess

PHRASES = ["red star", "blue circle", "small green square"]


@pytest.fixture(scope="module")
def detector() -> Sam3Detector:
    # transformers' init: Meta's zeroes the box head's last layer, so every layer would give the same boxes.
    torch.manual_seed(0)
    return build_detector("tiny", dropout=0.0, init="transformers").eval()


@pytest.fixture(scope="module")
def transformers_mode_detector() -> Sam3Detector:
    """transformers' prompt mode (no exemplar encoder for text-only batches), to compare with Sam3Model."""
    torch.manual_seed(0)
    return build_detector("tiny", dropout=0.0, init="transformers", encode_empty_geometry=False).eval()


def make_batch(det: Sam3Detector, phrases_per_image: list[list[str]], boxes: list[torch.Tensor] | None = None,
               labels: list[torch.Tensor] | None = None, seed: int = 1) -> Batch:
    """Images with their phrases; ``boxes``/``labels`` per pair ([E, 4] cxcywh / [E]) when given."""
    g = torch.Generator().manual_seed(seed)
    side = det.image_size
    images = torch.randn(len(phrases_per_image), 3, side, side, generator=g)
    phrases = [p for ps in phrases_per_image for p in ps]
    pair_image = torch.tensor([i for i, ps in enumerate(phrases_per_image) for _ in ps])
    input_ids, attention_mask = det.tokenize(phrases)
    batch = Batch(images=images, image_sizes=torch.tensor([[side, side]] * len(images)), pair_image=pair_image,
                  input_ids=input_ids, attention_mask=attention_mask, phrases=phrases)
    if boxes is not None:
        e = max(len(b) for b in boxes)
        batch.exemplar_boxes = torch.zeros(len(phrases), e, 4)
        batch.exemplar_labels = torch.full((len(phrases), e), -1, dtype=torch.long)
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            batch.exemplar_boxes[i, : len(b)] = b
            batch.exemplar_labels[i, : len(b)] = lab
    return batch


def reference_outputs(det: Sam3Detector, batch: Batch):
    """transformers.Sam3Model on the same weights, one row per pair (image repeated)."""
    hf = Sam3Model(det.config).eval()
    hf.load_state_dict(det.state_dict(), strict=True)
    kwargs = {}
    if batch.exemplar_boxes is not None:
        labels = batch.exemplar_labels.clone()
        labels[labels < 0] = -10  # transformers' padding label
        kwargs = {"input_boxes": batch.exemplar_boxes, "input_boxes_labels": labels}
    with torch.no_grad():
        return hf(pixel_values=batch.images[batch.pair_image], input_ids=batch.input_ids,
                  attention_mask=batch.attention_mask, **kwargs)


def exemplars():
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.tensor([[0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.1]]),
             torch.tensor([[0.5, 0.5, 0.5, 0.5]])]
    labels = [torch.tensor([1]), torch.tensor([1, 0]), torch.tensor([0])]
    return boxes, labels


@pytest.mark.parametrize("prompt", ["text", "boxes", "text+boxes"])
def test_eval_parity_with_transformers(transformers_mode_detector, prompt):
    detector = transformers_mode_detector
    phrases = [["visual", "visual"], ["visual"]] if prompt == "boxes" else [PHRASES[:2], PHRASES[2:]]
    boxes, labels = exemplars() if prompt != "text" else (None, None)
    batch = make_batch(detector, phrases, boxes, labels)
    with torch.no_grad():
        ours = detector(batch)
    ref = reference_outputs(detector, batch)
    assert "o2m" not in ours
    torch.testing.assert_close(ours["pred_logits"], ref.pred_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cxcywh_to_xyxy(ours["pred_boxes"]), ref.pred_boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["presence_logit"], ref.presence_logits.squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], ref.pred_masks, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["semantic_seg"], ref.semantic_seg, atol=1e-5, rtol=0)
    # Outputs of different pairs differ: the comparison is not between constants.
    assert (ours["pred_logits"][0] - ours["pred_logits"][1]).abs().max() > 1e-4


def test_every_decoder_layer_is_returned(detector):
    batch = make_batch(detector, [PHRASES])
    with torch.no_grad():
        out = detector(batch)
    layers = detector.config.detr_decoder_config.num_layers
    assert len(out["aux_outputs"]) == layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape
        assert aux["presence_logit"].shape == out["presence_logit"].shape
        assert not torch.allclose(aux["pred_boxes"], out["pred_boxes"])


def test_dac_one_to_one_half_equals_dac_off():
    torch.manual_seed(0)
    det = build_detector("tiny", dropout=0.0).train()
    batch = make_batch(det, [PHRASES[:2], PHRASES[2:]])
    with torch.no_grad():
        with_dac = det(batch)
        det.dac = False
        without = det(batch)
    assert "o2m" in with_dac and "o2m" not in without
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg"):
        torch.testing.assert_close(with_dac[key], without[key], atol=1e-5, rtol=0)
    for a, b in zip(with_dac["aux_outputs"], without["aux_outputs"]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    q = det.num_queries
    assert with_dac["o2m"]["pred_logits"].shape == (3, q)
    assert with_dac["o2m"]["pred_masks"].shape == with_dac["pred_masks"].shape
    assert len(with_dac["o2m"]["aux_outputs"]) == len(with_dac["aux_outputs"])
    # The o2m half skips self-attention, so it differs from the o2o half.
    assert (with_dac["o2m"]["pred_logits"] - with_dac["pred_logits"]).abs().max() > 1e-4


def test_one_to_many_queries_are_independent():
    """Changing one o2m query changes that query only: o2m queries never see each other or the o2o half."""
    torch.manual_seed(0)
    det = build_detector("tiny", dropout=0.0).train()
    decoder = det.detr_decoder
    q, c = det.num_queries, decoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    args = dict(vision_features=torch.randn(2, 16 * 16, c, generator=g), vision_pos=torch.randn(2, 256, c, generator=g),
                text_features=torch.randn(2, 5, c, generator=g), text_mask=torch.tensor([[1, 1, 1, 0, 0]] * 2).bool(),
                spatial_shape=(16, 16), dac=True)
    queries = decoder.query_embed.weight.detach().repeat(2, 1)
    changed = queries.clone()
    j = q + 7  # one query of the one-to-many half
    changed[j] += torch.randn(c, generator=g)
    with torch.no_grad():
        a = run_decoder(decoder, initial_queries=queries, **args)
        b = run_decoder(decoder, initial_queries=changed, **args)
    diff = (a.hidden - b.hidden).abs().amax(dim=(0, 1, 3))  # per query
    assert diff[j] > 1e-3
    others = torch.ones(2 * q, dtype=torch.bool)
    others[j] = False
    assert diff[others].max() == 0
    torch.testing.assert_close(a.presence_logits, b.presence_logits, atol=0, rtol=0)
    # Control: changing an o2o query does reach the other o2o queries through self-attention.
    changed = queries.clone()
    changed[3] += torch.randn(c, generator=g)
    with torch.no_grad():
        d = run_decoder(decoder, initial_queries=changed, **args)
    assert (a.hidden[:, :, :q] - d.hidden[:, :, :q]).abs().amax(dim=(0, 1, 3))[4:].max() > 1e-6
    assert (a.hidden[:, :, q:] - d.hidden[:, :, q:]).abs().max() == 0


def test_pairs_batched_equal_pairs_alone(detector):
    phrases = [PHRASES, PHRASES[::-1][:2]]
    batch = make_batch(detector, phrases)
    with torch.no_grad():
        together = detector(batch)
        for p in range(batch.num_pairs):
            i = int(batch.pair_image[p])
            alone = Batch(images=batch.images[i : i + 1], image_sizes=batch.image_sizes[i : i + 1],
                          pair_image=torch.tensor([0]), input_ids=batch.input_ids[p : p + 1],
                          attention_mask=batch.attention_mask[p : p + 1])
            out = detector(alone)
            for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg"):
                torch.testing.assert_close(together[key][p : p + 1], out[key], atol=1e-5, rtol=0)


def alone(batch: Batch, p: int) -> Batch:
    """Pair ``p`` of ``batch`` as a batch of its own: its image, and only its real exemplar boxes (none for
    a text-only pair), without the padding the batch gave it."""
    i = int(batch.pair_image[p])
    single = Batch(images=batch.images[i : i + 1], image_sizes=batch.image_sizes[i : i + 1], pair_image=torch.tensor([0]),
                   input_ids=batch.input_ids[p : p + 1], attention_mask=batch.attention_mask[p : p + 1])
    real = batch.exemplar_labels[p] >= 0
    if real.any():
        single.exemplar_boxes = batch.exemplar_boxes[p : p + 1, real]
        single.exemplar_labels = batch.exemplar_labels[p : p + 1, real]
    return single


def mixed_prompt_batch(det: Sam3Detector) -> Batch:
    """Two images, four pairs: text-only, text + one positive box, text-only, text + a positive and a negative box."""
    boxes = [torch.zeros(0, 4), torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.zeros(0, 4),
             torch.tensor([[0.6, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.1]])]
    labels = [torch.zeros(0, dtype=torch.long), torch.tensor([1]), torch.zeros(0, dtype=torch.long), torch.tensor([1, 0])]
    return make_batch(det, [PHRASES[:2], [PHRASES[2], PHRASES[0]]], boxes, labels)


def test_each_pair_is_independent_of_its_batch_with_meta_prompts(detector):
    """encode_empty_geometry=True (the default, Meta's): every prompt ends with the exemplar encoder's CLS
    token, so a pair's outputs do not depend on the other pairs, their boxes or the box padding."""
    assert detector.encode_empty_geometry
    batch = mixed_prompt_batch(detector)
    with torch.no_grad():
        together = detector(batch)
        for p in range(batch.num_pairs):
            out = detector(alone(batch, p))
            for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg"):
                torch.testing.assert_close(together[key][p : p + 1], out[key], atol=1e-5, rtol=0, msg=f"pair {p} {key}")


def test_transformers_prompt_mode_makes_text_only_pairs_depend_on_the_batch(transformers_mode_detector):
    """The control of the test above: with encode_empty_geometry=False a text-only pair gets the CLS token
    only when another pair of its batch has a box, so its outputs change with the batch."""
    det = transformers_mode_detector
    batch = mixed_prompt_batch(det)
    with torch.no_grad():
        together = det(batch)["pred_logits"][0]
        by_itself = det(alone(batch, 0))["pred_logits"][0]
    assert (together - by_itself).abs().max() > 1e-3


def test_text_encoder_runs_once_per_distinct_phrase(detector):
    batch = make_batch(detector, [["star", "circle", "star"], ["circle", "star"]])
    texts, images = [], []  # batch sizes each encoder was called with
    hooks = [detector.text_encoder.register_forward_pre_hook(
                 lambda m, args, kwargs: texts.append(kwargs["input_ids"].shape[0]), with_kwargs=True),
             detector.vision_encoder.register_forward_pre_hook(lambda m, args: images.append(args[0].shape[0]))]
    try:
        with torch.no_grad():
            detector(batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert texts == [2] and images == [2]  # 5 pairs, 2 distinct phrases, 2 images: one call each


def _tensors(tree, prefix=""):
    """{path: tensor} of every tensor in a nested dict / list of outputs."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in _tensors(sub, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("train", [False, True])
def test_text_columns_past_the_longest_phrase_change_no_output(detector, train):
    """encode_text drops the padding columns past the longest phrase (SAM 3's tokenizer pads to 32):
    every output, DAC halves included, is the 32-column forward's, with exemplar boxes appended after
    the text too, and the text encoder sees only the longest phrase's width."""
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.tensor([[0.6, 0.5, 0.1, 0.3], [0.2, 0.7, 0.1, 0.1]]),
             torch.zeros(0, 4), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    labels = [torch.tensor([1]), torch.tensor([1, 0]), torch.zeros(0, dtype=torch.long), torch.tensor([0])]
    batch = make_batch(detector, [["red star", "small green square"], ["circle", "blue circle"]], boxes, labels)
    longest = int(batch.attention_mask.sum(1).max())
    assert batch.input_ids.shape[1] == 32 and longest < 32
    widths = []
    hook = detector.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    detector.train(train)
    try:
        with torch.no_grad():
            trimmed = _tensors(detector(batch))
            detector.trim_text_padding = lambda ids, mask: (ids, mask)  # shadows the staticmethod: 32 columns
            padded = _tensors(detector(batch))
    finally:
        detector.__dict__.pop("trim_text_padding", None)
        hook.remove()
        detector.eval()
    assert widths == [longest, 32]
    assert trimmed.keys() == padded.keys() and len(trimmed) > 5
    for key in trimmed:
        torch.testing.assert_close(trimmed[key], padded[key], atol=1e-5, rtol=1e-4, msg=key)


def test_trim_text_padding_keeps_every_real_token():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    out_ids, out_mask = Sam3Detector.trim_text_padding(ids, mask)
    assert out_ids.tolist() == [[5, 6, 7], [5, 0, 0]] and out_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert Sam3Detector.trim_text_padding(empty, empty)[0].shape == (0, 5)  # no pairs: unchanged


def test_sam3_preset_matches_released_architecture():
    with torch.device("meta"):
        ours = build_detector("sam3")
        ref = Sam3Model(Sam3Config())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref) > 800_000_000
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_tiny_preset_is_tiny(detector):
    assert sum(p.numel() for p in detector.parameters()) < 5_000_000
    assert isinstance(detector.config, Sam3Config)


def test_save_and_from_pretrained_round_trip(detector, tmp_path):
    detector.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = Sam3Detector.from_pretrained(tmp_path)
    for key, value in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.tokenize(["red star"])[0], detector.tokenize(["red star"])[0])
    # The same file loads into transformers' own model, strictly.
    hf, info = Sam3Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_state = hf.state_dict()
    assert all(torch.equal(hf_state[k], v) for k, v in detector.state_dict().items())


def test_from_pretrained_initialises_nothing_it_overwrites(detector, tmp_path):
    detector.save_pretrained(tmp_path)
    before = torch.get_rng_state()
    loaded = Sam3Detector.from_pretrained(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)  # no weight was drawn at random, to be overwritten
    assert loaded.training and all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    frozen = lambda m: {n for n, p in m.named_parameters() if not p.requires_grad}  # noqa: E731
    assert frozen(loaded) == frozen(detector) != set()  # the weights SAM 3's forward never reads


def test_missing_and_unexpected_keys_are_named(detector, tmp_path):
    detector.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    gone = "detr_decoder.presence_token.weight"
    del state[gone]
    state["detr_decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="missing keys: detr_decoder.presence_token.weight") as err:
        Sam3Detector.from_pretrained(tmp_path)
    assert "unexpected keys: detr_decoder.extra_head.weight" in str(err.value)


def test_shape_mismatch_is_named(detector, tmp_path):
    detector.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["detr_decoder_config"]["num_queries"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"detr_decoder.query_embed.weight \(checkpoint \(50, 64\), model \(7, 64\)\)"):
        Sam3Detector.from_pretrained(tmp_path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        Sam3Detector.from_pretrained(tmp_path / "nowhere")


def test_released_video_layout_loads(detector, tmp_path):
    """facebook/sam3 stores a video config with ``detector_config`` and prefixed, sharded weights."""
    config = detector.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3_video", "detector_config": config}))
    state = {f"detector_model.{k}": v.contiguous() for k, v in detector.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    state["tracker_model.memory.weight"] = torch.zeros(3)
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:] + ["tracker_model.memory.weight"]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / name)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},  # as released
             "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = Sam3Detector.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in detector.state_dict().items())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    det = build_detector("tiny", dropout=0.0).train()
    batch = make_batch(det, [PHRASES[:2], PHRASES[2:]])
    # Modules whose forward runs twice (forward + recompute in backward) when checkpointed. Pre-hooks: the
    # recompute stops once it has what backward needs (torch's early stop), before a forward hook would run.
    recomputed = {"vit": det.vision_encoder.backbone.layers[0].attention, "detr_encoder": det.detr_encoder.layers[0],
                  "decoder": det.detr_decoder.layers[0].self_attn, "mask_decoder": det.mask_decoder,
                  "text": det.text_encoder.text_model.encoder.layers[0].self_attn}
    calls = dict.fromkeys(recomputed, 0)
    for name, module in recomputed.items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))

    def step():
        det.zero_grad()
        calls.update(dict.fromkeys(calls, 0))
        out = det(batch)
        loss = (out["pred_logits"].sum() + out["pred_masks"].mean() + out["o2m"]["pred_boxes"].sum()
                + out["presence_logit"].sum())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in det.named_parameters() if p.grad is not None}, dict(calls)

    plain_loss, plain, plain_calls = step()
    det.set_activation_checkpointing(True)
    ckpt_loss, ckpt, ckpt_calls = step()
    assert plain_calls == dict.fromkeys(recomputed, 1)
    assert ckpt_calls == {"vit": 2, "detr_encoder": 2, "decoder": 2, "mask_decoder": 2, "text": 1}  # text: as before
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys()
    assert any(n.startswith("vision_encoder.backbone.layers") for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-5, rtol=1e-4, msg=name)
    det.set_activation_checkpointing(False)
    assert step()[2] == plain_calls


def test_postprocess_maps_to_original_pixels():
    """A hand-made output: one confident query, box and mask in the content region of a padded input."""
    side, q = 8, 3
    batch = Batch(images=torch.zeros(1, 3, side, side), image_sizes=torch.tensor([[4, 8]]),  # content 4 x 8
                  pair_image=torch.tensor([0]), input_ids=torch.zeros(1, 32, dtype=torch.long),
                  attention_mask=torch.ones(1, 32, dtype=torch.long))
    logits = torch.tensor([[4.0, -4.0, 0.0]])
    boxes = torch.tensor([[[0.5, 0.25, 0.5, 0.25], [0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])
    masks = torch.full((1, q, side, side), -5.0)
    masks[0, 0, 0:2, 2:6] = 5.0  # rows 0-1 of the 4-row content, columns 2-5 of 8
    out = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks, "presence_logit": torch.tensor([2.0])}
    (res,) = postprocess(out, batch, original_sizes=torch.tensor([[40, 80]]))  # original is 10x the content
    expected_score = torch.sigmoid(torch.tensor(4.0)) * torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(res["scores"], expected_score.reshape(1))
    # cx 0.5*8=4, cy 0.25*8=2, w 4, h 2 -> xyxy (2, 1, 6, 3) in the input -> x10 in the original
    torch.testing.assert_close(res["boxes"], torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    assert res["masks"].shape == (1, 40, 80)
    assert res["masks"][0, 5, 40] and not res["masks"][0, 35, 40] and not res["masks"][0, 5, 5]
    assert abs(res["masks"][0].float().mean().item() - (2 * 4) / (4 * 8)) < 0.05


def test_every_trainable_parameter_gets_a_gradient():
    """Parameters the forward never reads are frozen (plain DDP needs no unused-parameter search)."""
    torch.manual_seed(0)
    det = build_detector("tiny").train()
    boxes, labels = exemplars()
    batch = make_batch(det, [PHRASES[:2], PHRASES[2:]], boxes, labels)
    out = det(batch)
    total = out["pred_logits"].sum() + out["pred_masks"].mean() + out["semantic_seg"].mean()
    total = total + out["presence_logit"].sum() + out["pred_boxes"].sum() + out["o2m"]["pred_logits"].sum()
    total.backward()
    missing = [n for n, p in det.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = sorted(n for n, p in det.named_parameters() if not p.requires_grad)
    assert frozen == sorted([
        "vision_encoder.neck.fpn_layers.3.proj1.weight", "vision_encoder.neck.fpn_layers.3.proj1.bias",
        "vision_encoder.neck.fpn_layers.3.proj2.weight", "vision_encoder.neck.fpn_layers.3.proj2.bias",
        "text_encoder.text_projection.weight",
        "mask_decoder.pixel_decoder.conv_layers.2.weight", "mask_decoder.pixel_decoder.conv_layers.2.bias",
        "mask_decoder.pixel_decoder.norms.2.weight", "mask_decoder.pixel_decoder.norms.2.bias",
    ])


def test_meta_init_starts_queries_apart_at_their_reference_boxes():
    """init="meta" (Meta's SAM 3 code): queries and reference boxes standard normal, so the queries
    start at different boxes over the image; the box head's last layer is zero, so the first layer's
    boxes are exactly the reference boxes; the ViT and the text encoder keep transformers' init."""
    torch.manual_seed(0)
    ours = build_detector("tiny", init="meta", dropout=0.0).train()
    torch.manual_seed(0)
    plain = build_detector("tiny", dropout=0.0, init="transformers")
    decoder = ours.detr_decoder
    reference = decoder.reference_points.weight.detach().sigmoid()  # [Q, 4] cxcywh
    assert all(0.8 < float(e.weight.detach().std()) < 1.2 for e in (decoder.query_embed, decoder.reference_points))
    assert float(reference[:, :2].std(0).min()) > 0.1  # centres spread over the image
    assert float(plain.detr_decoder.reference_points.weight.sigmoid()[:, :2].std(0).max()) < 0.01  # transformers: all at the centre
    batch = make_batch(ours, [PHRASES])
    with torch.no_grad():
        out = ours(batch)
    first = out["aux_outputs"][0]["pred_boxes"]  # [P, Q, 4]
    torch.testing.assert_close(first, reference.expand_as(first), atol=1e-6, rtol=0)
    # Xavier-uniform in the DETR encoder / decoder: every weight within its bound, and not transformers' N(0, 0.02).
    weight = ours.detr_encoder.layers[0].mlp.fc1.weight
    bound = (6 / sum(weight.shape)) ** 0.5
    assert float(weight.abs().max()) <= bound and float(weight.std()) > 2 * 0.02
    for name in ("vision_encoder.backbone.layers.0.mlp.fc1.weight", "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"):
        torch.testing.assert_close(ours.get_parameter(name), plain.get_parameter(name), atol=0, rtol=0)


def test_box_only_objective_skips_the_mask_decoder_in_training():
    """Without mask or semantic terms the mask decoder neither runs in training nor trains; eval keeps masks."""
    from sam3_train.lit import Sam3LitModule
    from sam3_train.losses import Sam3Criterion

    torch.manual_seed(0)
    module = Sam3LitModule(preset="tiny", criterion=Sam3Criterion(use_masks=False, use_semantic=False)).train()
    det = module.detector
    batch = make_batch(det, [PHRASES[:2], PHRASES[2:]])
    batch.targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([0])}] * batch.num_pairs
    out = det(batch)
    assert "pred_masks" not in out and "semantic_seg" not in out and "pred_masks" not in out["o2m"]
    module.criterion.weighted_total(module.criterion(out, batch.targets), num_pairs=batch.num_pairs).backward()
    assert not any(p.requires_grad for p in det.mask_decoder.parameters())
    assert not any(p.requires_grad for p in det.vision_encoder.neck.fpn_layers[0].parameters())
    missing = [n for n, p in det.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    with torch.no_grad():
        out = det.eval()(batch)
    assert out["pred_masks"].shape[:2] == (3, det.num_queries) and out["semantic_seg"].shape[0] == 3
    assert Sam3LitModule(preset="tiny").detector.train_masks  # the default objective trains masks


def test_cpu_bf16_autocast_runs_the_exemplar_encoder():
    """Lightning's bf16-mixed on the CPU: torchvision's CPU roi_align rejects the float16 transformers
    gives it under autocast; the exemplar encoder runs in float32 there and the step trains."""
    torch.manual_seed(0)
    det = build_detector("tiny").train()
    boxes, labels = exemplars()
    batch = make_batch(det, [PHRASES[:2], PHRASES[2:]], boxes, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = det(batch)
        loss = out["pred_logits"].float().sum() + out["pred_masks"].float().mean() + out["pred_boxes"].float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert out["pred_logits"].dtype == torch.bfloat16  # the rest still runs in bf16
    assert det.geometry_encoder.boxes_pool_project.weight.grad is not None


def test_meta_grid_init_puts_reference_centres_on_a_grid_and_keeps_the_rest_of_meta():
    """init="meta_grid": Meta's init with the 20 reference-box centres at the cells of a 4 x 5 grid
    (hand-computed centres), their drawn sizes and every other weight equal to init="meta"'s."""
    torch.manual_seed(0)
    grid = build_detector("tiny", init="meta_grid", num_queries=20)
    torch.manual_seed(0)
    meta = build_detector("tiny", init="meta", num_queries=20)
    centres = grid.detr_decoder.reference_points.weight.detach().sigmoid()[:, :2]
    xs, ys = [0.1, 0.3, 0.5, 0.7, 0.9], [0.125, 0.375, 0.625, 0.875]
    expected = torch.tensor([[x, y] for y in ys for x in xs])
    torch.testing.assert_close(centres, expected, atol=1e-6, rtol=0)
    theirs = meta.state_dict()
    for name, value in grid.state_dict().items():
        if name == "detr_decoder.reference_points.weight":
            torch.testing.assert_close(value[:, 2:], theirs[name][:, 2:], atol=0, rtol=0)  # sizes as drawn
        else:
            torch.testing.assert_close(value, theirs[name], atol=0, rtol=0, msg=name)
    torch.manual_seed(0)
    odd = build_detector("tiny", init="meta_grid", num_queries=7)  # 2 x 4 cells, the last one unused
    centres = odd.detr_decoder.reference_points.weight.detach().sigmoid()[:, :2]
    torch.testing.assert_close(centres[-1], torch.tensor([0.625, 0.75]), atol=1e-6, rtol=0)


def test_meta_sincos_init_starts_the_vit_positions_at_the_sine_cosine_table_and_keeps_the_rest_of_meta():
    """init="meta_sincos": Meta's init with the ViT's position embedding at MAE's 2-D sine-cosine table
    (hand-checked entries), every other weight equal to init="meta"'s, and image features that know
    where they are (a linear probe of a token's x from the ViT output: R^2 > 0.8, against < 0.5 from
    Meta's std-0.02 draw)."""
    torch.manual_seed(0)
    sincos = build_detector("tiny", init="meta_sincos")
    torch.manual_seed(0)
    meta = build_detector("tiny", init="meta")
    name = "vision_encoder.backbone.embeddings.position_embeddings"
    theirs = meta.state_dict()
    for key, value in sincos.state_dict().items():
        if key != name:
            torch.testing.assert_close(value, theirs[key], atol=0, rtol=0, msg=key)
    table = sincos.state_dict()[name][0]  # [16 * 16, 64]: x sin | x cos | y sin | y cos, 16 frequencies each
    side = 16
    token = 3 * side + 5  # row y = 3, column x = 5
    omega = 1.0 / 10000 ** (torch.arange(16, dtype=torch.float64) / 16)
    expected = torch.cat([(5 * omega).sin(), (5 * omega).cos(), (3 * omega).sin(), (3 * omega).cos()]).float()
    torch.testing.assert_close(table[token], expected, atol=1e-6, rtol=0)

    def position_r2(det) -> float:
        g = torch.Generator().manual_seed(1)
        images = torch.rand(4, 3, 224, 224, generator=g) * 2 - 1
        with torch.no_grad():
            features = det.vision_encoder(images).last_hidden_state  # [4, 16, 16, C] or [4, 256, C]
        features = features.reshape(4, side * side, -1)
        x = torch.arange(side * side) % side
        train, test = features[:3].reshape(-1, features.shape[-1]), features[3]
        design = lambda f: torch.cat([f, torch.ones(f.shape[0], 1)], dim=1)  # noqa: E731
        a = design(train)
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ x.repeat(3).float())
        prediction = design(test) @ w
        return float(1 - ((prediction - x) ** 2).sum() / ((x - x.float().mean()) ** 2).sum())

    assert position_r2(sincos) > 0.8 and position_r2(meta) < 0.5


def test_meta_sincos_local_init_makes_cross_attention_start_near_each_box():
    """init="meta_sincos_local": meta_sincos plus box RPB MLPs started box-local. For a query box in
    the middle of the 16 x 16 grid the bias favours the tokens inside it (Meta's draw: uniform), head 1
    the box's left/top part, head 2 its right/bottom part; every weight but the RPB equals meta_sincos."""
    torch.manual_seed(0)
    local = build_detector("tiny", init="meta_sincos_local")
    torch.manual_seed(0)
    sincos = build_detector("tiny", init="meta_sincos")
    theirs = sincos.state_dict()
    for key, value in local.state_dict().items():
        if "box_rpb_embed" not in key:
            torch.testing.assert_close(value, theirs[key], atol=0, rtol=0, msg=key)
    box = torch.tensor([[[0.5, 0.5, 0.25, 0.25]]])  # xyxy 0.375..0.625; token i sits at i / 16: 6..10 inside
    with torch.no_grad():
        bias = local.detr_decoder._get_rpb_matrix(box, (16, 16))[0, :, 0].reshape(-1, 16, 16)  # [heads, y, x]
        meta_bias = sincos.detr_decoder._get_rpb_matrix(box, (16, 16))[0, :, 0]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[6:11, 6:11] = True
    assert (bias[0][inside].min() - bias[0][~inside].max()) > 0  # every inside token above every outside one
    entropy = lambda b: float(-(b.softmax(-1) * b.log_softmax(-1)).sum(-1).mean() / math.log(b.shape[-1]))  # noqa: E731
    # 25 of 256 tokens in the box: a uniform look at them alone has entropy log 25 / log 256 = 0.58
    assert entropy(bias.flatten(1)) < 0.7 < 0.99 < entropy(meta_bias)
    box_part = bias[:, 6:11, 6:11]  # [heads, 5, 5]
    assert box_part[1, :2, :2].mean() > box_part[1, 2:, 2:].mean()  # head 1: the top-left part
    assert box_part[2, 2:, 2:].mean() > box_part[2, :2, :2].mean()  # head 2: the bottom-right part
