"""Data engine writing: verified candidates -> shards + manifest, read back through ShardStream;
interrupted writes leave nothing visible and the re-run is byte-identical; the write stage from
proposals files decodes only the masks a check reads, with the same bytes as decoding all of them."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_shards
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.data.pipeline import ShardStream
from sam3_train.engine import (
    Candidate,
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    HardNegativeMiner,
    RoundWriter,
    ScoreVerifier,
    StabilityVerifier,
    VerifierChain,
    clean_unfinished,
    finalize_round,
    read_manifest,
    read_samples,
    round_finished,
    shard_paths,
)
from sam3_train.engine import pseudo_labels
from sam3_train.engine.candidates import candidate_record, record_candidates
from sam3_train.engine.proposal_files import ProposalFileWriter
from sam3_train.engine.pseudo_labels import score_gate, write_rank

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
H, W = 20, 24
PHRASES = ["circle", "red square", "star"]


def make_pool(n: int = 5) -> list[dict]:
    """n images, each with three phrases of hand-made candidates (seeded random blobs)."""
    gen = torch.Generator().manual_seed(0)
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.5),
                                     ExhaustivityVerifier(low=0.2, high=0.6)])
    miner = HardNegativeMiner(fire_low=0.05, fire_high=0.5, max_presence=0.3)
    pool = []
    for i in range(n):
        key = f"{i:08d}_img"
        buf = io.BytesIO()
        Image.fromarray((torch.rand(H, W, 3, generator=gen) * 255).byte().numpy()).save(buf, format="PNG")
        pairs = []
        for j, phrase in enumerate(PHRASES):
            k = (i + j) % 3 + (phrase == "star")  # 0..3 instances, "star" a weak fire on even images
            scores, presence = torch.rand(k, generator=gen) * 0.5 + 0.5, 0.9
            if phrase == "star" and i % 2 == 0:
                k, scores, presence = 1, torch.tensor([0.3]), 0.1
            masks = torch.rand(k, H, W, generator=gen) > 0.7
            boxes = torch.tensor([[1.0, 2.0, 18.5, 19.25]]).repeat(k, 1)
            c = Candidate(key=key, phrase=phrase, height=H, width=W, presence=presence,
                          scores=scores.sort(descending=True).values, boxes=boxes, masks=masks,
                          masks_loose=masks, masks_tight=masks & (torch.rand(k, H, W, generator=gen) > 0.2))
            pairs.append(chain(c))
        base = {"image_id": i, "width": W, "height": H, "source": {"dataset": "pool", "index": i},
                "queries": [{"phrase": p, "exhaustive": False, "instances": []} for p in PHRASES]}
        pool.append({"key": key, "image": buf.getvalue(), "base": base, "pairs": pairs, "negatives": miner(pairs)})
    return pool, chain, miner


def write_round(round_dir: Path, pool: list[dict], checkpoint: Path, chain, miner, *, fail_after: int | None = None):
    with RoundWriter(round_dir=round_dir, rank=0, max_count=2) as writer:
        for n, item in enumerate(pool):
            if fail_after is not None and n == fail_after:
                raise KeyboardInterrupt  # the process is killed mid-round
            writer.write(key=item["key"], image=item["image"], image_ext="png", base_meta=item["base"],
                         pairs=item["pairs"], negatives=item["negatives"])
    return finalize_round(round_dir, world_size=1, inputs={"pool": "pool-{000000..000001}.tar", "phrases": PHRASES},
                          checkpoint=checkpoint, thresholds={"verifiers": chain.thresholds(), "negatives": miner.params()})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    checkpoint = root / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    pool, chain, miner = make_pool()
    manifest = write_round(root / "round1", pool, checkpoint, chain, miner)
    return {"root": root, "dir": root / "round1", "pool": pool, "chain": chain, "miner": miner,
            "checkpoint": checkpoint, "manifest": manifest}


def test_shards_read_back_equal_the_verified_candidates(written):
    pool, manifest = written["pool"], written["manifest"]
    assert round_finished(written["dir"], check_hashes=True)
    urls = shard_paths(written["dir"], manifest)
    assert len(urls) == 3  # 5 samples, 2 per shard
    stream = ShardStream(urls=urls, batch_size=1, transforms=lambda image, target, rng: (image, target),
                         collate=lambda items: items[0])
    read = {target["key"]: (image, target) for image, target in stream}
    assert sorted(read) == [p["key"] for p in pool] and stream.skip_counter.value == 0
    for item in pool:
        image, target = read[item["key"]]
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(io.BytesIO(item["image"])))))
        masks = target["masks"].resized(H, W).bool()  # [N, H, W] at the original size: no resampling
        by_phrase = {q["phrase"]: q for q in target["queries"]}
        assert sorted(by_phrase) == PHRASES
        for v in item["pairs"]:
            q = by_phrase[v.candidate.phrase]
            expected = v.candidate.masks[v.keep]
            if v.candidate.phrase in item["negatives"]:
                assert q["exhaustive"] and not q["instances"] and not v.keep.any()
                continue
            assert q["exhaustive"] == v.exhaustive
            assert torch.equal(masks[q["instances"]], expected)  # bit-exact masks
            # The written box is the mask's tight box (whole pixels), not the model's [1, 2, 18.5, 19.25].
            tight = torchvision.ops.masks_to_boxes(expected) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            assert torch.equal(target["boxes"][q["instances"]], tight)
    raw = {key: meta for key, _, ext, meta in read_samples(urls)}  # the round's metas, for review import
    assert sorted(raw) == sorted(read) and all(m["source"] == {"dataset": "pool", "index": m["image_id"]} for m in raw.values())
    counts = manifest["counts"]
    kept = sum(int(v.keep.sum()) for item in pool for v in item["pairs"])
    total = sum(v.candidate.num_instances for item in pool for v in item["pairs"])
    assert counts["instances"] == kept and counts["samples"] == len(pool) and counts["pairs"] == 3 * len(pool)
    assert sum(counts["rejected"].values()) + kept == total
    assert counts["negatives_mined"] == sum(len(p["negatives"]) for p in pool) == 3  # "star" on images 0, 2, 4
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert manifest["thresholds"]["verifiers"]["score"] == {"min_score": 0.5} and manifest["metrics"] == {}


def test_interrupted_write_leaves_nothing_visible_and_rerun_is_byte_identical(written):
    root, pool = written["root"], written["pool"]
    again = root / "round1_again"
    with pytest.raises(KeyboardInterrupt):
        write_round(again, pool, written["checkpoint"], written["chain"], written["miner"], fail_after=3)
    assert not round_finished(again) and read_manifest(again) is None
    visible = [p for p in again.rglob("*.tar") if not any(part.endswith(".tmp") for part in p.parts)]
    assert visible == [] and not (again / "shards-rank000").exists()
    assert list(again.glob("*.tmp"))  # the partial write is there, under its temporary name
    assert clean_unfinished(again) == ["shards-rank000.tmp"]
    write_round(again, pool, written["checkpoint"], written["chain"], written["miner"])
    assert round_finished(again)
    assert clean_unfinished(again) == []  # a finished round is left alone
    first = sorted(p.relative_to(written["dir"]) for p in written["dir"].rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second and len(first) == 5  # 3 shards, summary, manifest
    for rel in first:
        assert (written["dir"] / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_round_killed_before_the_manifest_is_unfinished_and_a_damaged_shard_is_detected(written, tmp_path):
    pool = written["pool"][:2]
    with RoundWriter(round_dir=tmp_path / "r", max_count=2) as writer:
        for item in pool:
            writer.write(key=item["key"], image=item["image"], image_ext="png", base_meta=item["base"],
                         pairs=item["pairs"], negatives=item["negatives"])
    assert (tmp_path / "r" / "shards-rank000").is_dir() and not round_finished(tmp_path / "r")  # no manifest yet
    with pytest.raises(FileNotFoundError, match="rank 1"):
        finalize_round(tmp_path / "r", world_size=2, inputs={}, checkpoint=written["checkpoint"], thresholds={})
    finalize_round(tmp_path / "r", world_size=1, inputs={}, checkpoint=written["checkpoint"], thresholds={})
    assert round_finished(tmp_path / "r")
    shard = tmp_path / "r" / "shards-rank000" / "pseudo-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 1  # same size, one flipped bit: only the hash sees it
    shard.write_bytes(bytes(data))
    assert round_finished(tmp_path / "r") and not round_finished(tmp_path / "r", check_hashes=True)
    shard.write_bytes(bytes(data[:-512]))
    assert not round_finished(tmp_path / "r")
    assert "shards-rank000" in clean_unfinished(tmp_path / "r") and not (tmp_path / "r" / "manifest.json").exists()


def test_writer_refuses_pairs_of_another_image_and_negatives_with_instances(written, tmp_path):
    a, b = written["pool"][0], written["pool"][1]
    writer = RoundWriter(round_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="belongs to"):
        writer.write(key=a["key"], image=a["image"], image_ext="png", base_meta=a["base"], pairs=b["pairs"])
    kept = next(v for v in a["pairs"] if v.keep.any())
    with pytest.raises(ValueError, match="mined negative"):
        writer.write(key=a["key"], image=a["image"], image_ext="png", base_meta=a["base"], pairs=a["pairs"],
                     negatives=[kept.candidate.phrase])
    writer.abort()
    assert json.loads(json.dumps(written["manifest"])) == read_manifest(written["dir"])


# ------------------------------------------------------------------------------------------ from proposals files
def flip_pool(n: int = 4) -> list[dict]:
    """n images x three phrases of candidates with flip masks, scores on both sides of 0.5, and masks
    that the stability check (image 1's loose masks) and the flip check (phrase "star") reject."""
    gen = torch.Generator().manual_seed(1)
    image = io.BytesIO()
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(image, format="PNG")
    pool = []
    for i in range(n):
        key, candidates = f"{i:08d}_img", []
        for j, phrase in enumerate(PHRASES):
            k = (i + j) % 4 + 1
            masks = torch.rand(k, H, W, generator=gen) > 0.6
            noise = torch.rand(k, H, W, generator=gen) > (0.6 if phrase == "star" else 0.9)
            candidates.append(Candidate(
                key=key, phrase=phrase, height=H, width=W, presence=0.2 + 0.2 * j,
                scores=torch.tensor([0.9, 0.7, 0.4, 0.2][:k]),
                boxes=torch.tensor([[1.0, 2.0, 18.5, 19.25]]).repeat(k, 1),
                masks=masks, masks_loose=masks | (torch.rand(k, H, W, generator=gen) > (0.4 if i == 1 else 0.8)),
                masks_tight=masks & (torch.rand(k, H, W, generator=gen) > 0.2), flip_masks=masks ^ noise))
        base = {"image_id": i, "width": W, "height": H, "source": {"dataset": "pool", "index": i},
                "queries": [{"phrase": p, "exhaustive": False, "instances": []} for p in PHRASES]}
        pool.append({"key": key, "image": image.getvalue(), "base": base, "candidates": candidates})
    return pool


def write_proposals(round_dir: Path, pool: list[dict], *, legacy: bool = False) -> None:
    """The pool's candidates as the propose step leaves them: ``proposals-rank000/`` with the records
    (this format, or the earlier plain JSON lines) and the pool shard it read."""
    folder = round_dir / "proposals-rank000"
    folder.mkdir(parents=True)
    urls = write_shards(round_dir / "pool", "pool", {item["key"]: item["base"] for item in pool}, pool[0]["image"])
    records = [{"key": item["key"], "height": H, "width": W,  # image 1's first pair was truncated
                "pairs": [candidate_record(c, dropped=int(i == 1 and j == 0))
                          for j, c in enumerate(item["candidates"])]} for i, item in enumerate(pool)]
    if legacy:
        (folder / "proposals.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    else:
        with ProposalFileWriter(folder / "proposals.jsonl.gz") as out:
            for record in records:
                out.write(record)
    (folder / "summary.json").write_text(json.dumps({"rank": 0, "urls": urls}))


def flip_chain() -> VerifierChain:
    return VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.55),
                                    FlipConsistencyVerifier(min_iou=0.7), ExhaustivityVerifier(low=0.3, high=0.6)])


def read_eagerly(monkeypatch) -> None:
    """The write stage as it was: every mask stack of every candidate decoded when its record is read."""
    def decode_all(record, **kwargs):
        pairs = record_candidates(record, **kwargs)
        for c, _ in pairs:
            c.decode()
        return pairs

    monkeypatch.setattr(pseudo_labels, "record_candidates", decode_all)
    monkeypatch.setattr(pseudo_labels, "score_gate", lambda chain: None)


def count_decoded(monkeypatch) -> list[int]:
    """Patches the RLE decoder to record how many masks each call decodes."""
    decoded, decode_many = [], rle_ops.decode_many

    def counting(rles, height, width):
        decoded.append(len(rles))
        return decode_many(rles, height, width)

    monkeypatch.setattr(rle_ops, "decode_many", counting)
    return decoded


def written_files(round_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((round_dir / "shards-rank000").iterdir())}


def test_write_stage_decodes_only_what_the_score_check_keeps_and_writes_the_same_bytes(tmp_path, monkeypatch):
    pool, chain = flip_pool(), flip_chain()
    miner = HardNegativeMiner(fire_low=0.05, fire_high=0.5, max_presence=0.5)
    candidates = [c for item in pool for c in item["candidates"]]
    passed, total = sum(int((c.scores >= 0.5).sum()) for c in candidates), sum(c.num_instances for c in candidates)
    for folder in ("lazy", "eager", "legacy"):
        write_proposals(tmp_path / folder, pool, legacy=folder == "legacy")
    decoded = count_decoded(monkeypatch)
    assert score_gate(chain) is chain.verifiers[0]
    lazy = write_rank(round_dir=tmp_path / "lazy", proposer=0, chain=chain, miner=miner, progress=False)
    # Stability reads the tight and loose masks, flip the mask and its flip, the writer the mask again
    # (cached): of the instances the score check kept, and of no other.
    assert 0 < passed < total and sum(decoded) == 4 * passed
    legacy = write_rank(round_dir=tmp_path / "legacy", proposer=0, chain=chain, miner=miner, progress=False)
    with monkeypatch.context() as patch:
        read_eagerly(patch)
        decoded.clear()
        eager = write_rank(round_dir=tmp_path / "eager", proposer=0, chain=chain, miner=miner, progress=False)
        assert sum(decoded) == 4 * total
    counts = lazy["counts"]
    assert min(counts["rejected"][name] for name in ("score", "stability", "flip")) > 0 and counts["instances"] > 0
    assert counts["truncated_pairs"] == 1 and counts["samples"] == len(pool)
    assert lazy == eager == legacy  # counts and the shards' sizes and hashes
    files = written_files(tmp_path / "lazy")
    assert files == written_files(tmp_path / "eager") == written_files(tmp_path / "legacy")
    assert len(files) == 2  # one shard and the summary


def test_score_checks_read_no_pixels_and_limited_stacks_decode_only_their_rows(monkeypatch):
    c = flip_pool(1)[0]["candidates"][2]  # 3 instances: scores 0.9, 0.7, 0.4
    (back, _), = record_candidates({"key": c.key, "height": H, "width": W, "pairs": [candidate_record(c)]})
    decoded = count_decoded(monkeypatch)
    verified = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), ExhaustivityVerifier(low=0.3, high=0.6)])(back)
    assert verified.keep.tolist() == [True, True, False] and HardNegativeMiner().is_hard_negative(verified) is False
    assert candidate_record(back) == candidate_record(c)  # re-serialised from its RLEs
    assert decoded == []
    back.limit_decoding(verified.keep)
    assert torch.equal(back.masks[:2], c.masks[:2]) and not back.masks[2].any()  # row 2 is never decoded
    assert decoded == [2]
    with pytest.raises(RuntimeError, match="already decoded"):
        back.limit_decoding(verified.keep)
    # Behind any check the gate does not know (a subclass may judge otherwise), every mask read is decoded.
    assert score_gate(VerifierChain(verifiers=[StabilityVerifier(), ScoreVerifier()])) is None
    assert score_gate(VerifierChain(verifiers=[ScoreVerifier(), type("Mine", (StabilityVerifier,), {})()])) is None
