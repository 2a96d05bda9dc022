"""Where does a trained model say "present" for an absent phrase? (docs/training_shapes.md, issue 28)

For a ``sam3-train fit`` checkpoint on the shapes data: the share of (image, phrase) pairs the model
calls present, as the metric's image-level decision does (some detection's score, sigmoid(class) x
sigmoid(presence), at least 0.5), and the presence head's own share (sigmoid(presence) >= 0.5), by
phrase length (one word: a kind, "star"; two: colour and kind; three: size, colour and kind) for
positive and negative pairs, then for every absent kind (the one-word negatives) the share said present
beside that kind's positive pairs.

    python benchmarks/probe_presence.py runs/shapes_tiny/checkpoints/last.ckpt            # the val split
    python benchmarks/probe_presence.py last.ckpt --shards 'datasets/shapes/shards/train/shapes-000000.tar'
                                                  # training images, at the eval transforms: fit or not?
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from score_at_size import data_module  # noqa: E402
from sam3_train.checkpointing import load_checkpoint_file  # noqa: E402
from sam3_train.loading import load_module  # noqa: E402
from sam3_train.model.postprocess import detection_scores  # noqa: E402

THRESHOLD = 0.5  # the metric's score threshold


@torch.no_grad()
def pair_decisions(checkpoint: str | Path, *, shards: str | None = None) -> list[dict]:
    """One row per (image, phrase) pair of the val split (or of ``shards``, read like the val split):
    phrase, positive (the pair has instances), said_present (top score >= 0.5), presence (probability)."""
    module = load_module(checkpoint).eval()
    settings = dict(load_checkpoint_file(checkpoint, mmap=True)["datamodule_hyper_parameters"])
    if shards is not None:
        settings.update(shapes_root=None, val_shards=shards, val_sets=None)
    rows = []
    for batch in data_module(settings, module.detector.image_size, "val"):
        out = module.detector(batch)
        presence = out["presence_logit"].float().sigmoid()
        top = detection_scores(out).float().amax(1)
        for phrase, target, score, p in zip(batch.phrases, batch.targets, top.tolist(), presence.tolist()):
            rows.append({"phrase": phrase, "positive": len(target["boxes"]) > 0,
                         "said_present": score >= THRESHOLD, "presence": p})
    return rows


def _share(rows: list[dict], key: str) -> float:
    return sum(r[key] >= THRESHOLD if key == "presence" else r[key] for r in rows) / max(1, len(rows))


def summarise(rows: list[dict]) -> dict[str, dict]:
    """{"by_length": {"negative, 1 word": {n, said_present, presence_said_present}, ...},
    "absent_kinds": {kind: {n, said_present, n_present, said_present_when_present}}}."""
    by_length: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        words = len(r["phrase"].split())
        by_length[f"{'positive' if r['positive'] else 'negative'}, {words} word{'s' * (words > 1)}"].append(r)
    kinds: dict[str, dict[bool, list[dict]]] = collections.defaultdict(lambda: {True: [], False: []})
    for r in rows:
        if len(r["phrase"].split()) == 1:
            kinds[r["phrase"]][r["positive"]].append(r)
    return {
        "by_length": {k: {"n": len(v), "said_present": _share(v, "said_present"),
                          "presence_said_present": _share(v, "presence")} for k, v in sorted(by_length.items())},
        "absent_kinds": {k: {"n": len(v[False]), "said_present": _share(v[False], "said_present"),
                             "n_present": len(v[True]), "said_present_when_present": _share(v[True], "said_present")}
                         for k, v in sorted(kinds.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--shards", help="score these shards (read like the val split) instead of the val split")
    args = parser.parse_args(argv)
    summary = summarise(pair_decisions(args.checkpoint, shards=args.shards))
    print(f"{args.checkpoint} on {args.shards or 'the val split'}: pairs said present (top score >= {THRESHOLD}; "
          "the presence head alone)")
    for name, s in summary["by_length"].items():
        print(f"  {name:<20} n={s['n']:<5} {s['said_present']:.2f}  ({s['presence_said_present']:.2f})")
    print("absent kinds (one-word negatives): said present, and the same kind's positive pairs")
    for kind, s in summary["absent_kinds"].items():
        print(f"  {kind:<10} absent n={s['n']:<4} {s['said_present']:.2f} | present n={s['n_present']:<4} "
              f"{s['said_present_when_present']:.2f}")
    return summary


if __name__ == "__main__":
    main()
