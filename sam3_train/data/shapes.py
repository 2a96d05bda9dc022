"""The built-in concept dataset: procedural scenes of coloured shapes, the embedded default.

Each image (``image_size`` px square, textured low-saturation background) holds 0 to 10 shapes of
6 kinds x 6 colours x 2 sizes, drawn in order so later shapes occlude earlier ones; an instance's
mask is what stays visible (instances less than ``MIN_VISIBLE`` visible are dropped, so the
concept really is absent from the picture). Queries come at three levels of detail ("star",
"red star", "small red star"): every present concept is a positive; hard negatives are absent
combinations whose parts are present ("blue star" when there are red stars and blue circles,
"large red star" when only small red stars are there); easy negatives are absent kinds.

Everything derives from (split seed, image index), so a split is identical on every machine.

    patterns = ensure_shapes_shards("datasets/shapes")   # {"train": ".../train/shapes-{...}.tar", ...}
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sam3_train.atomic import fsync_file, replace_dir
from sam3_train.data import rle as rle_ops
from sam3_train.data.schema import make_key, query
from sam3_train.data.shards import ShardSink

VERSION = 1  # bump when the generator's output changes: cached shards are rebuilt
KINDS = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
SIZES = {"small": (0.045, 0.065), "large": (0.10, 0.14)}  # radius range as a share of the image side
MAX_INSTANCES = 10
MIN_VISIBLE = 0.35  # share of a shape that must stay visible for it to count as an instance
MAX_HARD_NEGATIVES = 8  # per image, sampled: the full list can reach 30 and would swamp evaluation
MAX_EASY_NEGATIVES = 2
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
DEFAULT_SPLITS = {"train": 2000, "val": 200, "test": 200}
MIN_SHARDS = 8  # per split (when it has that many images)


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape of circumradius ``r``; circles are 48-gons."""
    if kind == "circle":
        n, radii = 48, [r]
    elif kind == "square":
        n, radii = 4, [r]
    elif kind == "triangle":
        n, radii = 3, [r]
    elif kind == "hexagon":
        n, radii = 6, [r]
    elif kind == "star":
        n, radii = 10, [r, 0.45 * r]
    elif kind == "cross":
        w = 0.36 * r  # half-width of the bars
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(kind)
    return [
        (cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
         cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation texture [size, size, 3] uint8: noise, stripes or checks over a tint."""
    base = rng.uniform(70, 190)
    tint = (base + rng.uniform(-18, 18, size=3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    style = rng.integers(3)
    if style == 0:  # smooth noise: coarse grid upsampled
        coarse = 14 * rng.standard_normal((size // 16 + 2, size // 16 + 2), dtype=np.float32)
        tex = np.kron(coarse, np.ones((16, 16), np.float32))[:size, :size]
    elif style == 1:  # stripes at a random angle
        a, period = rng.uniform(0, math.pi), rng.uniform(8, 24)
        tex = 12 * np.sin((2 * math.pi / period) * (xx * math.cos(a) + yy * math.sin(a)))
    else:  # checks
        cell = int(rng.integers(10, 28))
        tex = 10.0 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
    tex = tex.astype(np.float32) + 4 * rng.standard_normal((size, size), dtype=np.float32)
    img = tint[None, None, :] + tex[..., None]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def generate_scene(seed: int, index: int, *, image_size: int = 256) -> tuple[np.ndarray, dict[str, Any]]:
    """One scene -> (image [H, W, 3] uint8, schema meta). Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    img = Image.fromarray(_background(rng, image_size))
    draw = ImageDraw.Draw(img)
    colour_names = list(COLOURS)
    shapes = []
    for _ in range(int(rng.integers(0, MAX_INSTANCES + 1))):
        kind, colour = KINDS[rng.integers(len(KINDS))], colour_names[rng.integers(len(colour_names))]
        size = "small" if rng.random() < 0.5 else "large"
        r = rng.uniform(*SIZES[size]) * image_size
        cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
        pts = _outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(pts, fill=COLOURS[colour])
        m = Image.new("L", (image_size, image_size), 0)
        ImageDraw.Draw(m).polygon(pts, fill=1)
        shapes.append((kind, colour, size, np.asarray(m, dtype=bool)))
    # Visible part of each shape: its own pixels minus everything drawn later.
    covered = np.zeros((image_size, image_size), dtype=bool)
    visible: list[tuple[str, str, str, np.ndarray]] = []
    for kind, colour, size, full in reversed(shapes):
        vis = full & ~covered
        covered |= full
        if full.sum() and vis.sum() >= MIN_VISIBLE * full.sum():
            visible.append((kind, colour, size, vis))
    visible.reverse()
    instances: dict[str, list[dict[str, Any]]] = {}
    for kind, colour, size, vis in visible:
        rle = rle_ops.encode(vis)
        inst = {"box": rle_ops.to_xywh(rle), "rle": rle}
        for phrase in (kind, f"{colour} {kind}", f"{size} {colour} {kind}"):
            instances.setdefault(phrase, []).append(inst)
    meta = {
        "image_id": f"shapes-{seed}-{index}",
        "width": image_size,
        "height": image_size,
        "queries": [query(p, insts) for p, insts in sorted(instances.items())]
        + [query(p) for p in _sample(rng, hard_negatives(visible), MAX_HARD_NEGATIVES)]
        + [query(p) for p in _sample(rng, easy_negatives(visible), MAX_EASY_NEGATIVES)],
        "source": {"dataset": "shapes", "version": VERSION, "seed": seed, "index": index},
    }
    return np.asarray(img), meta


def _sample(rng: np.random.Generator, items: list[str], k: int) -> list[str]:
    if len(items) <= k:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]


def hard_negatives(present: list[tuple[str, str, str, Any]]) -> list[str]:
    """Absent combinations whose parts are present: colour x kind, and size x (colour kind)."""
    kinds = {k for k, _, _, _ in present}
    colours = {c for _, c, _, _ in present}
    ck = {(c, k) for k, c, _, _ in present}
    sck = {(s, c, k) for k, c, s, _ in present}
    out = [f"{c} {k}" for c in sorted(colours) for k in sorted(kinds) if (c, k) not in ck]
    out += [f"{s} {c} {k}" for c, k in sorted(ck) for s in SIZES if (s, c, k) not in sck]
    return out


def easy_negatives(present: list[tuple[str, str, str, Any]]) -> list[str]:
    """Kinds absent from the image."""
    kinds = {k for k, _, _, _ in present}
    return [k for k in KINDS if k not in kinds]


def write_split(
    out_dir: str | os.PathLike, *, seed: int, count: int, image_size: int = 256, max_count: int = 250, progress: bool = False
) -> str:
    """Generate ``count`` scenes into shards under ``out_dir``; returns the shard pattern."""
    from tqdm import tqdm

    with ShardSink(out_dir=out_dir, prefix="shapes", max_count=max_count) as sink:
        for i in tqdm(range(count), desc=f"shapes {Path(out_dir).name}", disable=not progress):
            image, meta = generate_scene(seed, i, image_size=image_size)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=95)
            sink.write(make_key(i, f"shapes_{seed}"), buf.getvalue(), "jpg", meta)
    return sink.pattern


def ensure_shapes_shards(
    root: str | os.PathLike = "datasets/shapes",
    *,
    splits: dict[str, int] | None = None,
    image_size: int = 256,
    max_count: int = 250,
    progress: bool = False,
) -> dict[str, str]:
    """Shards of the shapes dataset under ``{root}/shards/{split}``, generated only when missing.

    ``splits`` maps split names (train / val / test) to image counts (default 2000 / 200 / 200).
    Each split gets at least 8 shards (at most ``max_count`` images each), so 8 ranks x workers
    can share even the small ones.
    A ``manifest.json`` per split records the parameters; a matching one makes this call instant.
    Each split is written to a temporary folder, fsync'ed and renamed (``atomic.replace_dir``), so an
    interrupted run or a power loss leaves no half-written cache. Returns {split: brace pattern}.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    patterns = {}
    for split, count in splits.items():
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown shapes split {split!r}; use {sorted(SPLIT_SEEDS)}")
        out = Path(root) / "shards" / split
        # At least MIN_SHARDS shards per split, so up to that many ranks x workers all get some.
        per_shard = max(1, min(max_count, math.ceil(count / MIN_SHARDS)))
        params = {"version": VERSION, "seed": SPLIT_SEEDS[split], "count": count, "image_size": image_size, "max_count": per_shard}
        manifest = out / "manifest.json"
        if manifest.is_file():
            cached = json.loads(manifest.read_text())
            if cached.get("params") == params:
                patterns[split] = str(out / cached["pattern"])
                continue
        tmp = out.with_name(f".{split}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pattern = write_split(tmp, seed=params["seed"], count=count, image_size=image_size, max_count=per_shard, progress=progress)
        (tmp / "manifest.json").write_text(json.dumps({"params": params, "pattern": Path(pattern).name}, indent=1))
        for path in tmp.iterdir():  # the shards and the manifest reach the disk before the rename publishes them
            fsync_file(path)
        shutil.rmtree(out, ignore_errors=True)
        try:
            replace_dir(tmp, out)
        except OSError:  # another process finished the same split first: keep theirs if it matches
            shutil.rmtree(tmp, ignore_errors=True)
            if not (manifest.is_file() and json.loads(manifest.read_text()).get("params") == params):
                raise
        patterns[split] = str(out / Path(pattern).name)
    return patterns


def named_data_on_shapes(data: dict[str, Any], patterns: dict[str, str]) -> dict[str, Any]:
    """The named data of a config's ``data`` section read from the shapes splits instead: how a config
    made for the user's own shards (``train_sources``, ``val_sets``) is smoke-run on the built-in data.

    Names and weights are kept, so everything keyed by them (``train/source_share/<name>``, a
    checkpoint monitoring ``val/<set>/cgF1``) still works. ``patterns``: :func:`ensure_shapes_shards`'s
    {split: pattern}. Returns only the keys ``data`` has: ``train_sources`` (every source on the train
    split) and ``val_sets`` (the sets alternately on the val and test splits)."""
    out: dict[str, Any] = {}
    if data.get("train_sources"):
        out["train_sources"] = [{**source, "shards": patterns["train"]} for source in data["train_sources"]]
    if data.get("val_sets"):
        out["val_sets"] = {name: patterns[("val", "test")[i % 2]] for i, name in enumerate(data["val_sets"])}
    return out
