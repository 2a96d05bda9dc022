"""Label Studio: brush masks, the labelling configs, review.json <-> tasks, the reviewers' decisions
imported through the COCO review's own import, the concept backend; and (slow) the whole round trip
against a real Label Studio server with the backend answering the server's request."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import LABEL_STUDIO_TOKEN, EngineFrame, free_port, png_bytes, write_shards
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.engine import (
    ExhaustivityVerifier,
    ScoreVerifier,
    StabilityVerifier,
    VerifierChain,
    export_review,
    import_review,
    pseudo_sample,
    read_samples,
)
from sam3_train.engine.label_studio import (
    brush_to_mask,
    concept_config,
    control_names,
    mask_to_brush,
    review_config,
    review_tasks,
    reviewed_coco,
)
from sam3_train.engine.label_studio.backend import ConceptBackend, ConceptPredictor, prompt_of, serve
from sam3_train.engine.label_studio.client import export_project, import_project, local_files_url, project_tasks
from sam3_train.engine.label_studio.tasks import PAIR, brush_region
from sam3_train.engine.review import import_round
from sam3_train.model import build_detector

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # pycocotools
H, W = 24, 32
KEY = "00000007_photo"
FRAME = EngineFrame(H, W)
box_mask = FRAME.box_mask


# ------------------------------------------------------------------------------------------------ fixtures
def review_set(out_dir, *, only_flagged: bool = True):
    """A review set of one image (test_engine_review.py's): red square (a kept and a rejected instance,
    flagged), circle (kept + rejected, uncertain), blue star (a mined negative), star (confident)."""
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8),
                                     ExhaustivityVerifier(low=0.2, high=0.7)])
    k1, r1 = box_mask(1, 1, 6, 6), box_mask(10, 2, 14, 6)
    pairs = [
        chain(FRAME.candidate([0.95, 0.9, 0.05], [k1, r1, box_mask(20, 20, 22, 22)], phrase="red square", key=KEY,
                              loose=[k1, box_mask(9, 1, 15, 7), box_mask(20, 20, 22, 22)])),
        chain(FRAME.candidate([0.9, 0.45], [box_mask(2, 12, 8, 18), box_mask(20, 4, 26, 10)], phrase="circle",
                              key=KEY)),
        chain(FRAME.candidate([0.99], [box_mask(16, 14, 22, 20)], phrase="star", key=KEY)),
        chain(FRAME.candidate([0.3], [box_mask(16, 14, 22, 20)], phrase="blue star", key=KEY)),
    ]
    image = png_bytes(H, W, value=90)
    base = {"image_id": 7, "width": W, "height": H, "queries": [], "source": {"dataset": "pool"}}
    meta, _ = pseudo_sample(base, pairs, negatives=["blue star"])
    export_review(out_dir=out_dir, images=[(image, "png", meta, pairs)], only_flagged=only_flagged)
    return json.loads((out_dir / "review.json").read_text()), {KEY: meta}, image


@pytest.fixture
def exported(tmp_path):
    coco, samples, _ = review_set(tmp_path / "review", only_flagged=False)  # "star" too: a pair left unreviewed
    # a detector's box is not its mask's tight box (here they are equal): an unedited task must keep it
    circle = next(q for q in samples[KEY]["queries"] if q["phrase"] == "circle")
    kept = next(a for a in coco["annotations"] if a["sam3_train"]["phrase"] == "circle"
                and a["sam3_train"]["status"] == "kept")
    kept["bbox"] = circle["instances"][0]["box"] = [1.5, 11.5, 6.25, 5.75]
    return coco, samples, review_tasks(coco, image_url=lambda name: f"/data/local-files/?d=review/{name}")


def submit(task, result, **extra):
    """The task as the server returns it after a reviewer submitted ``result``."""
    annotation = {"id": 1, "result": result, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z", **extra}
    return {**task, "id": task["data"][PAIR], "annotations": [annotation]}


def regions(task):
    """The task's prediction as a reviewer starts from it: region id -> its results (brush, status)."""
    out = {}
    for item in task["predictions"][0]["result"]:
        out.setdefault(item["id"], []).append(copy.deepcopy(item))
    return out


def by_phrase(tasks):
    return {t["data"]["phrase"]: t for t in tasks}


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("shape", [(24, 32), (7, 5), (1, 1), (33, 17)])
def test_brush_masks_round_trip_exactly(shape):
    rng = np.random.default_rng(sum(shape))
    masks = [np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) > 0.5, rng.random(shape) > 0.95]
    for mask in masks:
        rle = mask_to_brush(mask)
        assert all(isinstance(v, int) and 0 <= v < 256 for v in rle)  # bytes, as the editor stores them
        assert np.array_equal(brush_to_mask(rle, *shape), mask)


def test_brush_mask_of_the_wrong_size_is_refused():
    rle = mask_to_brush(np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="20 pixels does not fit a 5 x 5 image"):
        brush_to_mask(rle, 5, 5)


# ------------------------------------------------------------------------------------------------ configs
def test_review_config_parses_with_every_phrase_as_a_brush_label():
    phrases = ["red square", 'a "quoted" <b> & c', "circle"]
    names = control_names(review_config(phrases))
    assert names.brush_labels == tuple(phrases) and names.image == "image" and names.image_value == "image"
    assert names.phrase is None and names.exemplar is None


def test_concept_config_names_the_prompt_tags():
    names = control_names(concept_config(["object", "car"]))
    assert (names.phrase, names.exemplar, names.brush, names.brush_labels) == ("phrase", "exemplar", "mask",
                                                                               ("object", "car"))


@pytest.mark.parametrize(("config", "message"), [
    ("<View><Image name='i' value='$i'/></View>", "BrushLabels"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='m' toName='i'/></View>", "no <Label>"),
    ("<View><Image", "not valid XML"),
])
def test_configs_the_backend_cannot_answer_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        control_names(config)


# ------------------------------------------------------------------------------------------------ export
def test_tasks_carry_the_engine_masks_scores_and_verdicts(exported):
    coco, _, tasks = exported
    assert [t["data"]["phrase"] for t in tasks] == [e["sam3_train"]["phrase"] for e in coco["images"]]
    assert all(t["data"]["image"] == f"/data/local-files/?d=review/images/{KEY}.png" for t in tasks)
    for task, entry in zip(tasks, coco["images"]):
        prediction = task["predictions"][0]
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        got = regions(task)
        assert sorted(got) == sorted([f"a{a['id']}" for a in anns] + ["exhaustive"])
        for ann in anns:
            brush, status = got[f"a{ann['id']}"]
            assert np.array_equal(brush_to_mask(brush["value"]["rle"], H, W), rle_ops.decode(ann["segmentation"]))
            assert brush["score"] == ann["score"] and brush["value"]["brushlabels"] == [entry["sam3_train"]["phrase"]]
            assert status["value"]["choices"] == [ann["sam3_train"]["status"]]
        expected = "exhaustive" if entry["sam3_train"]["exhaustive"] else "not exhaustive"
        assert got["exhaustive"][0]["value"]["choices"] == [expected]
        assert prediction["score"] == max((a["score"] for a in anns), default=0.0)


# ------------------------------------------------------------------------------------------------ import
def test_unedited_review_imports_as_no_change(exported):
    coco, samples, tasks = exported
    submitted = [submit(t, t["predictions"][0]["result"]) for t in tasks]
    edited, counts = reviewed_coco(coco, submitted)
    assert counts["reviewed"] == len(tasks) and counts["added"] == counts["edited"] == 0
    assert [(a["segmentation"], a["bbox"]) for a in edited["annotations"]] == \
        [(a["segmentation"], a["bbox"]) for a in coco["annotations"]]  # the detector's boxes kept
    new, changed = import_review(edited, samples)
    assert changed == [] and new == samples


def test_reviewer_decisions_import_exactly_and_twice_as_once(exported):
    coco, samples, tasks = exported
    tasks = by_phrase(tasks)
    # red square: accept the rejected (unstable) instance; the pair is complete now
    square = regions(tasks["red square"])
    rejected = next(r for r in square.values() if r[-1]["value"]["choices"] == ["rejected"])
    rejected[1]["value"]["choices"] = ["kept"]
    square["exhaustive"][0]["value"]["choices"] = ["exhaustive"]
    # circle: delete the kept instance, draw the missed one
    circle = regions(tasks["circle"])
    kept = next(k for k, r in circle.items() if r[-1]["value"]["choices"] == ["kept"])
    del circle[kept]
    added = box_mask(20, 10, 28, 16).numpy()
    circle["new"] = [brush_region(added, "circle", region_id="new")]
    # blue star: a mined negative the reviewer finds incomplete; star: skipped (not reviewed)
    star = regions(tasks["blue star"])
    star["exhaustive"][0]["value"]["choices"] = ["not exhaustive"]
    flat = lambda rs: [item for r in rs.values() for item in r]  # noqa: E731
    submitted = [submit(tasks["red square"], flat(square)), submit(tasks["circle"], flat(circle)),
                 submit(tasks["blue star"], flat(star)),
                 {**tasks["star"], "annotations": [{"id": 9, "result": [], "was_cancelled": True}]}]
    edited, counts = reviewed_coco(coco, submitted)
    assert counts == {"tasks": 4, "reviewed": 3, "labels": 3, "rejected": 2, "added": 1, "edited": 0}
    new, changed = import_review(edited, samples)
    assert changed == [(KEY, "blue star"), (KEY, "circle"), (KEY, "red square")]
    old = {q["phrase"]: q for q in samples[KEY]["queries"]}
    after = {q["phrase"]: q for q in new[KEY]["queries"]}
    assert after["star"] == old["star"]
    assert after["blue star"] == {**old["blue star"], "exhaustive": False}
    assert len(after["red square"]["instances"]) == 2 and after["red square"]["exhaustive"] is True
    assert after["red square"]["instances"][0] == old["red square"]["instances"][0]
    (circle_label,) = after["circle"]["instances"]
    assert np.array_equal(rle_ops.decode(circle_label["rle"]), added.astype(np.uint8))
    assert circle_label["box"] == [20.0, 10.0, 8.0, 6.0]  # an added mask's tight box
    again, changed_again = import_review(reviewed_coco(coco, submitted)[0], new)
    assert changed_again == [] and again == new  # importing the same decisions again changes nothing


def test_the_latest_annotation_counts_and_foreign_tasks_are_refused(exported):
    coco, samples, tasks = exported
    task = by_phrase(tasks)["circle"]
    older = {"id": 1, "result": task["predictions"][0]["result"], "updated_at": "2026-01-01T00:00:00Z"}
    newer = {"id": 2, "result": [], "updated_at": "2026-01-02T00:00:00Z"}  # every region deleted
    edited, _ = reviewed_coco(coco, [{**task, "annotations": [newer, older]}])
    new, changed = import_review(edited, samples)
    assert changed == [(KEY, "circle")] and next(q for q in new[KEY]["queries"] if q["phrase"] == "circle")[
        "instances"] == []
    foreign = {**task, "data": {**task["data"], PAIR: 99}, "annotations": [older]}
    with pytest.raises(ValueError, match="not in this review set"):
        reviewed_coco(coco, [foreign])
    relabelled = copy.deepcopy(older)
    relabelled["result"][0]["value"]["brushlabels"] = ["dog"]
    with pytest.raises(ValueError, match="dog"):
        reviewed_coco(coco, [{**task, "annotations": [relabelled]}])


# ------------------------------------------------------------------------------------------------ backend
def test_prompt_from_the_editor_context_in_pixels():
    task = {"data": {"image": "x", "phrase": "circle"}}
    context = {"result": [
        {"type": "textarea", "from_name": "phrase", "value": {"text": [" red square "]}},
        {"type": "rectanglelabels", "from_name": "exemplar", "original_width": 200, "original_height": 100,
         "value": {"x": 10.0, "y": 20.0, "width": 50.0, "height": 25.0, "rectanglelabels": ["exemplar"]}},
    ]}
    assert prompt_of(task, context, phrase_tag="phrase", exemplar_tag="exemplar") == (
        "red square", [[20.0, 20.0, 120.0, 45.0]])
    assert prompt_of(task, {"result": context["result"][1:]}, phrase_tag="phrase", exemplar_tag="exemplar")[0] == \
        "visual"  # boxes alone: Meta's phrase for a geometric prompt
    assert prompt_of(task, None, phrase_tag="phrase", exemplar_tag="exemplar") == ("circle", [])
    assert prompt_of({"data": {}}, {"result": []}, phrase_tag="phrase", exemplar_tag=None) == (None, [])


def test_backend_answers_with_brush_masks_of_the_image_size(tmp_path):
    torch.manual_seed(0)
    predictor = ConceptPredictor(detector=build_detector("tiny"), score_threshold=0.0, max_detections=3)
    image = np.zeros((H, W, 3), np.uint8)
    image[4:12, 6:20] = (200, 30, 30)
    (tmp_path / "pics").mkdir()
    Image.fromarray(image).save(tmp_path / "pics" / "a.png")
    backend = ConceptBackend(predictor=predictor, document_root=tmp_path)
    config = concept_config(["object"])
    assert backend.setup({"schema": config}) == {"model_version": "sam3-train"}
    body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=pics/a.png"}}], "label_config": config,
            "params": {"context": {"result": [{"type": "textarea", "from_name": "phrase",
                                               "value": {"text": ["red square"]}}]}}}
    (answer,) = backend.predict(body)["results"]
    found = predictor(image, "red square")
    assert len(answer["result"]) == len(found["scores"]) == 3  # threshold 0: max_detections
    for region, mask, score in zip(answer["result"], found["masks"], found["scores"]):
        assert region["from_name"] == "mask" and region["to_name"] == "image" and region["type"] == "brushlabels"
        assert region["value"]["brushlabels"] == ["object"] and region["score"] == pytest.approx(float(score))
        assert (region["original_width"], region["original_height"]) == (W, H)
        assert np.array_equal(brush_to_mask(region["value"]["rle"], H, W), mask.numpy())
    assert answer["score"] == pytest.approx(float(found["scores"].max()))
    with pytest.raises(ValueError, match="outside the document root"):
        backend.load_image("/data/local-files/?d=../../etc/passwd")


# ------------------------------------------------------------------------------------------------ a real server
def write_round(round_dir: Path, samples: dict, image: bytes) -> None:
    """A round whose shards are written (what import_round reads): its shards and shards.json."""
    paths = write_shards(round_dir / "shards-rank000", "pseudo", samples, image)
    (round_dir / "shards.json").write_text(json.dumps(
        {"shards": {"0": [{"path": str(Path(p).relative_to(round_dir))} for p in paths]}, "inputs": {}}))


def as_reviewer(client, task_id: int, result: list, *, cancelled: bool = False) -> None:
    client.annotations.create(id=task_id, result=result, was_cancelled=cancelled, lead_time=12.5)


@pytest.mark.slow
def test_round_trip_through_a_real_label_studio_server(label_studio, tmp_path):
    client, root = label_studio["client"], tmp_path
    review_dir, round_dir = root / "review", root / "engine" / "round-001"
    coco, samples, image = review_set(review_dir, only_flagged=False)
    write_round(round_dir, samples, image)
    record = export_project(client=client, review_dir=review_dir, document_root=label_studio["root"])
    assert record["tasks"] == 4 and json.loads((review_dir / "label_studio.json").read_text()) == record
    tasks = by_phrase(project_tasks(client, record["project"]))
    assert sorted(tasks) == ["blue star", "circle", "red square", "star"]
    served = httpx.get(label_studio["url"] + tasks["circle"]["data"]["image"],
                       headers={"Authorization": f"Token {LABEL_STUDIO_TOKEN}"}, timeout=30)
    assert served.status_code == 200 and served.content == image  # local-files storage serves the review's image
    predicted = {p: client.tasks.get(id=t["id"]).predictions[0] for p, t in tasks.items()}
    assert predicted["circle"].score == 0.9 and predicted["circle"].model_version == "sam3-train-review"

    def start_from(phrase):  # the editor copies the prediction into the reviewer's annotation
        out = {}
        for item in predicted[phrase].result:
            out.setdefault(item["id"], []).append(copy.deepcopy(item))
        return out

    flat = lambda rs: [item for r in rs.values() for item in r]  # noqa: E731
    square = start_from("red square")  # accept the rejected instance, mark the pair exhaustive
    next(r for r in square.values() if r[-1]["value"]["choices"] == ["rejected"])[1]["value"]["choices"] = ["kept"]
    square["exhaustive"][0]["value"]["choices"] = ["exhaustive"]
    as_reviewer(client, tasks["red square"]["id"], flat(square))
    circle = start_from("circle")  # delete the kept instance, add the missed one
    del circle[next(k for k, r in circle.items() if r[-1]["value"]["choices"] == ["kept"])]
    added = box_mask(20, 10, 28, 16).numpy()
    circle["new1"] = [brush_region(added, "circle", region_id="new1")]
    as_reviewer(client, tasks["circle"]["id"], flat(circle))
    star = start_from("blue star")  # not exhaustive after all
    star["exhaustive"][0]["value"]["choices"] = ["not exhaustive"]
    as_reviewer(client, tasks["blue star"]["id"], flat(star))
    as_reviewer(client, tasks["star"]["id"], [], cancelled=True)  # skipped: the pair stays as it is

    path, counts = import_project(client=client, review_dir=review_dir)
    assert counts == {"tasks": 4, "reviewed": 3, "labels": 3, "rejected": 2, "added": 1, "edited": 0}
    result = import_round(round_dir=round_dir, review=path)
    assert result["changed"] == [[KEY, "blue star"], [KEY, "circle"], [KEY, "red square"]]
    written = json.loads((round_dir / "shards.json").read_text())
    assert written["reviews"][0]["file"] == str(path)
    (key, _, _, meta), = read_samples([str(round_dir / e["path"]) for e in written["shards"]["0"]])
    old = {q["phrase"]: q for q in samples[KEY]["queries"]}
    new = {q["phrase"]: q for q in meta["queries"]}
    assert key == KEY and new["star"] == old["star"]
    assert new["blue star"] == {**old["blue star"], "exhaustive": False}
    assert new["red square"]["exhaustive"] is True and len(new["red square"]["instances"]) == 2
    assert new["red square"]["instances"][0] == old["red square"]["instances"][0]
    (label,) = new["circle"]["instances"]
    assert np.array_equal(rle_ops.decode(label["rle"]), added.astype(np.uint8))

    before = path.read_bytes()
    path, _ = import_project(client=client, review_dir=review_dir)  # again: the same decisions, the same file
    assert path.read_bytes() == before
    assert import_round(round_dir=round_dir, review=path) == {"changed": [], "shards": None}


@pytest.mark.slow
def test_concept_backend_answers_the_servers_interactive_request(label_studio, tmp_path):
    client, root = label_studio["client"], tmp_path
    torch.manual_seed(0)
    build_detector("tiny").save_pretrained(tmp_path / "tiny")  # random weights: the answer's shape is under test
    backend = ConceptBackend(predictor=ConceptPredictor.from_path(tmp_path / "tiny"), document_root=label_studio["root"])
    server = serve(backend, port=free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (root / "concepts").mkdir()
        picture = np.zeros((H, W, 3), np.uint8)
        picture[4:12, 6:20] = (200, 30, 30)
        Image.fromarray(picture).save(root / "concepts" / "a.png")
        project = client.projects.create(title="SAM 3 concepts", label_config=concept_config(["object"]))
        client.import_storage.local.create(project=project.id, path=str(root / "concepts"), use_blob_urls=False)
        client.projects.import_tasks(id=project.id, request=[
            {"data": {"image": local_files_url(root / "concepts" / "a.png", label_studio["root"])}}])
        (task,) = project_tasks(client, project.id)
        ml = client.ml.create(url=f"http://127.0.0.1:{server.server_address[1]}", project=project.id,
                              is_interactive=True, title="SAM 3 concepts")
        assert client.ml.get(id=ml.id).state == "CO"  # connected: the server called /health and /setup
        context = {"result": [
            {"type": "textarea", "from_name": "phrase", "to_name": "image", "value": {"text": ["red square"]}},
            {"type": "rectanglelabels", "from_name": "exemplar", "to_name": "image", "original_width": W,
             "original_height": H, "value": {"x": 18.75, "y": 16.67, "width": 43.75, "height": 33.33,
                                             "rectanglelabels": ["exemplar"]}}]}
        answer = httpx.post(f"{label_studio['url']}/api/ml/{ml.id}/interactive-annotating",
                            json={"task": task["id"], "context": context},
                            headers={"Authorization": f"Token {LABEL_STUDIO_TOKEN}"}, timeout=120)
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["data"]  # what the server hands the editor: the backend's first result
        regions = prediction["result"]
        assert regions and prediction["model_version"] == "sam3-train"
        for region in regions:
            assert (region["from_name"], region["to_name"], region["type"]) == ("mask", "image", "brushlabels")
            assert region["value"]["brushlabels"] == ["object"] and 0.0 <= region["score"] <= 1.0
            assert brush_to_mask(region["value"]["rle"], H, W).shape == (H, W)  # decodes to the image size
        assert prediction["score"] == max(r["score"] for r in regions)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
