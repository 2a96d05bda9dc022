"""``sam3-train export``: a trained detector -> three ONNX graphs and ``deploy.json``.

    sam3-train export --detector runs/x/checkpoints/last.ckpt --output exported/x   # or an HF folder

Writes into ``--output``: ``vision.onnx``, ``text.onnx``, ``detector.onnx`` (:mod:`sam3_train.deploy.graphs`;
graphs over 1.5 GB of weights keep them in ``<graph>.onnx.data`` beside), the tokenizer files
(``tokenizer.json`` ...), and ``deploy.json``: image size and normalisation, the graphs' input and
output names, the tokenizer files, the post-processing thresholds (from the ``.ckpt``'s
``eval_score_threshold`` / ``max_detections``, or ``Sam3LitModule``'s defaults for an HF folder) and
the source's fingerprint (sha256 of its file, or of each file of the folder).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript's translation), the
default of ``torch.onnx.export`` in torch 2.14 (setup_env.sh's); the TorchScript-based path is its legacy one.
Its dynamic shapes are checked when the graph is traced: a dimension the code specialises (as
transformers' per-pair ``unbind`` did) fails the export instead of silently becoming a constant. ``optimize=False``: its
onnxscript optimiser pass wrote an invalid detector graph (a node reading an undefined value) with
onnx 1.23 / onnxscript 0.7; onnxruntime optimises the graph itself when it loads it.
Where transformers' SAM 3 does not export, :mod:`sam3_train.deploy.export_ops` replaces it for the
export only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from sam3_train.data.transforms import IMAGE_MEAN, IMAGE_STD
from sam3_train.deploy import graphs
from sam3_train.deploy.export_ops import exportable_copy
from sam3_train.model import Sam3Detector

log = logging.getLogger(__name__)

FORMAT = "sam3-train-onnx"
OPSET = 18
GRAPHS = ("vision", "text", "detector")
MANIFEST = "deploy.json"
PRECISIONS = {"float32": torch.float32, "float16": torch.float16}
Precision = Literal["float32", "float16"]
_EXTERNAL_DATA_BYTES = 1.5e9  # protobuf's 2 GB limit per file, with room for the graph itself


def fingerprint(source: str | os.PathLike) -> dict[str, str]:
    """sha256 of a checkpoint file, or of every file of a folder (relative name -> digest)."""
    source = Path(source)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    digests = {}
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digests[path.name if path == source else str(path.relative_to(source))] = digest.hexdigest()
    return digests


def export_graphs(detector: Sam3Detector, output: str | os.PathLike, *, thresholds: dict[str, Any] | None = None,
                  source: dict[str, Any] | None = None, precision: Precision = "float32",
                  verbose: bool = False, in_place: bool = False) -> dict[str, Any]:
    """Write the three graphs, the tokenizer files and ``deploy.json`` of ``detector`` into ``output``;
    returns the manifest. ``thresholds``: score / mask thresholds and max detections for the predictor
    (default: ``Sam3LitModule``'s); ``source``: what the detector was loaded from (path, sha256);
    ``precision``: of the graphs' weights, float inputs and outputs (``float16``: parity measured in
    docs/deploy.md, not assumed); ``in_place``: export ``detector`` itself instead of a copy (float32
    only; it stays in eval mode with eager attention and the export replacements, which compute the
    same outputs: one copy of the weights less at the peak)."""
    from sam3_train.loading import checkpoint_thresholds  # lazily: loading imports Lightning (lit)

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if in_place and (precision != "float32" or detector.dtype != torch.float32):
        raise ValueError(f"in_place export needs a float32 detector and precision float32, got {detector.dtype} "
                         f"and {precision!r}: the cast would change the caller's detector")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = exportable_copy(detector, in_place=in_place).float()
    levels = graphs.num_levels(model)
    examples = graphs.example_inputs(model)  # traced in float32, then cast
    model = model.to(PRECISIONS[precision])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds = {}
    for name in GRAPHS:
        inputs, input_names, dynamic = examples[name]
        inputs = tuple(x.to(PRECISIONS[precision]) if x.is_floating_point() else x for x in inputs)
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.onnx's notes on its own internals, one per graph
            torch.onnx.export(
                graphs.graph_module(name, model), inputs, str(output / f"{name}.onnx"), dynamo=True,
                input_names=input_names, output_names=graphs.output_names(name, levels), dynamic_shapes=dynamic,
                opset_version=OPSET, optimize=False, external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
                verbose=verbose,
            )
        seconds[name] = round(time.perf_counter() - start, 1)
    tokenizer = model.tokenizer
    # transformers' own writer (what Sam3Detector.save_pretrained writes); it returns the files it wrote
    tokenizer_files = sorted({Path(f).name for f in tokenizer.backend.save_pretrained(str(output))})
    manifest = {
        "format": FORMAT,
        "version": 1,
        "graphs": {name: f"{name}.onnx" for name in GRAPHS},
        "inputs": {name: examples[name][1] for name in GRAPHS},
        "outputs": {name: graphs.output_names(name, levels) for name in GRAPHS},
        "image_size": model.image_size,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "num_levels": levels,
        "num_queries": model.num_queries,
        "context_length": tokenizer.context_length,
        "tokenizer_files": tokenizer_files,
        "thresholds": thresholds or checkpoint_thresholds(),
        "precision": precision,
        "exporter": f"torch.onnx.export(dynamo=True), opset {OPSET}, torch {torch.__version__}",
        "export_seconds": seconds,
        "source": source or {},
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def export_source(source: str | os.PathLike, output: str | os.PathLike, *, pretrained: str | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """Load ``source`` (HF folder or ``.ckpt``, LoRA merged: ``load_detector``) and export it."""
    from sam3_train.loading import checkpoint_thresholds, load_detector

    detector = load_detector(source, pretrained=pretrained)
    described = {"path": str(Path(source).resolve()), "sha256": fingerprint(source)}
    return export_graphs(detector, output, thresholds=checkpoint_thresholds(source), source=described, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam3-train export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", required=True,
                        help="a .ckpt written by sam3-train fit (LoRA adapters are merged) or an HF-layout folder")
    parser.add_argument("--output", required=True, help="folder for the graphs, the tokenizer and deploy.json")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="float32",
                        help="float16 halves the graphs; its parity is measured in docs/deploy.md")
    parser.add_argument("--pretrained", default=None,
                        help="base folder of a .ckpt whose run read it from somewhere else (moved)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = export_source(args.detector, args.output, pretrained=args.pretrained, precision=args.precision)
    print(f"exported {args.detector} -> {args.output}: {', '.join(manifest['graphs'].values())} and {MANIFEST} "
          f"({manifest['image_size']} px; export took {sum(manifest['export_seconds'].values()):.0f} s)")
    return 0
