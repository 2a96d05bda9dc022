"""A SAM 3 concept backend for Label Studio (its ML-backend protocol): an annotator types a noun phrase
and/or draws exemplar boxes, and a detector trained here answers with every instance's mask.

    python -m sam3_train.engine.label_studio.backend --detector runs/x/checkpoints/last.ckpt --port 9090 \\
        --document-root /data          # the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, if it serves local files
    # Label Studio (started with ML_BLOCK_LOCAL_IP=false for a backend on localhost): project Settings >
    # Model > Connect Model, URL http://localhost:9090, "Interactive preannotations" on.

Endpoints: ``GET /health`` -> ``{"status": "UP"}``; ``POST /setup`` (the project's config) ->
``{"model_version"}``; ``POST /predict`` ``{"tasks", "label_config", "params": {"context"}}`` ->
``{"results": [one prediction per task]}``; ``POST /webhook`` is acknowledged and ignored (this
backend does not train).

The prompt: the text of the config's first TextArea and every rectangle of its RectangleLabels in
``params.context.result`` (what the editor sends while the annotator works); without a context the
task's ``data.phrase`` (a review task's phrase). Boxes alone use the phrase ``"visual"``, as Meta's
SAM 3 predictor does. The answer: one brush region per detection of ``sam3-train predict``'s
post-processing (:func:`sam3_train.model.postprocess` with the checkpoint's ``eval_score_threshold``
and ``max_detections``), labelled with the phrase where the BrushLabels tag has it as a Label, else
with its first Label; each region carries its score.

Why the standard library's HTTP server and not label-studio-ml's ``LabelStudioMLBase``: the PyPI
release of label-studio-ml (1.0.9) pins Flask 1.1.2, Jinja2 3.0.3 and werkzeug 2.0.2, which would
downgrade the Jinja2 that torch installs in the training env; its maintained successor is published
on GitHub only (only PyPI is reachable here). The protocol is four small JSON endpoints.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import threading
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps

from sam3_train.data.batch import Batch
from sam3_train.data.collate import Collator
from sam3_train.data.transforms import eval_transforms
from sam3_train.engine.label_studio.config import control_names
from sam3_train.engine.label_studio.tasks import brush_region
from sam3_train.loading import checkpoint_thresholds, load_detector
from sam3_train.model import Sam3Detector
from sam3_train.model.postprocess import postprocess

VISUAL = "visual"  # the phrase of a box-only prompt (Meta's Sam3Processor)


class ConceptPredictor:
    """A detector and ``sam3-train predict``'s post-processing, for one image and one prompt at a time.

    Args:
        detector: an eval-mode detector (``load_detector``).
        score_threshold, max_detections, mask_threshold: :func:`postprocess`'s settings.
    """

    def __init__(self, *, detector: Sam3Detector, score_threshold: float, max_detections: int,
                 mask_threshold: float = 0.0):
        self.detector = detector.eval()
        self.thresholds = {"score_threshold": float(score_threshold), "max_detections": int(max_detections),
                           "mask_threshold": float(mask_threshold)}
        self.collate = Collator(tokenizer=detector.tokenizer)
        self.transform = eval_transforms(image_size=detector.image_size)
        self._lock = threading.Lock()  # one forward at a time: the server answers requests in threads

    @classmethod
    def from_path(cls, source: str | os.PathLike) -> ConceptPredictor:
        """From a ``.ckpt`` (its run's thresholds) or an HF folder (``Sam3LitModule``'s defaults)."""
        return cls(detector=load_detector(source), **checkpoint_thresholds(source))

    def batch(self, image: np.ndarray, phrase: str, boxes: list[list[float]]) -> Batch:
        """One (image, phrase) pair through the eval transform: ``image`` [H, W, 3] uint8, ``boxes``
        positive exemplars, xyxy pixels of the image."""
        pixels = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W]
        height, width = pixels.shape[-2:]
        query = {"phrase": phrase, "instances": [], "exhaustive": True, "exemplars": list(range(len(boxes))),
                 "exemplar_labels": [1] * len(boxes)}
        target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, height, width, dtype=torch.uint8),
                  "exemplar_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "queries": [query],
                  "key": "label-studio", "original_size": (int(height), int(width))}
        return self.collate([self.transform(pixels, target, random.Random(0))])  # the eval transform draws nothing

    @torch.no_grad()
    def __call__(self, image: np.ndarray, phrase: str, boxes: list[list[float]] = ()) -> dict[str, torch.Tensor]:
        """``postprocess``'s dict for the pair: scores [n], boxes [n, 4] xyxy pixels, masks [n, H, W] bool."""
        batch = self.batch(image, phrase, list(boxes))
        with self._lock:
            outputs = self.detector(batch)
        return postprocess(outputs, batch, original_sizes=batch.original_sizes, **self.thresholds)[0]


def prompt_of(task: dict[str, Any], context: dict[str, Any] | None, *, phrase_tag: str | None,
              exemplar_tag: str | None) -> tuple[str | None, list[list[float]]]:
    """(phrase or None, exemplar boxes xyxy pixels) from the editor's context, else the task's ``phrase``."""
    phrase, boxes = None, []
    for item in (context or {}).get("result") or []:
        value = item.get("value") or {}
        if item.get("type") == "textarea" and (phrase_tag is None or item.get("from_name") == phrase_tag):
            text = " ".join(t.strip() for t in value.get("text") or [] if t.strip())
            phrase = text or phrase
        elif item.get("type") in ("rectanglelabels", "rectangle") and (
                exemplar_tag is None or item.get("from_name") == exemplar_tag):
            w, h = float(item["original_width"]), float(item["original_height"])  # value: percent of the image
            x0, y0 = value["x"] * w / 100, value["y"] * h / 100
            boxes.append([x0, y0, x0 + value["width"] * w / 100, y0 + value["height"] * h / 100])
    if phrase is None and not boxes:
        phrase = (task.get("data") or {}).get("phrase") or None
    if phrase is None and boxes:
        phrase = VISUAL
    return phrase, boxes


class ConceptBackend:
    """The protocol's answers (no HTTP here: :func:`serve` wraps it).

    Args:
        predictor: the detector.
        document_root: the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: local-files images are read
            from it directly (None: fetched from the server).
        label_studio_url, api_key: where images the backend cannot read locally are fetched from.
        model_version: reported to Label Studio and stored with each prediction.
    """

    def __init__(self, *, predictor: ConceptPredictor, document_root: str | os.PathLike | None = None,
                 label_studio_url: str | None = None, api_key: str | None = None, model_version: str = "sam3-train"):
        self.predictor = predictor
        self.document_root = Path(document_root).resolve() if document_root else None
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self.api_key = api_key
        self.model_version = model_version

    def health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": type(self).__name__, "model_version": self.model_version}

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("schema"):
            control_names(body["schema"])  # a config the backend cannot answer fails here, at connect time
        return {"model_version": self.model_version}

    def load_image(self, url: str) -> np.ndarray:
        """A task's image URL -> [H, W, 3] uint8 (EXIF orientation applied, as the editor shows it)."""
        parts = urlsplit(url)
        if parts.path.rstrip("/").endswith("/data/local-files") and self.document_root is not None:
            relative = unquote(parse_qs(parts.query).get("d", [""])[0])
            path = (self.document_root / relative).resolve()
            if not path.is_relative_to(self.document_root):
                raise ValueError(f"image {url!r} points outside the document root {self.document_root}")
            data = path.read_bytes()
        elif parts.scheme in ("http", "https") or self.label_studio_url:
            full = url if parts.scheme else f"{self.label_studio_url}{url}"
            request = urllib.request.Request(full, headers={"Authorization": f"Token {self.api_key}"}
                                             if self.api_key else {})
            with urllib.request.urlopen(request, timeout=60) as response:
                data = response.read()
        else:
            raise ValueError(f"cannot read image {url!r}: pass --document-root (local files) or --label-studio-url")
        return np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))  # writable: torch reads it

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        names = control_names(body["label_config"])
        context = (body.get("params") or {}).get("context")
        results = []
        for task in body.get("tasks") or []:
            phrase, boxes = prompt_of(task, context, phrase_tag=names.phrase, exemplar_tag=names.exemplar)
            if phrase is None:  # nothing typed or drawn yet, and no phrase in the task
                results.append({"result": [], "score": 0.0, "model_version": self.model_version})
                continue
            image = self.load_image(task["data"][names.image_value])
            found = self.predictor(image, phrase, boxes)
            label = phrase if phrase in names.brush_labels else names.brush_labels[0]
            regions = [brush_region(mask.numpy(), label, region_id=f"sam3-{i}", from_name=names.brush,
                                    to_name=names.image, score=float(score))
                       for i, (mask, score) in enumerate(zip(found["masks"], found["scores"]))]
            results.append({"result": regions, "score": float(found["scores"].max()) if len(regions) else 0.0,
                            "model_version": self.model_version})
        return {"results": results}


def serve(backend: ConceptBackend, *, host: str = "127.0.0.1", port: int = 9090) -> ThreadingHTTPServer:
    """An HTTP server answering the protocol (not started: call ``serve_forever``, e.g. in a thread)."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") in ("/health", ""):
                self._answer(HTTPStatus.OK, backend.health())
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"no GET {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                route = self.path.rstrip("/")
                if route == "/predict":
                    self._answer(HTTPStatus.OK, backend.predict(body))
                elif route == "/setup":
                    self._answer(HTTPStatus.OK, backend.setup(body))
                elif route == "/webhook":
                    self._answer(HTTPStatus.OK, {"status": "ignored: this backend does not train"})
                else:
                    self._answer(HTTPStatus.NOT_FOUND, {"error": f"no POST {self.path}"})
            except (ValueError, KeyError, OSError) as exn:  # a request it cannot answer: say why, keep serving
                self._answer(HTTPStatus.BAD_REQUEST, {"error": f"{type(exn).__name__}: {exn}"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            pass  # quiet: Label Studio polls /health

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", required=True, help="a .ckpt of sam3-train fit or an HF-layout folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--document-root", default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
                        help="read local-files images from here (default: $LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    parser.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="fetch other images from this server (default: $LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="a user's token for those fetches (default: $LABEL_STUDIO_API_KEY)")
    args = parser.parse_args(argv)
    backend = ConceptBackend(predictor=ConceptPredictor.from_path(args.detector), document_root=args.document_root,
                             label_studio_url=args.label_studio_url, api_key=args.api_key,
                             model_version=f"sam3-train:{Path(args.detector).name}")
    server = serve(backend, host=args.host, port=args.port)
    print(f"SAM 3 concept backend on http://{args.host}:{args.port} ({args.detector})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
