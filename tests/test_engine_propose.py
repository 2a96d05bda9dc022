"""Data engine, in process: the propose step's candidates (parity with post-processing, flip TTA
plumbing, exact records, proposals files and their damage), phrase sources, the labelled / pool
split, weighted training mixes, settings."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SHAPES_SPLITS, png_bytes, write_shards

from sam3_train.data.batch import Batch
from sam3_train.data.pipeline import ShardStream
from sam3_train.data.shards import ShardSink, expand_urls
from sam3_train.engine.candidates import candidate_record, record_candidates
from sam3_train.engine.proposal_files import ProposalFileWriter, ProposalIndex, complete_records, proposals_file
from sam3_train.engine.proposals import PhraseSelector, ProposalWriter, batch_candidates, flip_batch
from sam3_train.engine.settings import DataEngine, load_config, round_fit_config
from sam3_train.engine.sources import (
    labelled_set_phrases,
    read_samples,
    read_vocabulary,
    split_labelled_pool,
    weighted_shards,
)
from sam3_train.engine.verifiers import FlipConsistencyVerifier, ScoreVerifier
from sam3_train.model import build_detector
from sam3_train.model.postprocess import postprocess

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
REPO = Path(__file__).resolve().parents[1]
ENGINE_CONFIGS = [REPO / "configs" / "shapes_tiny.yaml", REPO / "configs" / "engine" / "shapes.yaml"]


# ------------------------------------------------------------------------------------------ candidates
def test_candidates_match_postprocess_detections(shapes_batch):
    """Scores, order, pixel boxes and the logit-0 masks of every pair equal model.postprocess's."""
    torch.manual_seed(0)
    detector = build_detector("tiny", image_size=224).eval()
    batch = shapes_batch
    with torch.no_grad():
        outputs = detector(batch)
    pairs = batch_candidates(outputs, batch, min_score=0.0, max_detections=5, stability_offset=1.0)
    reference = postprocess(outputs, batch, original_sizes=batch.original_sizes, score_threshold=0.0, max_detections=5)
    assert len(pairs) == batch.num_pairs
    for p, ((c, dropped), ref) in enumerate(zip(pairs, reference)):
        h, w = batch.original_sizes[int(batch.pair_image[p])].tolist()
        assert (c.key, c.phrase, c.height, c.width) == (batch.keys[int(batch.pair_image[p])], batch.phrases[p], h, w)
        assert dropped == detector.num_queries - 5  # every query scores >= 0
        assert torch.equal(c.scores, ref["scores"]) and c.presence == pytest.approx(float(ref["presence"]))
        assert torch.allclose(c.boxes, ref["boxes"], atol=1e-4)
        assert torch.equal(c.masks, ref["masks"])
        assert bool((c.masks_tight <= c.masks).all() and (c.masks <= c.masks_loose).all())
        assert c.flip_masks is None


def _fake_outputs(batch: Batch, side: int) -> dict:
    """Outputs whose masks are a function of the pixels (channel 0 at input resolution): a flipped
    input gives flipped masks, so flip TTA plumbing must map them back exactly."""
    num_pairs, q = batch.num_pairs, 3
    pixels = batch.images[batch.pair_image, 0]  # [P, S, S]
    masks = torch.stack([pixels - t for t in (-0.5, 0.0, 0.5)], 1)  # [P, Q, S, S]
    return {"pred_logits": torch.zeros(num_pairs, q), "presence_logit": torch.zeros(num_pairs),
            "pred_boxes": torch.tensor([0.3, 0.4, 0.2, 0.2]).repeat(num_pairs, q, 1), "pred_masks": masks}


def test_flip_tta_maps_flip_masks_back_onto_the_image_content():
    side = 32
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, side, side, generator=gen) * 2 - 1
    sizes = torch.tensor([[32, 24], [20, 32]])  # content (h, w): padding on the right / at the bottom
    images[0, :, :, 24:] = 0.0
    images[1, :, 20:, :] = 0.0
    batch = Batch(images=images, image_sizes=sizes, pair_image=torch.tensor([0, 1, 1]),
                  input_ids=torch.zeros(3, 32, dtype=torch.long), attention_mask=torch.ones(3, 32, dtype=torch.long),
                  exemplar_boxes=torch.tensor([[[0.25, 0.5, 0.1, 0.1]], [[0.0, 0.0, 0.0, 0.0]], [[0.5, 0.25, 0.2, 0.1]]]),
                  exemplar_labels=torch.tensor([[1], [-1], [0]]), phrases=["left cup", "dog", "right dog"],
                  keys=["a", "b"], original_sizes=torch.tensor([[64, 48], [40, 64]]))
    flipped = flip_batch(batch, batch.input_ids, batch.attention_mask)
    assert torch.equal(flipped.images[0, :, :, :24], images[0, :, :, :24].flip(-1))
    assert torch.equal(flipped.images[0, :, :, 24:], images[0, :, :, 24:])  # padding stays where it is
    assert torch.equal(flipped.images[1, :, :20], images[1, :, :20].flip(-1))
    assert torch.allclose(flipped.exemplar_boxes[:, 0, 0], torch.tensor([24 / 32 - 0.25, 1.0, 1.0 - 0.5]))
    assert torch.equal(batch.images, images)  # the batch itself is untouched
    pairs = batch_candidates(_fake_outputs(batch, side), batch, flip_outputs=_fake_outputs(flipped, side),
                             min_score=0.0, max_detections=3)
    verify = FlipConsistencyVerifier(min_iou=0.999)
    for c, _ in pairs:
        assert c.flip_masks is not None and c.masks.any()
        assert torch.equal(c.flip_masks, c.masks), c.phrase
        assert bool(verify(c).keep.all())


def test_candidate_records_round_trip_exactly_through_a_proposals_file(shapes_batch, tmp_path):
    torch.manual_seed(0)
    detector = build_detector("tiny", image_size=224).eval()
    with torch.no_grad():
        outputs = detector(shapes_batch)
    pairs = batch_candidates(outputs, shapes_batch, flip_outputs=outputs, min_score=0.1, max_detections=4)
    records = {}
    for c, dropped in pairs:
        record = records.setdefault(c.key, {"key": c.key, "height": c.height, "width": c.width, "pairs": []})
        record["pairs"].append(candidate_record(c, dropped))
    path = tmp_path / "proposals.jsonl.gz"
    with ProposalFileWriter(path) as out:
        for record in records.values():
            out.write(record)
    index = ProposalIndex(path)
    assert list(index) == list(records)  # file order
    with gzip.open(path, "rt") as f:  # one gzip file to any reader: JSON lines, the records as written
        assert [json.loads(line) for line in f] == [json.loads(json.dumps(r)) for r in records.values()]
    back = [pair for key in index for pair in record_candidates(index.get(key), source=str(path))]
    assert len(back) == len(pairs) == shapes_batch.num_pairs
    for (c, dropped), (b, b_dropped) in zip(pairs, back):
        assert b_dropped == dropped and (b.key, b.phrase, b.presence) == (c.key, c.phrase, c.presence)
        for name in ("scores", "boxes", "masks", "masks_loose", "masks_tight", "flip_masks"):
            assert torch.equal(getattr(b, name), getattr(c, name)), name
        assert candidate_record(b, b_dropped) == candidate_record(c, dropped)  # every RLE, score and box
    # The same records written again give the same bytes (members carry no time stamp).
    with ProposalFileWriter(tmp_path / "again.jsonl.gz") as out:
        for record in records.values():
            out.write(record)
    assert (tmp_path / "again.jsonl.gz").read_bytes() == path.read_bytes()


def _small_proposals(folder: Path, n: int = 3) -> list[dict]:
    """n image records of hand-made candidates in ``folder/proposals.jsonl.gz``."""
    from conftest import EngineFrame

    frame = EngineFrame(12, 16)
    records = []
    for i in range(n):
        c = frame.candidate([0.9, 0.3], [frame.box_mask(1, 1, 5 + i, 6), frame.box_mask(8, 2, 12, 9)],
                            key=f"{i:08d}_img")
        records.append({"key": c.key, "height": 12, "width": 16, "pairs": [candidate_record(c)]})
    folder.mkdir(parents=True, exist_ok=True)
    with ProposalFileWriter(folder / "proposals.jsonl.gz") as out:
        for record in records:
            out.write(record)
    return records


def test_damaged_proposals_files_fail_naming_the_file(tmp_path):
    folder = tmp_path / "round-001" / "proposals-rank000"
    records = _small_proposals(folder)
    path = proposals_file(folder)
    data = path.read_bytes()
    assert [ProposalIndex(path).get(r["key"]) for r in records] == json.loads(json.dumps(records))
    marker = str(tmp_path / "round-001" / "proposals.json")
    path.write_bytes(data[:-7])  # cut inside the last image's member
    with pytest.raises(ValueError, match="truncated") as error:
        ProposalIndex(path)
    assert str(path) in str(error.value) and marker in str(error.value)  # the file, and what to do
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF  # one damaged byte: the deflate stream or its CRC fails
    path.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ProposalIndex(path)
    path.write_bytes(data + b"\x00" * 10)  # trailing garbage is not a member
    with pytest.raises(ValueError, match="corrupt"):
        ProposalIndex(path)
    # The earlier plain JSON lines still read; a folder without either file fails naming the folder.
    path.unlink()
    (folder / "proposals.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    legacy = ProposalIndex(proposals_file(folder))
    assert [legacy.get(r["key"]) for r in records] == json.loads(json.dumps(records))
    (folder / "proposals.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        proposals_file(folder)


def test_a_killed_ranks_file_keeps_its_whole_records_and_goes_on_after_them(tmp_path):
    folder = tmp_path / "round-001" / "proposals-rank000"
    records = json.loads(json.dumps(_small_proposals(folder)))
    path = proposals_file(folder)
    data = path.read_bytes()
    ends = [end for end, _ in complete_records(path)]
    assert [r for _, r in complete_records(path)] == records and ends[-1] == len(data)
    # Killed inside the last image's write: the whole ones stay, the rest is cut and written again.
    path.write_bytes(data[:-7])
    assert [r for _, r in complete_records(path)] == records[:-1]
    with ProposalFileWriter(path, append_at=ends[-2]) as out:
        out.write(records[-1])
    assert path.read_bytes() == data  # the bytes of the uninterrupted file
    # Damage in the middle (a flipped byte) ends the whole records there; an empty file has none.
    broken = bytearray(data)
    broken[(ends[0] + ends[1]) // 2] ^= 0xFF  # inside the second member's deflate stream
    path.write_bytes(bytes(broken))
    assert [r for _, r in complete_records(path)] == records[:1]
    path.write_bytes(b"")
    assert list(complete_records(path)) == []


def test_a_stream_passes_over_excluded_keys_without_decoding_them(tmp_path, shapes_root):
    urls = sorted(str(p) for p in (Path(shapes_root) / "shards" / "val").glob("*.tar"))
    stream = lambda **kw: ShardStream(urls=urls, batch_size=4, transforms=lambda i, t, r: (i, t),  # noqa: E731
                                      collate=lambda items: [t["key"] for _, t in items], **kw)
    every = [k for batch in stream() for k in batch]
    resumed = stream(exclude_keys=every[:5])
    left = [k for batch in resumed for k in batch]
    assert len(every) == 16 and left == every[5:] and resumed.skip_counter.value == 0  # not counted as bad


def test_a_proposing_rank_resumes_only_what_it_was_started_for(tmp_path):
    """ProposalWriter.setup on folders a killed run left, with a stand-in trainer (rank, world size, the
    data module's shards and batching): a match resumes, a finished rank is read past whole, anything
    else starts afresh."""
    records = json.loads(json.dumps(_small_proposals(tmp_path / "made")))
    made = (tmp_path / "made" / "proposals.jsonl.gz").read_bytes()

    def setup(*, rank=0, world=2, urls=("a.tar", "c.tar"), batch_size=4, inputs=None):
        data = SimpleNamespace(rank_urls=list(urls), batch_size=batch_size, num_workers=1, exclude_keys=None)
        trainer = SimpleNamespace(global_rank=rank, world_size=world, datamodule=data)
        writer = ProposalWriter(round_dir=tmp_path / "round", inputs=inputs or {"checkpoint": "r0"})
        writer.setup(trainer, SimpleNamespace(predict_step=lambda batch, batch_idx: None), "predict")
        writer._file.close()
        return writer, data

    writer, data = setup()  # nothing there: a fresh folder with its start.json
    assert data.exclude_keys == frozenset() and writer.tmp.name == "proposals-rank000.tmp"
    assert json.loads((writer.tmp / "start.json").read_text())["urls"] == ["a.tar", "c.tar"]
    (writer.tmp / "proposals.jsonl.gz").write_bytes(made[:-7])  # killed inside the third record
    writer, data = setup()
    assert data.exclude_keys == {r["key"] for r in records[:2]} and writer.counts["images"] == 2
    assert writer.counts["candidates"] == 4 and writer.counts["pairs"] == 2
    assert [r for _, r in complete_records(writer.tmp / "proposals.jsonl.gz")] == records[:2]  # the cut tail gone
    # Another batch size, checkpoint or world size: started afresh, nothing read past.
    for changed in ({"batch_size": 8}, {"inputs": {"checkpoint": "other"}}, {"world": 3}):
        (writer.tmp / "proposals.jsonl.gz").write_bytes(made)
        writer, data = setup(**changed)
        assert data.exclude_keys == frozenset() and (writer.tmp / "proposals.jsonl.gz").read_bytes() == b""
    # A rank that finished (renamed into place) before another rank was killed: read past whole.
    writer, _ = setup()
    (writer.tmp / "proposals.jsonl.gz").write_bytes(made)
    writer.tmp.rename(writer.final)
    writer, data = setup()
    assert data.exclude_keys == {r["key"] for r in records} and not writer.final.exists() and writer.tmp.is_dir()
    # ... unless it was started for something else: then it is removed and the rank starts afresh.
    writer.tmp.rename(writer.final)
    writer, data = setup(urls=("b.tar",))
    assert data.exclude_keys == frozenset() and not writer.final.exists()


def test_phrase_selector_asks_the_source_phrases_without_instances():
    queries = [{"phrase": "star", "exhaustive": True, "instances": [{"box": [0, 0, 1, 1], "rle": {}}]},
               {"phrase": "cup", "exhaustive": True, "instances": [], "exemplars": [{"box": [1, 1, 2, 2]}]},
               {"phrase": "star", "exhaustive": False, "instances": []}]
    own = PhraseSelector()(queries, random.Random(0))
    assert own == [{"phrase": "star", "exhaustive": False, "instances": [], "exemplars": []},
                   {"phrase": "cup", "exhaustive": False, "instances": [], "exemplars": [{"box": [1, 1, 2, 2]}]}]
    vocabulary = PhraseSelector(["red star", "cup", "red star"])(queries, random.Random(0))
    assert [q["phrase"] for q in vocabulary] == ["red star", "cup"]
    assert all(q == {"phrase": q["phrase"], "exhaustive": False, "instances": [], "exemplars": []} for q in vocabulary)


# ------------------------------------------------------------------------------------------ sources
def test_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("red star\n\n# a comment\nblue cup  # trailing comment\nred star\n")
    assert read_vocabulary(path) == ["red star", "blue cup"]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.txt")):
        read_vocabulary(tmp_path / "missing.txt")


def test_split_labelled_pool_partitions_every_image_once(shapes_root, tmp_path):
    urls = sorted(str(p) for p in (Path(shapes_root) / "shards" / "train").glob("*.tar"))
    source = {key: (data, meta) for key, data, _, meta in read_samples(urls, strict=False)}
    split = split_labelled_pool(urls=urls, out_dir=tmp_path / "split", fraction=0.25, seed=3, num_shards=4)
    labelled = {k: (d, m) for k, d, _, m in read_samples(expand_urls(split["patterns"]["labelled"]), strict=False)}
    pool = {k: (d, m) for k, d, _, m in read_samples(expand_urls(split["patterns"]["pool"]), strict=False)}
    assert len(labelled) == round(0.25 * SHAPES_SPLITS["train"]) and not set(labelled) & set(pool)
    assert set(labelled) | set(pool) == set(source)
    assert split["counts"] == {"labelled": 16, "pool": 48, "skipped": 0}
    assert len(expand_urls(split["patterns"]["pool"])) == 4 and len(expand_urls(split["patterns"]["labelled"])) == 4
    for key, (data, meta) in labelled.items():
        assert (data, meta) == source[key]  # labels kept as they were
    assert labelled_set_phrases(expand_urls(split["patterns"]["labelled"])) == sorted(
        {q["phrase"] for _, meta in labelled.values() for q in meta["queries"]})
    for key, (data, meta) in pool.items():
        original = source[key][1]
        assert data == source[key][0] and meta["width"] == original["width"]
        assert [q["phrase"] for q in meta["queries"]] == list(dict.fromkeys(q["phrase"] for q in original["queries"]))
        assert all(q["exhaustive"] is False and q["instances"] == [] for q in meta["queries"])
    # Idempotent; the same seed elsewhere gives the same bytes; other settings refuse the folder.
    assert split_labelled_pool(urls=urls, out_dir=tmp_path / "split", fraction=0.25, seed=3, num_shards=4) == split
    again = split_labelled_pool(urls=urls, out_dir=tmp_path / "again", fraction=0.25, seed=3, num_shards=4)
    for a, b in zip(expand_urls(split["patterns"]["pool"]), expand_urls(again["patterns"]["pool"])):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        split_labelled_pool(urls=urls, out_dir=tmp_path / "split", fraction=0.5, seed=3, num_shards=4)


def _shards(folder: Path, prefix: str, counts: list[int], image: bytes) -> list[str]:
    """One shard per count, of that many blank samples."""
    blank = {"width": 2, "height": 2, "queries": []}
    return [url for s, n in enumerate(counts)
            for url in write_shards(folder, f"{prefix}{s}", {f"{prefix}{s}_{i:04d}": blank for i in range(n)}, image)]


def test_weighted_shards_give_each_source_its_share(tmp_path):
    image = png_bytes(2, 2)
    labelled = _shards(tmp_path, "lab", [3, 3], image)  # 6 samples
    pseudo = _shards(tmp_path, "pse", [10, 10, 10], image)  # 30 samples
    joined, info = weighted_shards({"labelled": (labelled, 1.0), "pseudo": (pseudo, 1.0)})
    assert {k: (v["repeats"], v["samples"], v["share"]) for k, v in info.items()} == {
        "labelled": (5, 6, 0.5), "pseudo": (1, 30, 0.5)}
    assert expand_urls(joined) == labelled * 5 + pseudo  # what Sam3DataModule sees: duplicates kept
    _, info = weighted_shards({"labelled": (labelled, 1.0), "pseudo": (pseudo, 3.0)})
    assert {k: (v["repeats"], v["share"]) for k, v in info.items()} == {"labelled": (5, 0.25), "pseudo": (3, 0.75)}
    _, info = weighted_shards({"labelled": (labelled, 1.0), "pseudo": (pseudo, 0.0)})
    assert list(info) == ["labelled"]
    with pytest.raises(ValueError, match="'pseudo'"):
        weighted_shards({"labelled": (labelled, 1.0), "pseudo": (_shards(tmp_path, "empty", [0], image)[:0], 1.0)})
    # The resampled training stream draws from the list uniformly: half its samples are labelled ones.
    joined, _ = weighted_shards({"labelled": (labelled, 1.0), "pseudo": (pseudo, 1.0)})
    stream = ShardStream(urls=expand_urls(joined), batch_size=1, transforms=lambda i, t, r: (i, t),
                         collate=lambda items: items[0][1]["key"], resampled=True, steps_per_epoch=3000)
    keys = list(stream)
    assert len(keys) == 3000 and abs(sum(k.startswith("lab") for k in keys) / 3000 - 0.5) < 0.05


# ------------------------------------------------------------------------------------------ settings
def test_engine_config_loads_with_overrides_and_round_configs_write_under_the_round(tmp_path):
    cfg, settings = load_config(ENGINE_CONFIGS, ["trainer.max_steps=7", "engine.rounds=3", "engine.work_dir=/tmp/w"])
    assert cfg["trainer"]["max_steps"] == 7 and (settings.rounds, settings.work_dir) == (3, "/tmp/w")
    assert settings.labelled_fraction == 0.1 and [v.name for v in settings.verifiers] == [
        "score", "stability", "flip", "exhaustivity"]
    assert settings.thresholds()["verifiers"]["score"] == {"min_score": 0.5}
    fit = round_fit_config(cfg, round_dir=tmp_path / "round-001", train_shards="a.tar::b.tar", name="x-round-001")
    out = str(tmp_path / "round-001" / "fit")
    assert fit["trainer"]["default_root_dir"] == out and fit["data"]["train_shards"] == "a.tar::b.tar"
    assert [lg["init_args"]["save_dir"] for lg in fit["trainer"]["logger"]] == [out, out]
    assert fit["trainer"]["logger"][0]["init_args"]["name"] == "x-round-001"
    assert fit["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"{out}/checkpoints"
    assert cfg["trainer"]["default_root_dir"] == "runs/shapes_tiny"  # the original is not touched
    with pytest.raises(Exception, match="roundz"):
        load_config(ENGINE_CONFIGS, ["engine.roundz=1"])


def test_settings_refuse_contradictions():
    with pytest.raises(ValueError, match="fire_low"):
        DataEngine(min_score=0.2)
    with pytest.raises(ValueError, match="flip_tta"):
        DataEngine(flip_tta=False, verifiers=[ScoreVerifier(), FlipConsistencyVerifier()])
    with pytest.raises(ValueError, match="not both"):
        DataEngine(labelled_fraction=0.1, pool="x.tar")
    assert [v.name for v in DataEngine(flip_tta=False).verifiers] == ["score", "stability", "exhaustivity"]


# ------------------------------------------------------------------------------------------ propose + write
@pytest.fixture(scope="module")
def tiny_lightning_checkpoint(tmp_path_factory) -> Path:
    """A Sam3LitModule checkpoint (random tiny weights at 112 px), as Lightning writes it."""
    import lightning as L

    from sam3_train.lit import Sam3LitModule

    torch.manual_seed(0)
    module = Sam3LitModule(preset="tiny", image_size=112)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_corrupt_pool_images_are_skipped_counted_and_never_written(tmp_path, shapes_root, tiny_lightning_checkpoint):
    import lightning as L

    from sam3_train.engine.proposals import ProposalWriter, ProposeData, ProposeModule
    from sam3_train.engine.pseudo_labels import write_rank
    from sam3_train.engine.verifiers import ExhaustivityVerifier, HardNegativeMiner, VerifierChain

    val = sorted(str(p) for p in (Path(shapes_root) / "shards" / "val").glob("*.tar"))
    samples = list(read_samples(val, strict=False))[:5]
    with ShardSink(out_dir=tmp_path / "pool", prefix="pool", max_count=3) as sink:
        for i, (key, data, ext, meta) in enumerate(samples):
            sink.write(key, data[:200] if i == 1 else data, ext, meta)  # image 1: a truncated JPEG
    module = ProposeModule(checkpoint=str(tiny_lightning_checkpoint), min_score=0.0, max_detections=2)
    data = ProposeData(pool=sink.pattern, phrases=["circle", "left square"], image_size=module.image_size,
                       batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[ProposalWriter(round_dir=tmp_path / "round")])
    trainer.predict(module, datamodule=data, return_predictions=False)
    summary = json.loads((tmp_path / "round" / "proposals-rank000" / "summary.json").read_text())
    assert summary["counts"] == {"images": 4, "pairs": 8, "candidates": 16, "truncated_pairs": 8, "skipped": 1}
    assert summary["urls"] == expand_urls(sink.pattern)
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.0), FlipConsistencyVerifier(min_iou=0.0),
                                     ExhaustivityVerifier(low=0.1, high=0.2)])
    written = write_rank(round_dir=tmp_path / "round", proposer=0, chain=chain, miner=HardNegativeMiner(),
                         max_count=10, progress=False)
    assert written["counts"]["samples"] == 4 and written["counts"]["unproposed"] == 1
    counts = written["counts"]  # every candidate kept: written, unless its logit-0 mask is empty
    assert counts["instances"] + counts["empty_masks"] == 16 and counts["truncated_pairs"] == 8
    shards = sorted(str(p) for p in (tmp_path / "round" / "shards-rank000").glob("*.tar"))
    keys = [k for k, *_ in read_samples(shards, strict=False)]
    assert keys == [s[0] for i, s in enumerate(samples) if i != 1]


def test_bad_paths_fail_before_any_round_naming_them(tmp_path):
    from sam3_train.engine.rounds import Engine

    cfg, settings = load_config(ENGINE_CONFIGS, [
        "engine.labelled_fraction=null", f"engine.labelled={tmp_path}/lab-000000.tar",
        f"engine.pool={tmp_path}/missing/pool-{{000000..000003}}.tar", f"engine.work_dir={tmp_path}/w"])
    (tmp_path / "lab-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"DataEngine.pool: .*missing"):
        Engine(cfg=cfg, settings=settings, configs=["x.yaml"]).prepare()
    cfg, settings = load_config(ENGINE_CONFIGS, [
        "engine.labelled_fraction=null", f"engine.labelled={tmp_path}/lab-000000.tar",
        f"engine.checkpoint={tmp_path}/none.ckpt", f"engine.work_dir={tmp_path}/w"])
    with pytest.raises(FileNotFoundError, match="none.ckpt"):
        Engine(cfg=cfg, settings=settings, configs=["x.yaml"]).prepare()
