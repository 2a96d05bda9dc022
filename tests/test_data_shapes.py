"""The built-in shapes dataset, the DataModule on top of it, and the make_shards command line."""

from __future__ import annotations

import json
import random
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.data.datamodule import Sam3DataModule
from sam3_train.data.decode import build_target
from sam3_train.data.phrases import select_queries, swap_left_right
from sam3_train.data.schema import SampleError, is_negative, is_unlabelled, make_key, validate_meta
from sam3_train.data.shapes import (COLOURS, KINDS, SHIFTED_KINDS, SIZES, domain_vocabulary, ensure_shapes_shards,
                                    generate_scene, kshot_indices, write_kshot_split)
from sam3_train.data.shards import expand_urls
from sam3_train.data.transforms import ColorJitter, ResizePad

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": 24, "val": 8}


# Two shared cores: torch's intra-op threads only contend in these data tests.
pytestmark = pytest.mark.usefixtures("one_thread")


def _triples(meta) -> set[tuple[str, str, str]]:
    """(size, colour, kind) of the instances, read from the most detailed positive phrases."""
    out = set()
    for q in meta["queries"]:
        words = q["phrase"].split()
        if len(words) == 3 and q["instances"]:
            out.add(tuple(words))
    return out


def test_generator_is_deterministic_per_seed():
    a_img, a_meta = generate_scene(7, 3, image_size=96)
    b_img, b_meta = generate_scene(7, 3, image_size=96)
    c_img, _ = generate_scene(8, 3, image_size=96)
    assert np.array_equal(a_img, b_img) and a_meta == b_meta
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("domain", ["base", "shifted"])
def test_masks_match_boxes_respect_occlusion_and_negatives_are_absent(domain):
    _, colours, _ = domain_vocabulary(domain)
    hard_seen = 0
    for index in range(40):
        image, meta = generate_scene(11, index, image_size=128, domain=domain)
        validate_meta(meta)
        triples = _triples(meta)
        instances = {}
        for q in meta["queries"]:
            for inst in q["instances"]:
                mask = rle_ops.decode(inst["rle"]).astype(bool)
                assert mask.any()
                assert inst["box"] == rle_ops.to_xywh(inst["rle"])  # box is the mask's tight box
                instances[inst["rle"]["counts"]] = mask
            words = q["phrase"].split()
            matching = {t for t in triples if t[-len(words):] == tuple(words)}
            assert bool(matching) == bool(q["instances"]), q["phrase"]  # negatives truly absent
            if len(words) == 1 and q["instances"]:  # a kind's phrase owns all instances of that kind
                assert len(q["instances"]) == sum(len(p["instances"]) for p in meta["queries"]
                                                  if len(p["phrase"].split()) == 3 and p["phrase"].endswith(q["phrase"]))
            if is_negative(q) and len(words) >= 2:  # hard: its parts are present
                hard_seen += 1
                assert any(t[-1] == words[-1] for t in triples) and any(words[-2] in t for t in triples)
        masks = np.stack(list(instances.values())) if instances else np.zeros((0, 128, 128), bool)
        assert (masks.sum(0) <= 1).all()  # visible parts never overlap: drawing order respected
        for counts, mask in instances.items():  # a visible mask has the colour its phrase names
            phrase = next(q["phrase"] for q in meta["queries"] if len(q["phrase"].split()) == 3
                          and any(i["rle"]["counts"] == counts for i in q["instances"]))
            assert np.abs(image[mask].astype(int) - colours[phrase.split()[1]]).max() <= 1
    assert hard_seen > 40


def test_shifted_domain_is_deterministic_per_seed_and_differs_from_the_base():
    a_img, a_meta = generate_scene(7, 3, image_size=96, domain="shifted")
    b_img, b_meta = generate_scene(7, 3, image_size=96, domain="shifted")
    base_img, base_meta = generate_scene(7, 3, image_size=96)
    assert np.array_equal(a_img, b_img) and a_meta == b_meta
    assert not np.array_equal(a_img, generate_scene(8, 3, image_size=96, domain="shifted")[0])
    assert not np.array_equal(a_img, base_img) and a_meta["image_id"] != base_meta["image_id"]
    assert a_meta["source"]["domain"] == "shifted" and "domain" not in base_meta["source"]
    # New concepts: over a few scenes every new kind and colour shows up, positive and as an easy negative.
    phrases = {q["phrase"] for i in range(30) for q in generate_scene(7, i, image_size=96, domain="shifted")[1]["queries"]}
    new_kinds, new_colours = set(SHIFTED_KINDS) - set(KINDS), set(domain_vocabulary("shifted")[1]) - set(COLOURS)
    assert new_kinds <= phrases and all(any(p.startswith(f"{c} ") for p in phrases) for c in new_colours)
    base_phrases = {q["phrase"] for i in range(30) for q in generate_scene(7, i, image_size=96)[1]["queries"]}
    assert not any(word in p.split() for p in base_phrases for word in new_kinds | new_colours)
    # The appearance shift: the base backgrounds are low-saturation, the shifted ones mostly are not.
    def saturation(img):
        return float(np.median(img.max(-1).astype(int) - img.min(-1)))
    base_sat = [saturation(generate_scene(5, i, image_size=64)[0]) for i in range(20)]
    shifted_sat = [saturation(generate_scene(5, i, image_size=64, domain="shifted")[0]) for i in range(20)]
    assert np.median(shifted_sat) > 2 * np.median(base_sat)


def test_shifted_splits_have_their_own_folder_and_seeds(tmp_path):
    base = ensure_shapes_shards(tmp_path, splits={"val": 8}, image_size=64)
    shifted = ensure_shapes_shards(tmp_path, splits={"val": 8}, image_size=64, domain="shifted")
    assert shifted["val"].startswith(str(tmp_path / "shards" / "shifted" / "val" / ""))
    assert ensure_shapes_shards(tmp_path, splits={"val": 8}, image_size=64) == base  # the base cache is kept
    manifest = json.loads((tmp_path / "shards" / "shifted" / "val" / "manifest.json").read_text())
    assert manifest["params"]["domain"] == "shifted" and manifest["params"]["seed"] == domain_vocabulary("shifted")[2]["val"]
    with pytest.raises(ValueError, match="unknown shapes domain"):
        ensure_shapes_shards(tmp_path, splits={"val": 8}, domain="night")


def test_kshot_cut_of_the_shifted_domain_has_k_images_per_kind_and_is_reproducible(tmp_path):
    shots, pool = 2, 40
    kept, info = kshot_indices(domain="shifted", shots=shots, seed=0, pool=pool, image_size=64)
    assert kshot_indices(domain="shifted", shots=shots, seed=0, pool=pool, image_size=64) == (kept, info)
    assert kshot_indices(domain="shifted", shots=shots, seed=1, pool=pool, image_size=64)[0] != kept
    # K images per kind (every kind is common enough in 40 scenes), counted from the scenes themselves.
    seed = domain_vocabulary("shifted")[2]["train"]
    per_kind = {k: 0 for k in SHIFTED_KINDS}
    for i in kept:
        for q in generate_scene(seed, i, image_size=64, domain="shifted")[1]["queries"]:
            if q["phrase"] in per_kind and q["instances"]:
                per_kind[q["phrase"]] += 1
    assert per_kind == info["images_per_kind"] and min(per_kind.values()) >= shots
    assert len(kept) < pool and info["protocol"].startswith("K images per category")
    pattern = write_kshot_split(tmp_path / "k2", domain="shifted", shots=shots, seed=0, pool=pool, image_size=64)
    assert write_kshot_split(tmp_path / "k2", domain="shifted", shots=shots, seed=0, pool=pool, image_size=64) == pattern
    manifest = json.loads((tmp_path / "k2" / "manifest.json").read_text())
    assert manifest["indices"] == kept and len(expand_urls(pattern)) == min(8, len(kept))
    import tarfile

    ids = []
    for url in expand_urls(pattern):
        with tarfile.open(url) as tar:
            ids += [json.load(tar.extractfile(m))["image_id"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert ids == [f"shapes-shifted-{seed}-{i}" for i in kept]  # the kept scenes, in order, nothing else


def test_vocabulary_file_lists_every_phrase():
    vocab = (ROOT / "datasets" / "shapes" / "vocabulary.txt").read_text().split("\n")
    phrases = {line for line in vocab if line and not line.startswith("#")}
    expected = set(KINDS) | {f"{c} {k}" for c in COLOURS for k in KINDS} | {f"{s} {c} {k}" for s in SIZES for c in COLOURS for k in KINDS}
    assert phrases == expected


def test_shards_are_cached(tmp_path):
    first = ensure_shapes_shards(tmp_path, splits=SPLITS, image_size=64, max_count=10)
    assert first["train"].endswith("shapes-{000000..000007}.tar")  # 24 images: 8 shards of 3
    files = sorted((tmp_path / "shards" / "train").glob("*.tar"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert ensure_shapes_shards(tmp_path, splits=SPLITS, image_size=64, max_count=10) == first
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing rewritten


def test_a_split_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two processes build the same cache: the one whose rename comes second keeps the first one's
    folder when its manifest matches, removes its own, and raises when it does not match."""
    import shutil

    from sam3_train.data import shapes

    done = tmp_path / "done"
    ensure_shapes_shards(done, splits={"val": 8}, image_size=64, max_count=10)
    real_replace = shapes.replace_dir

    def other_process_first(tmp, final):
        shutil.copytree(done / "shards" / "val", final)  # the other process's rename lands first
        real_replace(tmp, final)

    monkeypatch.setattr(shapes, "replace_dir", other_process_first)
    pattern = ensure_shapes_shards(tmp_path, splits={"val": 8}, image_size=64, max_count=10)["val"]
    assert pattern == str(tmp_path / "shards" / "val" / "shapes-{000000..000007}.tar")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["val"]  # our temporary folder is gone
    with pytest.raises(OSError):  # the other process built different parameters: not ours to keep
        ensure_shapes_shards(tmp_path / "other", splits={"val": 8}, image_size=32, max_count=10)


def test_datamodule_on_shapes(tmp_path):
    dm = Sam3DataModule(shapes_root=str(tmp_path), shapes_splits=SPLITS, shapes_image_size=64, image_size=64,
                        batch_size=4, num_workers=0, max_phrases_per_image=4, negative_share=0.5,
                        steps_per_epoch=3, shuffle_buffer=8, min_scale=0.5)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[b for b in loader] for _ in range(2)]
    assert [len(e) for e in epochs] == [3, 3] and len(loader) == 3
    assert [b.keys for b in epochs[0]] != [b.keys for b in epochs[1]]  # reshuffled per epoch
    for batch in epochs[0]:
        assert batch.images.shape == (4, 3, 64, 64) and batch.images.dtype == torch.float32
        assert -1.0 <= batch.images.min() and batch.images.max() <= 1.0
        assert (batch.image_sizes <= 64).all() and (batch.image_sizes >= 32).all()
        assert (batch.original_sizes == 64).all()
        assert batch.pair_image.tolist() == sorted(batch.pair_image.tolist())
        assert (torch.bincount(batch.pair_image, minlength=4) <= 4).all()
        assert batch.input_ids.shape == (batch.num_pairs, 32) and batch.exemplar_boxes.shape == (batch.num_pairs, 0, 4)
        for t in batch.targets:
            assert t["masks"].dtype == torch.bool and t["masks"].shape[1:] == (64, 64)
            assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
    val = [b for b in dm.val_dataloader()]
    assert sum(b.num_images for b in val) == SPLITS["val"]
    assert (torch.cat([b.image_sizes for b in val]) == 64).all()
    assert dm.skipped_samples == 0


def test_query_selection_share_and_fill():
    queries = [{"phrase": f"p{i}", "instances": [{}]} for i in range(6)] + [{"phrase": f"n{i}", "instances": []} for i in range(6)]
    rng = random.Random(0)
    chosen = select_queries(queries, max_queries=4, negative_share=0.25, rng=rng)
    assert sum(is_negative(q) for q in chosen) == 1 and len(chosen) == 4
    few_pos = queries[:1] + queries[6:]
    chosen = select_queries(few_pos, max_queries=4, negative_share=0.25, rng=rng)
    assert sum(not is_negative(q) for q in chosen) == 1 and len(chosen) == 4
    assert len(select_queries(queries, max_queries=None, negative_share=0.5, rng=rng)) == 12


def test_query_selection_never_samples_unlabelled_queries():
    """A non-exhaustive query without instances (an unverified pseudo-label pair) is neither a positive
    nor a negative: SAM 3's presence loss would train it as absent."""
    positive = {"phrase": "circle", "exhaustive": False, "instances": [{}]}  # some instances found: present
    negative = {"phrase": "star", "exhaustive": True, "instances": []}
    unlabelled = [{"phrase": f"u{i}", "exhaustive": False, "instances": []} for i in range(4)]
    crowd_only = {"phrase": "people", "exhaustive": True, "instances": [{"crowd": True}]}  # present, no target
    crowd_and_one = {"phrase": "people", "exhaustive": True, "instances": [{"crowd": True}, {}]}
    assert [is_unlabelled(q) for q in (positive, negative, unlabelled[0], crowd_only, crowd_and_one)] == [
        False, False, True, True, False]
    rng = random.Random(0)
    for max_queries in (1, 2, 3, 6):
        for _ in range(20):
            chosen = select_queries([*unlabelled, positive, negative], max_queries=max_queries,
                                    negative_share=0.5, rng=rng)
            assert len(chosen) == min(max_queries, 2) and not any(is_unlabelled(q) for q in chosen)
    assert select_queries(unlabelled, max_queries=4, negative_share=0.5, rng=rng) == []
    assert len(select_queries(unlabelled, max_queries=None, negative_share=0.5, rng=rng)) == 4  # evaluation


def test_swap_left_right_and_keys():
    assert swap_left_right("Left shoe to the right of a leftover") == "Right shoe to the left of a leftover"
    assert "." not in make_key(3, "a.b/c.jpg") and make_key(3, "a.b/c.jpg").startswith("00000003_")
    with pytest.raises(SampleError, match="outside"):
        validate_meta({"width": 10, "height": 10, "queries": [
            {"phrase": "x", "instances": [{"box": [5, 5, 9, 2], "rle": {"size": [10, 10], "counts": ""}}]}]})


def test_color_jitter_equals_the_sequential_definition():
    img = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8)
    for seed in range(4):
        out, _ = ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)(img, {"size": (10, 14)}, random.Random(seed))
        r = random.Random(seed)
        ops = [(n, r.uniform(0.7, 1.3)) for n in ("brightness", "contrast", "saturation")]
        r.shuffle(ops)
        x = img.float()
        for name, f in ops:
            g = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            x = x * f if name == "brightness" else ((x - g.mean()) * f + g.mean() if name == "contrast" else (x - g) * f + g)
        assert torch.allclose(out, x.clamp(0, 255), atol=1e-3)


def test_resize_pad_moves_boxes_with_masks():
    _, meta = generate_scene(5, 2, image_size=96)
    target = build_target(meta, meta["queries"], image_height=96, image_width=96)
    image = torch.zeros(3, 96, 96, dtype=torch.uint8)
    out, t = ResizePad(size=128, min_size=48, step=16, random_offset=True)(image, target, random.Random(1))
    assert out.shape == (3, 128, 128)
    for box, mask in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (box - tight).abs().max() <= 2.0  # nearest-neighbour mask vs exact box scaling


def test_make_shards_command_line(tmp_path, capsys):
    (tmp_path / "pool" / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "pool" / "a.jpg")
    Image.new("L", (8, 8), 9).save(tmp_path / "pool" / "sub" / "b.v2.png")
    (tmp_path / "vocab.txt").write_text("# pool phrases\nred star\nblue circle  # comment\n\nred star\n")
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    code = make_shards.main(["images", "--images", str(tmp_path / "pool"), "--vocabulary", str(tmp_path / "vocab.txt"),
                             "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("images-000000.tar")
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "out" / "images-000000.tar"), shardshuffle=False, nodesplitter=None))
    assert [s["__key__"] for s in samples] == ["00000000_a", "00000001_b_v2"]
    meta = json.loads(samples[1]["json"])
    assert (meta["width"], meta["height"]) == (8, 8)
    assert [(q["phrase"], q["exhaustive"], q["instances"]) for q in meta["queries"]] == [
        ("red star", False, []), ("blue circle", False, [])]
