"""The review round trip through a running Label Studio server, with its client, label_studio_sdk.

    client = connect(url="http://localhost:8080", api_key=token)
    export_project(client=client, review_dir="review/r1", document_root=".")   # project + one task per pair
    edited, counts = import_project(client=client, review_dir="review/r1")      # review/r1/review-label-studio.json
    review.import_round(round_dir=..., review=edited)                           # the COCO path's import

``export_project`` reads a review folder written by :func:`sam3_train.engine.review.export_round`
(review.json + images/) and records the project in ``<review_dir>/label_studio.json``;
``import_project`` reads that record, fetches every task's annotations and writes the edited
review.json (:func:`sam3_train.engine.label_studio.tasks.reviewed_coco`): the same decisions give the
same bytes, so importing twice changes nothing the second time.

Images are served by Label Studio's local-files storage, not uploaded: the server must run with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` a
folder above the review folder. Why: an upload copies every image into the server's media folder
(a second copy of the round's images, and task URLs that only that server knows), while local
files keep the review folder the one place the images live, and a task names the file the engine
exported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from sam3_train.atomic import write_json_atomic
from sam3_train.engine.label_studio.config import review_config
from sam3_train.engine.label_studio.tasks import MODEL_VERSION, review_tasks, reviewed_coco
from sam3_train.engine.manifest import file_sha256
from sam3_train.engine.review import REVIEW_JSON

LABEL_STUDIO_JSON = "label_studio.json"  # in the review folder: the project it was exported to
REVIEWED_JSON = "review-label-studio.json"  # in the review folder: the reviewers' decisions, review.json's format
IMPORT_CHUNK = 100  # tasks per import request: brush masks make tasks large, the server caps a request at 200 MB
LOCAL_FILES = ("LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="
               "a folder above the review folder")


def connect(*, url: str, api_key: str) -> LabelStudio:
    """A client of the server at ``url`` (``http://localhost:8080``) with a user's API token."""
    if not api_key:
        raise ValueError("no Label Studio API token: pass --api-key or set LABEL_STUDIO_API_KEY "
                         "(Label Studio: Account & Settings > Access Token)")
    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key)


def local_files_url(path: str | os.PathLike, document_root: str | os.PathLike) -> str:
    """The URL Label Studio serves a local file at (``/data/local-files/?d=<path below the root>``)."""
    path, root = Path(path).resolve(), Path(document_root).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is not below the Label Studio document root {root}: start the server with "
                         f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to a folder above the review folder")
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix())


def _read_review(review_dir: Path) -> dict[str, Any]:
    path = review_dir / REVIEW_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export the round's review first "
                                "(data_engine.py export-label-studio writes it)")
    return json.loads(path.read_text())


def export_project(*, client: LabelStudio, review_dir: str | os.PathLike, document_root: str | os.PathLike,
                   title: str | None = None) -> dict[str, Any]:
    """Create a project for a review folder and import its tasks; returns (and writes) the record
    ``{"project", "storage", "tasks", "title", "review_sha256"}``.

    ``document_root``: the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (a folder above ``review_dir``).
    """
    review_dir = Path(review_dir)
    coco = _read_review(review_dir)
    tasks = review_tasks(coco, image_url=lambda file_name: local_files_url(review_dir / file_name, document_root))
    phrases = [c["name"] for c in sorted(coco.get("categories", []), key=lambda c: c["id"])]
    title = title or f"sam3-train review {review_dir.resolve().name}"
    project = client.projects.create(
        title=title, label_config=review_config(phrases), model_version=MODEL_VERSION,
        show_collab_predictions=True,  # the reviewer starts from the engine's masks (pre-annotations)
        description=f"sam3-train data-engine review of {review_dir.resolve()}: accept, reject, redraw or add "
                    "masks, and say whether every instance of the phrase is marked")
    try:
        storage = client.import_storage.local.create(project=project.id, path=str((review_dir / "images").resolve()),
                                                     title="sam3-train review images", use_blob_urls=False)
    except ApiError as exn:
        client.projects.delete(id=project.id)
        raise RuntimeError(f"Label Studio refused the local-files storage for {review_dir / 'images'} "
                           f"({exn.status_code}: {exn.body}); start the server with {LOCAL_FILES}") from None
    for start in range(0, len(tasks), IMPORT_CHUNK):
        client.projects.import_tasks(id=project.id, request=tasks[start:start + IMPORT_CHUNK])
    record = {"project": project.id, "storage": storage.id, "tasks": len(tasks), "title": title,
              "review_sha256": file_sha256(review_dir / REVIEW_JSON)}
    write_json_atomic(review_dir / LABEL_STUDIO_JSON, record)
    return record


def project_tasks(client: LabelStudio, project: int) -> list[dict[str, Any]]:
    """Every task of a project with its annotations, as plain dicts (``id``, ``data``, ``annotations``)."""
    tasks = []
    for task in client.tasks.list(project=project, fields="all"):
        annotations = [a.model_dump(mode="json") for a in client.annotations.list(id=task.id)]
        tasks.append({"id": task.id, "data": dict(task.data), "annotations": annotations})
    return tasks


def import_project(*, client: LabelStudio, review_dir: str | os.PathLike) -> tuple[Path, dict[str, int]]:
    """Write the reviewers' decisions of a review folder's project as ``<review_dir>/review-label-studio.json``;
    returns its path and :func:`reviewed_coco`'s counts."""
    review_dir = Path(review_dir)
    record_path = review_dir / LABEL_STUDIO_JSON
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} does not exist: export the review to Label Studio first "
                                "(data_engine.py export-label-studio)")
    record = json.loads(record_path.read_text())
    coco = _read_review(review_dir)
    if file_sha256(review_dir / REVIEW_JSON) != record["review_sha256"]:
        raise ValueError(f"{review_dir / REVIEW_JSON} changed after it was exported to Label Studio project "
                         f"{record['project']}: the tasks name its entries; export it again")
    edited, counts = reviewed_coco(coco, project_tasks(client, record["project"]))
    path = review_dir / REVIEWED_JSON
    write_json_atomic(path, edited)
    return path, counts
