"""``OnnxDetector``: the exported graphs under onnxruntime, with the detector's batch contract.

    detector = OnnxDetector("exported/x")
    outputs = detector(batch)                 # the eval outputs of Sam3Detector(batch), as torch tensors
    results = detector.predict([image], [["red star", "blue circle"]])   # per image, per phrase: detections

Each image runs the vision graph once and each distinct phrase the text graph once (``encode_text``
results may be cached by the caller: a fixed vocabulary is encoded once); the detector graph runs per
(image, phrase) pair. Post-processing is :func:`sam3_train.model.postprocess`, the function
``sam3-train predict`` uses, with the thresholds recorded in ``deploy.json``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch

from sam3_train.data.batch import Batch
from sam3_train.data.collate import Collator
from sam3_train.data.tokenizer import Sam3Tokenizer
from sam3_train.data.transforms import eval_transforms
from sam3_train.model.postprocess import postprocess

MANIFEST = "deploy.json"
FORMAT = "sam3-train-onnx"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}: pass a folder written by sam3-train export.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r}).")
    return manifest


class OnnxDetector:
    """The three graphs of ``sam3-train export`` in onnxruntime sessions.

    Args:
        directory: the export folder (``deploy.json``, the graphs, the tokenizer files).
        providers: onnxruntime execution providers (default: the CPU).
        threads: intra-op threads per session (None: onnxruntime's default, every core).
    """

    def __init__(self, directory: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its notes on nodes it cannot constant-fold fill the console
        if threads is not None:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(self.directory / file), sess_options=options, providers=list(providers))
            for name, file in self.manifest["graphs"].items()
        }
        self.tokenizer = Sam3Tokenizer.from_pretrained(self.directory,
                                                       context_length=self.manifest["context_length"])
        self.image_size: int = self.manifest["image_size"]
        self.thresholds: dict[str, Any] = self.manifest["thresholds"]
        # float inputs and outputs of the graphs: float32, or float16 for a float16 export
        self.float_type = np.float16 if self.manifest.get("precision") == "float16" else np.float32

    # ------------------------------------------------------------------ the three graphs
    def encode_images(self, images: torch.Tensor) -> list[np.ndarray]:
        """images [N, 3, S, S] normalised -> the FPN levels then their position encodings, each [N, C, h, w]."""
        return self.sessions["vision"].run(None, {"images": _numpy(images, self.float_type)})

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """input_ids, attention_mask [T, L] -> text [T, L, C] (no de-duplication)."""
        return self.sessions["text"].run(None, {"input_ids": _numpy(input_ids, np.int64),
                                                "attention_mask": _numpy(attention_mask, np.int64)})[0]

    def detect(self, levels: list[np.ndarray], text: np.ndarray, text_mask: np.ndarray, exemplar_boxes: np.ndarray,
               exemplar_labels: np.ndarray) -> dict[str, torch.Tensor]:
        """Per pair (rows already gathered): levels and pos [P, ...], text [P, L, C], text_mask [P, L]
        bool, exemplar_boxes [P, E, 4], exemplar_labels [P, E] -> the eval outputs as torch tensors."""
        names = self.manifest["inputs"]["detector"]
        feed = dict(zip(names, [*levels, text, text_mask, _numpy(exemplar_boxes, self.float_type), exemplar_labels]))
        values = self.sessions["detector"].run(None, feed)
        # post-processing works in float32 whatever the graphs' precision
        return {name: torch.from_numpy(v).float() for name, v in zip(self.manifest["outputs"]["detector"], values)}

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``Sam3Detector(batch)`` in eval mode: pred_logits [P, Q], pred_boxes [P, Q, 4], pred_masks
        [P, Q, h, w], presence_logit [P], semantic_seg [P, 1, h, w]."""
        pair_image = batch.pair_image.numpy()
        levels = [level[pair_image] for level in self.encode_images(batch.images)]
        # each distinct phrase once, as Sam3Detector.encode_text
        tokens = torch.cat([batch.input_ids, batch.attention_mask], dim=1)
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        length = batch.input_ids.shape[1]
        text = self.encode_text(unique[:, :length], unique[:, length:])[inverse.numpy()]
        num_pairs = batch.num_pairs
        boxes, labels = batch.exemplar_boxes, batch.exemplar_labels
        if boxes is None or labels is None:
            boxes, labels = torch.zeros(num_pairs, 0, 4), torch.zeros(num_pairs, 0, dtype=torch.long)
        return self.detect(levels, text, _numpy(batch.attention_mask, bool), _numpy(boxes, np.float32),
                           _numpy(labels, np.int64))

    # ------------------------------------------------------------------ images and phrases in, detections out
    def batch(self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]],
              exemplars: Sequence[Sequence[list[tuple[list[float], bool]]]] | None = None) -> Batch:
        """A Batch of the eval transform: ``images`` H x W x 3 uint8 arrays; ``phrases[i]`` the phrases
        of image i; ``exemplars[i][j]``: the (xyxy pixel box, positive) exemplars of phrase j of image i."""
        transform = eval_transforms(image_size=self.image_size)
        samples = []
        for i, (image, names) in enumerate(zip(images, phrases, strict=True)):
            image = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)
            height, width = image.shape[-2:]
            boxes, queries = [], []
            for j, phrase in enumerate(names):
                shots = exemplars[i][j] if exemplars is not None else []
                queries.append({"phrase": phrase, "instances": [], "exhaustive": True,
                                "exemplars": list(range(len(boxes), len(boxes) + len(shots))),
                                "exemplar_labels": [int(positive) for _, positive in shots]})
                boxes += [box for box, _ in shots]
            target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, height, width, dtype=torch.uint8),
                      "exemplar_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "queries": queries,
                      "key": str(i), "original_size": (height, width)}
            samples.append(transform(image, target, random.Random(0)))  # the eval transform draws nothing
        return Collator(tokenizer=self.tokenizer)(samples)

    def predict(self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]],
                exemplars: Sequence[Sequence[list[tuple[list[float], bool]]]] | None = None,
                **thresholds: Any) -> list[list[dict[str, torch.Tensor]]]:
        """Per image, per phrase: ``postprocess``'s dict (scores [n], boxes [n, 4] xyxy pixels of the
        image, masks [n, H, W] bool, presence). ``thresholds`` override deploy.json's
        (``score_threshold``, ``mask_threshold``, ``max_detections``)."""
        batch = self.batch(images, phrases, exemplars)
        results = self.postprocess(self(batch), batch, **thresholds)
        per_image: list[list[dict[str, torch.Tensor]]] = [[] for _ in images]
        for pair, result in zip(batch.pair_image.tolist(), results):
            per_image[pair].append(result)
        return per_image

    def postprocess(self, outputs: dict[str, torch.Tensor], batch: Batch, **thresholds: Any) -> list[dict]:
        """:func:`sam3_train.model.postprocess` with deploy.json's thresholds (``thresholds`` override)."""
        settings = {**self.thresholds, **thresholds}
        return postprocess(outputs, batch, original_sizes=batch.original_sizes, **settings)


def _numpy(value: torch.Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return np.ascontiguousarray(array.astype(dtype, copy=False))
