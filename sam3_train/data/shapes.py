"""The built-in concept dataset: procedural scenes of coloured shapes, the embedded default.

Each image (``image_size`` px square, textured low-saturation background) holds 0 to 10 shapes of
6 kinds x 6 colours x 2 sizes, drawn in order so later shapes occlude earlier ones; an instance's
mask is what stays visible (instances less than ``MIN_VISIBLE`` visible are dropped, so the
concept really is absent from the picture). Queries come at three levels of detail ("star",
"red star", "small red star"): every present concept is a positive; hard negatives are absent
combinations whose parts are present ("blue star" when there are red stars and blue circles,
"large red star" when only small red stars are there); easy negatives are absent kinds.

Everything derives from (split seed, image index), so a split is identical on every machine.

A second, shifted domain (``domain="shifted"``) is what the fine-tuning demonstration adapts to
(benchmarks/bench_finetune.py, docs/finetuning.md): saturated two-colour gradient backgrounds with
blotches instead of the grey textures, three new colours (pink, cyan, brown) and three new kinds
(pentagon, diamond, arrow) beside the base ones, with their phrases and negatives; its splits have
their own seeds, so no shifted scene repeats a base one. The base domain's output is unchanged by it.

    patterns = ensure_shapes_shards("datasets/shapes")   # {"train": ".../train/shapes-{...}.tar", ...}
    shifted = ensure_shapes_shards("datasets/shapes", domain="shifted")   # under shards/shifted/<split>
    write_kshot_split("datasets/shapes/shards/shifted/train-10shot-seed0", domain="shifted", shots=10, seed=0)
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
DOMAINS = ("base", "shifted")
SHIFTED_KINDS = KINDS + ("pentagon", "diamond", "arrow")
SHIFTED_COLOURS = {**COLOURS, "pink": (250, 110, 190), "cyan": (20, 210, 220), "brown": (130, 75, 30)}
SHIFTED_SPLIT_SEEDS = {"train": 11000, "val": 12000, "test": 13000}


def domain_vocabulary(domain: str = "base") -> tuple[tuple[str, ...], dict[str, tuple[int, int, int]], dict[str, int]]:
    """(kinds, colours name -> RGB, split seeds) of a domain (``base`` or ``shifted``)."""
    if domain == "base":
        return KINDS, COLOURS, SPLIT_SEEDS
    if domain == "shifted":
        return SHIFTED_KINDS, SHIFTED_COLOURS, SHIFTED_SPLIT_SEEDS
    raise ValueError(f"unknown shapes domain {domain!r}; use one of {DOMAINS}")


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
    elif kind == "pentagon":
        n, radii = 5, [r]
    elif kind == "diamond":  # a rhombus twice as long as wide: not a rotated square
        n, radii = 4, [r, 0.5 * r]
    elif kind in ("cross", "arrow"):
        if kind == "cross":
            w = 0.36 * r  # half-width of the bars
            pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        else:  # shaft of half-width 0.22 r, head from x = 0.15 r to the tip at r
            pts = [(-r, -0.22 * r), (0.15 * r, -0.22 * r), (0.15 * r, -0.6 * r), (r, 0.0), (0.15 * r, 0.6 * r),
                   (0.15 * r, 0.22 * r), (-r, 0.22 * r)]
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


def _shifted_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The shifted domain's background [size, size, 3] uint8: a gradient between two random mid-dark
    colours (channels 30-160: saturated, yet darker than most shape colours) at a random angle, with
    coarse blotches and pixel noise."""
    start, end = rng.uniform(30, 160, size=3), rng.uniform(30, 160, size=3)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a), 0, 1)[..., None]  # [size, size, 1]
    coarse = 18 * rng.standard_normal((size // 32 + 2, size // 32 + 2), dtype=np.float32)
    blotches = np.kron(coarse, np.ones((32, 32), np.float32))[:size, :size]
    tex = blotches + 5 * rng.standard_normal((size, size), dtype=np.float32)
    img = ((1 - t) * start + t * end).astype(np.float32) + tex[..., None]
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def generate_scene(seed: int, index: int, *, image_size: int = 256, domain: str = "base") -> tuple[np.ndarray, dict[str, Any]]:
    """One scene -> (image [H, W, 3] uint8, schema meta). Deterministic in (seed, index, domain)."""
    kinds, colours, _ = domain_vocabulary(domain)
    rng = np.random.default_rng([seed, index])
    img = Image.fromarray(_background(rng, image_size) if domain == "base" else _shifted_background(rng, image_size))
    draw = ImageDraw.Draw(img)
    colour_names = list(colours)
    shapes = []
    for _ in range(int(rng.integers(0, MAX_INSTANCES + 1))):
        kind, colour = kinds[rng.integers(len(kinds))], colour_names[rng.integers(len(colour_names))]
        size = "small" if rng.random() < 0.5 else "large"
        r = rng.uniform(*SIZES[size]) * image_size
        cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
        pts = _outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(pts, fill=colours[colour])
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
    source = {"dataset": "shapes", "version": VERSION, "seed": seed, "index": index}
    if domain != "base":  # the base meta stays as it was: its cached shards and ids do not change
        source["domain"] = domain
    meta = {
        "image_id": f"shapes-{seed}-{index}" if domain == "base" else f"shapes-{domain}-{seed}-{index}",
        "width": image_size,
        "height": image_size,
        "queries": [query(p, insts) for p, insts in sorted(instances.items())]
        + [query(p) for p in _sample(rng, hard_negatives(visible), MAX_HARD_NEGATIVES)]
        + [query(p) for p in _sample(rng, easy_negatives(visible, kinds=kinds), MAX_EASY_NEGATIVES)],
        "source": source,
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


def easy_negatives(present: list[tuple[str, str, str, Any]], *, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Kinds (of the domain's ``kinds``) absent from the image."""
    seen = {k for k, _, _, _ in present}
    return [k for k in kinds if k not in seen]


def write_split(
    out_dir: str | os.PathLike, *, seed: int, count: int, image_size: int = 256, max_count: int = 250, progress: bool = False,
    domain: str = "base", indices: list[int] | None = None,
) -> str:
    """Generate scenes ``0 .. count - 1`` (or the given ``indices``) of ``domain`` into shards under
    ``out_dir``; returns the shard pattern."""
    from tqdm import tqdm

    with ShardSink(out_dir=out_dir, prefix="shapes", max_count=max_count) as sink:
        for i in tqdm(range(count) if indices is None else indices, desc=f"shapes {Path(out_dir).name}", disable=not progress):
            image, meta = generate_scene(seed, i, image_size=image_size, domain=domain)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=95)
            sink.write(make_key(i, f"shapes_{seed}"), buf.getvalue(), "jpg", meta)
    return sink.pattern


def _publish(tmp: Path, out: Path, params: dict[str, Any], record: dict[str, Any]) -> None:
    """Write ``tmp/manifest.json`` ({"params", **record}), fsync, and rename ``tmp`` to ``out`` (see
    :func:`ensure_shapes_shards`); a folder another process published first with the same params is kept."""
    manifest = out / "manifest.json"
    (tmp / "manifest.json").write_text(json.dumps({"params": params, **record}, indent=1))
    for path in tmp.iterdir():  # the shards and the manifest reach the disk before the rename publishes them
        fsync_file(path)
    shutil.rmtree(out, ignore_errors=True)
    try:
        replace_dir(tmp, out)
    except OSError:  # another process finished the same split first: keep theirs if it matches
        shutil.rmtree(tmp, ignore_errors=True)
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("params") == params):
            raise


def _cached(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    manifest = out / "manifest.json"
    if manifest.is_file():
        cached = json.loads(manifest.read_text())
        if cached.get("params") == params:
            return cached
    return None


def ensure_shapes_shards(
    root: str | os.PathLike = "datasets/shapes",
    *,
    splits: dict[str, int] | None = None,
    image_size: int = 256,
    max_count: int = 250,
    progress: bool = False,
    domain: str = "base",
) -> dict[str, str]:
    """Shards of the shapes dataset under ``{root}/shards/{split}`` (``{root}/shards/{domain}/{split}``
    for another ``domain`` than ``base``), generated only when missing.

    ``splits`` maps split names (train / val / test) to image counts (default 2000 / 200 / 200).
    Each split gets at least 8 shards (at most ``max_count`` images each), so 8 ranks x workers
    can share even the small ones.
    A ``manifest.json`` per split records the parameters; a matching one makes this call instant.
    Each split is written to a temporary folder, fsync'ed and renamed (``atomic.replace_dir``), so an
    interrupted run or a power loss leaves no half-written cache. Returns {split: brace pattern}.
    """
    _, _, seeds = domain_vocabulary(domain)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    patterns = {}
    for split, count in splits.items():
        if split not in seeds:
            raise ValueError(f"unknown shapes split {split!r}; use {sorted(seeds)}")
        out = Path(root) / "shards" / (split if domain == "base" else f"{domain}/{split}")
        # At least MIN_SHARDS shards per split, so up to that many ranks x workers all get some.
        per_shard = max(1, min(max_count, math.ceil(count / MIN_SHARDS)))
        params = {"version": VERSION, "seed": seeds[split], "count": count, "image_size": image_size, "max_count": per_shard}
        if domain != "base":  # the base params stay as they were: existing caches stay valid
            params["domain"] = domain
        cached = _cached(out, params)
        if cached is not None:
            patterns[split] = str(out / cached["pattern"])
            continue
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pattern = write_split(tmp, seed=params["seed"], count=count, image_size=image_size, max_count=per_shard,
                              progress=progress, domain=domain)
        _publish(tmp, out, params, {"pattern": Path(pattern).name})
        patterns[split] = str(out / Path(pattern).name)
    return patterns


def kshot_indices(*, domain: str = "base", shots: int, seed: int, pool: int = DEFAULT_SPLITS["train"],
                  image_size: int = 256) -> tuple[list[int], dict[str, Any]]:
    """The k-shot cut of a domain's training split (its first ``pool`` scenes) by
    :func:`sam3_train.data.kshot.kshot_subset`'s protocol: K images per category (GLIP's ODinW
    protocol), a category being a kind (``star``), an instance being a visible shape. Returns (the kept
    scene indices in order, the subset's ``info.kshot`` plus ``images_per_kind`` {kind: kept images})."""
    from sam3_train.data.kshot import images_per_category, kshot_subset

    kinds, _, seeds = domain_vocabulary(domain)
    images, annotations = [], []
    for i in range(pool):  # the scenes' metas only; the kept images are drawn again when written
        _, meta = generate_scene(seeds["train"], i, image_size=image_size, domain=domain)
        images.append({"id": i, "file_name": meta["image_id"], "width": image_size, "height": image_size})
        for q in meta["queries"]:
            if q["phrase"] in kinds:
                annotations += [{"id": len(annotations), "image_id": i, "category_id": kinds.index(q["phrase"]),
                                 "bbox": inst["box"], "iscrowd": 0} for inst in q["instances"]]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": kind} for c, kind in enumerate(kinds)]}
    subset = kshot_subset(coco, shots=shots, seed=seed)
    counts = images_per_category(subset)
    info = {**subset["info"]["kshot"], "pool": pool, "images_per_kind": {k: counts.get(c, 0) for c, k in enumerate(kinds)}}
    return [e["id"] for e in subset["images"]], info


def write_kshot_split(out_dir: str | os.PathLike, *, domain: str = "base", shots: int, seed: int,
                      pool: int = DEFAULT_SPLITS["train"], image_size: int = 256) -> str:
    """Shards of :func:`kshot_indices`'s subset under ``out_dir`` (every query of a kept scene, its
    negatives included), cached like :func:`ensure_shapes_shards`: ``manifest.json`` records the
    parameters, the kept indices and the images per kind. Returns the brace pattern."""
    out = Path(out_dir)
    _, _, seeds = domain_vocabulary(domain)
    params = {"version": VERSION, "domain": domain, "seed": seeds["train"], "pool": pool, "shots": shots,
              "kshot_seed": seed, "image_size": image_size}
    cached = _cached(out, params)
    if cached is not None:
        return str(out / cached["pattern"])
    indices, info = kshot_indices(domain=domain, shots=shots, seed=seed, pool=pool, image_size=image_size)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    per_shard = max(1, math.ceil(len(indices) / MIN_SHARDS))
    pattern = write_split(tmp, seed=seeds["train"], count=len(indices), image_size=image_size, max_count=per_shard,
                          domain=domain, indices=indices)
    _publish(tmp, out, params, {"pattern": Path(pattern).name, "indices": indices, "kshot": info})
    return str(out / Path(pattern).name)


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
