"""Human review: export what the verifiers rejected or flagged as COCO JSON, import the corrections.

    export_round(round_dir=d, settings=s, out_dir="review/round-001")      # review.json + images + overlays
    import_round(round_dir=d, review="review/round-001/review.json")        # corrected shards, pointers moved

Export (``out_dir``)::

    review.json                  COCO: one image entry per flagged (image, phrase) pair, one category
                                 per phrase, RLE segmentations, xywh pixel bboxes
    images/<key>.<ext>           the image files (pairs of one image share theirs)
    overlays/<key>-<phrase>.png  the pair's instances over the image, labelled "kept 0.91" / "flip 0.62"

Each image entry carries ``"sam3_train": {"key", "phrase", "exhaustive", "flags"}``; each annotation
``"sam3_train": {"key", "phrase", "status": "kept" | "rejected", "rejected_by", "score"}``.

Editing conventions (what :func:`import_review` reads back):
  - an annotation is a label unless its ``sam3_train.status`` is ``"rejected"``: delete an annotation
    to remove a label, drop its ``sam3_train`` field (or set status ``"kept"``) to accept a rejected
    one, add annotations (no ``sam3_train`` needed) for missed instances;
  - an annotation's category is its phrase (re-categorising moves it to that phrase's query);
  - ``images[].sam3_train.exhaustive`` sets the pair's exhaustivity.
Pairs not in the JSON are left untouched; so are the labels of exported pairs nobody edited.

On a round directory, export recomputes each pair's verdict from the stored proposals
(deterministic, and checked against the thresholds the shards were written with) and takes the
labels from the round's current shards. Import never edits a shard in place: it writes the whole
corrected round into ``round_dir/review-<sha of the JSON>/shards-rankNNN/``, then points
``shards.json`` (what the round's fit reads) and, for a finished round, ``manifest.json`` at it, each
with one atomic replace. Killed at any point, the round still names one complete set of shards;
importing the same file again finishes the job (an import is idempotent). Importing into a finished
round records the review but does not retrain that round's model; review before ``fit``
(``run --stop-after write``) to train on it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam3_train.atomic import replace_dir, write_json_atomic
from sam3_train.data import rle as rle_ops
from sam3_train.data.decode import decode_image
from sam3_train.data.schema import query, validate_meta
from sam3_train.data.shards import DEFAULT_MAX_COUNT, ShardSink
from sam3_train.engine.candidates import record_candidates
from sam3_train.engine.manifest import (
    MANIFEST,
    SUMMARY,
    TMP_SUFFIX,
    WRITTEN,
    file_sha256,
    proposals_dir_name,
    review_dir_name,
    shards_dir_name,
)
from sam3_train.engine.proposal_files import ProposalIndex, proposals_file
from sam3_train.engine.pseudo_labels import instance_entry
from sam3_train.engine.sources import read_samples
from sam3_train.engine.verifiers import Verified, verify_image
from sam3_train.visualize import overlay, slug

if TYPE_CHECKING:
    from sam3_train.engine.settings import DataEngine

REVIEW_JSON = "review.json"


def export_review(
    *,
    out_dir: str | os.PathLike,
    images: Iterable[tuple[bytes, str, dict[str, Any], list[Verified]]],
    min_score: float = 0.1,
    only_flagged: bool = True,
) -> dict[str, int]:
    """Write the review set (see the module docstring); returns ``{"pairs", "annotations", "images"}``.

    Args:
        images: per image, (image bytes, tar extension, the meta written for it, its verified pairs).
            Exhaustivity comes from the written meta (a mined negative or a pair that lost an empty
            mask differs from the chain's verdict), so an unedited review imports as no change.
        min_score: rejected instances scoring below this are not shown (the detector's long tail).
        only_flagged: export only pairs with flags (False: every pair, e.g. for an audit).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    entries, annotations, phrases, files = [], [], {}, 0
    for data, ext, meta, pairs in images:
        pairs = [v for v in sorted(pairs, key=lambda v: v.candidate.phrase) if v.needs_review or not only_flagged]
        if not pairs:
            continue
        key = pairs[0].candidate.key
        file_name = f"images/{key}.{ext}"
        (out / file_name).write_bytes(data)
        files += 1
        picture = np.asarray(decode_image(data))
        written = {q["phrase"]: q for q in meta["queries"]}
        for v in pairs:
            c = v.candidate
            if c.phrase not in written:
                raise ValueError(f"sample {key}: phrase {c.phrase!r} was verified but not written")
            exhaustive = bool(written[c.phrase].get("exhaustive", True))
            category = phrases.setdefault(c.phrase, len(phrases) + 1)
            overlay_name = f"overlays/{key}-{slug(c.phrase)}.png"
            entry = {"id": len(entries) + 1, "file_name": file_name, "width": c.width, "height": c.height,
                     "sam3_train": {"key": key, "phrase": c.phrase, "exhaustive": exhaustive,
                                    "flags": list(v.flags), "overlay": overlay_name}}
            entries.append(entry)
            shown, labels = [], []
            for i in range(c.num_instances):
                kept = bool(v.keep[i])
                if not kept and float(c.scores[i]) < min_score:
                    continue
                inst = instance_entry(c, i)
                if inst is None:
                    continue
                shown.append(i)
                labels.append(f"{'kept' if kept else v.rejected_by[i]} {float(c.scores[i]):.2f}")
                annotations.append({
                    "id": len(annotations) + 1, "image_id": entry["id"], "category_id": category,
                    "segmentation": inst["rle"], "bbox": inst["box"], "area": int(c.masks[i].sum()),
                    "iscrowd": 0, "score": round(float(c.scores[i]), 4),
                    "sam3_train": {"key": key, "phrase": c.phrase, "status": "kept" if kept else "rejected",
                                   "rejected_by": v.rejected_by[i], "score": round(float(c.scores[i]), 4)},
                })
            idx = torch.tensor(shown, dtype=torch.long)
            boxes = c.boxes[idx] if shown else None
            overlay(picture, c.masks[idx], boxes=boxes, labels=labels).save(out / overlay_name)
    coco = {"images": entries, "annotations": annotations,
            "categories": [{"id": i, "name": p} for p, i in phrases.items()],
            "info": {"description": "sam3-train data-engine review set"}}
    (out / REVIEW_JSON).write_text(json.dumps(coco, indent=1, sort_keys=True))
    return {"pairs": len(entries), "annotations": len(annotations), "images": files}


def import_review(
    coco: dict[str, Any] | str | os.PathLike, samples: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Apply a corrected review JSON to a round's sample metas.

    Args:
        coco: the edited review JSON (a dict or its path).
        samples: sample key -> meta (schema.py), e.g. from ``sources.read_samples``.
    Returns:
        (new metas for every key, unchanged ones copied as they were; the (key, phrase) pairs whose
        query was rewritten, sorted). Raises ValueError naming an image entry or annotation that does
        not fit (unknown key, missing segmentation, box outside the image).
    """
    if not isinstance(coco, dict):
        coco = json.loads(Path(coco).read_text())
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    out = copy.deepcopy(samples)
    entries: dict[Any, dict[str, Any]] = {}
    exhaustive: dict[tuple[str, str], bool] = {}
    labels: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for entry in coco.get("images", []):
        extra = entry.get("sam3_train") or {}
        if extra.get("key") not in samples:
            raise ValueError(f"review image {entry.get('id')}: sample key {extra.get('key')!r} is not in the round")
        entries[entry["id"]] = entry
        exhaustive[(extra["key"], extra["phrase"])] = bool(extra.get("exhaustive", True))
        labels[(extra["key"], extra["phrase"])]  # an exported pair whose annotations were all deleted
    for ann in sorted(coco.get("annotations", []), key=lambda a: a["id"]):
        if (ann.get("sam3_train") or {}).get("status") == "rejected":
            continue
        entry = entries.get(ann.get("image_id"))
        if entry is None or ann.get("category_id") not in names:
            raise ValueError(f"review annotation {ann.get('id')}: unknown image_id or category_id")
        if not ann.get("segmentation"):
            raise ValueError(f"review annotation {ann['id']}: needs a segmentation (polygon or RLE)")
        key, meta = entry["sam3_train"]["key"], samples[entry["sam3_train"]["key"]]
        height, width = int(meta["height"]), int(meta["width"])
        rle = rle_ops.from_coco_segmentation(ann["segmentation"], height, width)
        box = [float(v) for v in ann["bbox"]] if ann.get("bbox") else rle_ops.to_xywh(rle)
        labels[(key, names[ann["category_id"]])].append({"box": box, "rle": rle})
    changed = []
    for (key, phrase), instances in sorted(labels.items()):
        meta = out[key]
        old = next((q for q in meta["queries"] if q["phrase"] == phrase), None)
        # A phrase nobody exported (a reviewer's new category) starts non-exhaustive unless marked.
        flag = exhaustive.get((key, phrase), False if old is None else bool(old.get("exhaustive", True)))
        new = query(phrase, instances, exhaustive=flag)
        if old is None:
            meta["queries"].append(new)
        elif old.get("instances", []) != new["instances"] or bool(old.get("exhaustive", True)) != flag:
            old["instances"], old["exhaustive"] = new["instances"], flag
        else:
            continue
        changed.append((key, phrase))
        validate_meta(meta)
    return out, changed


# ------------------------------------------------------------------------------------------ on a round directory
def written_shards(round_dir: str | os.PathLike) -> dict[str, Any]:
    """The round's ``shards.json``; fails naming the round when its shards are not written yet."""
    path = Path(round_dir) / WRITTEN
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the round's pseudo-labels are not written yet "
                                "(run `data_engine.py run --stop-after write` first)")
    return json.loads(path.read_text())


def _paths(round_dir: Path, entries: list[dict[str, Any]]) -> list[str]:
    return [str(round_dir / e["path"]) for e in entries]


def export_round(*, round_dir: str | os.PathLike, settings: DataEngine, out_dir: str | os.PathLike,
                 only_flagged: bool = True, min_score: float = 0.1) -> dict[str, int]:
    """Write the review set of one round (:func:`export_review`'s layout); returns its counts."""
    round_dir = Path(round_dir)
    written = written_shards(round_dir)
    if json.loads(json.dumps(settings.thresholds())) != written["inputs"]:
        raise ValueError(f"{round_dir} was written with other verifier thresholds than the config's: "
                         f"{written['inputs']}; export with the config that wrote it")
    chain = settings.chain()
    if chain.needs_image:  # learned verifiers without a checkpoint: the ones the round trained
        from sam3_train.engine.learned.chain import bind_round_verifiers

        bind_round_verifiers(chain, round_dir)

    def images():
        for proposer in sorted(written["shards"], key=int):
            index = ProposalIndex(proposals_file(round_dir / proposals_dir_name(int(proposer))))
            for key, data, ext, meta in read_samples(_paths(round_dir, written["shards"][proposer]), strict=False):
                pairs = record_candidates(index.get(key), source=str(index.path))
                yield data, ext, meta, verify_image(pairs, chain, image=data)

    return export_review(out_dir=out_dir, images=images(), min_score=min_score, only_flagged=only_flagged)


def import_round(*, round_dir: str | os.PathLike, review: str | os.PathLike,
                 max_count: int = DEFAULT_MAX_COUNT) -> dict[str, Any]:
    """Apply an edited review JSON to the round's shards (see the module docstring).

    Returns ``{"changed": [[key, phrase], ...], "shards": folder or None}``; nothing is rewritten when
    no label changes.
    """
    round_dir, review = Path(round_dir), Path(review)
    if not review.is_file():
        raise FileNotFoundError(f"review file {review} does not exist")
    written = written_shards(round_dir)
    samples = {key: meta for proposer in written["shards"]
               for key, _, _, meta in read_samples(_paths(round_dir, written["shards"][proposer]), strict=False)}
    coco = json.loads(review.read_text())
    new, changed = import_review(coco, samples)
    result: dict[str, Any] = {"changed": [list(c) for c in changed], "shards": None}
    if changed:
        digest = file_sha256(review)
        name = review_dir_name(digest)
        out, tmp = round_dir / name, round_dir / (name + TMP_SUFFIX)
        for stale in (out, tmp):  # not referenced by shards.json (that import would have changed nothing)
            if stale.exists():
                shutil.rmtree(stale)
        shards = {}
        for proposer in sorted(written["shards"], key=int):
            folder = shards_dir_name(int(proposer))
            keys = set()
            with ShardSink(out_dir=tmp / folder, prefix="pseudo", max_count=max_count) as sink:
                for key, data, ext, _ in read_samples(_paths(round_dir, written["shards"][proposer]), strict=False):
                    sink.write(key, data, ext, json.loads(json.dumps(new[key], sort_keys=True)))
                    keys.add(key)
            shards[proposer] = [{"path": f"{name}/{folder}/{p.name}", "size": p.stat().st_size,
                                 "sha256": file_sha256(p)} for p in sorted((tmp / folder).glob("*.tar"))]
            write_json_atomic(tmp / folder / SUMMARY, {"rank": int(proposer), "shards": shards[proposer],
                                                       "counts": {"changed_pairs": sum(k in keys for k, _ in changed)}})
        replace_dir(tmp, out)
        record = {"file": str(review), "sha256": digest, "changed": result["changed"],
                  "replaced": written["shards"]}
        written = {**written, "shards": shards, "reviews": [*written.get("reviews", []), record]}
        write_json_atomic(round_dir / WRITTEN, written)
        result["shards"] = str(out)
    manifest_path = round_dir / MANIFEST
    if manifest_path.is_file():  # a finished round: move its pointer too (also after a kill just before)
        manifest = json.loads(manifest_path.read_text())
        if manifest["shards"] != written["shards"]:
            manifest["shards"], manifest["reviews"] = written["shards"], written.get("reviews", [])
            write_json_atomic(manifest_path, manifest)
    return result
