"""Video inference (sam3_train/video): a detector trained here inside transformers' Sam3VideoModel.

Everything runs at tiny sizes with random weights: a video checkpoint saved by the tests (the tiny
preset's detector and a small tracker, ``tiny_video_config``) and another tiny detector standing for
a fine-tuned one. Random tracker weights cannot track, so the tests of the video model's bookkeeping
(stable ids, hot-start removal and delayed output) script the detections and replace the tracker's
per-frame propagation by a stand-in that follows the true objects by overlap (and holds still where
there is none); association, hot-start, memory encoding and our streaming, trimming and output run
for real. The detector path is tested with its real weights against our image path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam3Model, Sam3VideoModel
from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

from sam3_train.data import Batch
from sam3_train.data import rle as rle_ops
from sam3_train.data.frame import InputFrame
from sam3_train.model import Sam3Detector, build_detector, postprocess
from sam3_train.video.cpu_ops import CpuVisionOps
from sam3_train.video.evaluate import evaluate_masklets, identity_consistency, match_frame
from sam3_train.video.frames import FrameFolder, model_inputs, open_frames, to_model_input
from sam3_train.video.masklets import MaskletWriter, frame_masklets, read_masklets
from sam3_train.video.model import DetectorMismatchError, VideoModel, build_video_model, tiny_video_config
from sam3_train.video.moving_shapes import Track, moving_shapes, render, write_moving_shapes
from sam3_train.video.predict import predict_video
from sam3_train.video.session import StreamingSession, TrackingSettings, propagate

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
SIDE = 224  # the tiny preset's input size
# Random weights score every query near 0.25: take every query as a detection, track a few of them.
RANDOM_WEIGHTS = TrackingSettings(score_threshold_detection=0.0, new_det_thresh=0.0, max_num_objects=3)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny video checkpoint (detector A + tracker) and detector B (HF layout), the "fine-tuned" one."""
    root = tmp_path_factory.mktemp("video_ckpt")
    torch.manual_seed(0)
    released = build_detector("tiny", init="transformers")
    video = Sam3VideoModel(tiny_video_config(released.config))
    video.detector_model.load_state_dict(released.state_dict())
    video.save_pretrained(root / "video")
    released.tokenizer.save_pretrained(root / "video")
    torch.manual_seed(1)
    build_detector("tiny").save_pretrained(root / "detector")  # Meta's init: queries and scores spread
    return {"video": root / "video", "detector": root / "detector"}


@pytest.fixture(scope="module")
def model(checkpoints) -> VideoModel:
    return build_video_model(checkpoints["video"], checkpoints["detector"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Path]:
    """A 10-frame moving-shapes video (frames folder, ground truth)."""
    return write_moving_shapes(tmp_path_factory.mktemp("moving"), seed=3, num_frames=10, image_size=SIDE)


def frames_of(folder: Path) -> list[torch.Tensor]:
    return [pixels for _, pixels in model_inputs(open_frames(folder), SIDE)]


def run(model, frames: list[torch.Tensor], phrases: list[str], settings: TrackingSettings):
    """Our bounded streaming propagation: (released frames, session)."""
    settings.apply(model)
    session = StreamingSession(num_frames=len(frames), height=SIDE, width=SIDE)
    session.add_phrases(phrases, model.detector_model.tokenize)
    return list(propagate(model, session, enumerate(frames))), session


# ---------------------------------------------------------------------------------------- building
def test_detector_weights_are_ours_and_tracker_is_untouched(model, checkpoints):
    released = Sam3VideoModel.from_pretrained(checkpoints["video"])
    ours = Sam3Detector.from_pretrained(checkpoints["detector"])
    for name, value in ours.state_dict().items():
        assert torch.equal(model.detector_model.state_dict()[name], value), name
    for prefix in ("tracker_model", "tracker_neck"):
        theirs = getattr(released, prefix).state_dict()
        for name, value in getattr(model, prefix).state_dict().items():
            assert torch.equal(value, theirs[name]), f"{prefix}.{name}"
    assert not torch.equal(model.detector_model.detr_decoder.query_embed.weight,
                           released.detector_model.detr_decoder.query_embed.weight)
    assert model.sam3_vit_change > 0  # detector B's ViT is not the checkpoint's


def test_mismatched_detector_is_refused_naming_the_sizes(checkpoints, tmp_path):
    other = build_detector("tiny", image_size=112, vision_config={"backbone_config": {"hidden_size": 32}})
    other.save_pretrained(tmp_path / "small")
    with pytest.raises(DetectorMismatchError) as err:
        build_video_model(checkpoints["video"], tmp_path / "small")
    message = str(err.value)
    assert "image_size 112 (tracker: 224)" in message and "ViT hidden_size 32 (tracker: 64)" in message
    assert str(tmp_path / "small") in message
    # Sizes the tracker never reads may differ.
    build_detector("tiny", num_queries=20).save_pretrained(tmp_path / "fewer_queries")
    assert build_video_model(checkpoints["video"], tmp_path / "fewer_queries").detector_model.num_queries == 20


def test_lightning_checkpoint_loads_as_the_detector(checkpoints, tmp_path):
    import lightning

    from sam3_train.lit import Sam3LitModule

    torch.manual_seed(2)
    module = Sam3LitModule(preset="tiny")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    video = build_video_model(checkpoints["video"], ckpt)
    for name, value in module.detector.state_dict().items():
        assert torch.equal(video.detector_model.state_dict()[name], value), name


def test_detections_in_the_video_model_equal_the_image_path(model, clip):
    """Frame by frame, the video model's detections (before tracking) are our detector's forward +
    postprocess on the same frame: which queries pass the threshold, scores, pixel boxes, mask logits."""
    frames = frames_of(clip[0])[:3]
    detector = model.detector_model
    input_ids, attention_mask = detector.tokenize(["red star"])

    def image_path(pixels: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
        batch = Batch(images=pixels[None], image_sizes=torch.tensor([[SIDE, SIDE]]), pair_image=torch.tensor([0]),
                      input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            return postprocess(detector(batch), batch, score_threshold=threshold, mask_logits=True)[0]

    scores = image_path(frames[0], 0.0)["scores"]
    threshold = float(scores[9] + scores[10]) / 2  # ten detections on the first frame
    captured = []
    original = model.run_detection

    def spy(inference_session, vision_embeds):
        captured.append(original(inference_session=inference_session, vision_embeds=vision_embeds))
        return captured[-1]

    model.run_detection = spy
    try:
        run(model, frames, ["red star"], TrackingSettings(score_threshold_detection=threshold, det_nms_thresh=0.0,
                                                          new_det_thresh=1.1, hotstart_delay=0))
    finally:
        del model.run_detection
    for pixels, found in zip(frames, captured, strict=True):
        ref, det = image_path(pixels, threshold), found[0]
        order = det["scores"].argsort(descending=True)
        assert len(order) == len(ref["scores"]) > 0
        torch.testing.assert_close(det["scores"][order], ref["scores"], atol=1e-6, rtol=0)
        boxes = (det["bbox"][order] * SIDE).clamp(0, SIDE)
        torch.testing.assert_close(boxes, ref["boxes"], atol=1e-3, rtol=0)
        square = InputFrame(side=SIDE, content=(SIDE, SIDE), original=(SIDE, SIDE))
        logits = square.mask_logits_to_original(det["mask"][order])
        torch.testing.assert_close(logits, ref["mask_logits"], atol=1e-4, rtol=1e-4)
    assert len(captured[0][0]["scores"]) == 10
    # transformers' own Sam3Model in the video model skips the exemplar encoder for text prompts:
    # other scores than the ones the detector was trained to give.
    plain = Sam3Model(detector.config).eval()
    plain.load_state_dict(detector.state_dict())
    with torch.no_grad():
        theirs = plain(pixel_values=frames[0][None], input_ids=input_ids, attention_mask=attention_mask)
    theirs = (theirs.pred_logits.sigmoid() * theirs.presence_logits.sigmoid()).sort(descending=True).values[0, :10]
    assert (theirs - scores[:10]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- streaming
def test_bounded_stream_equals_transformers_whole_video_iterator(model, clip):
    """Frames fed one at a time, the session trimmed after each: the same released frames, ids, hidden
    ids and masks as transformers' propagate_in_video_iterator with the whole video loaded."""
    frames = frames_of(clip[0])
    settings = TrackingSettings(score_threshold_detection=0.0, new_det_thresh=0.0, max_num_objects=3,
                                hotstart_delay=3, hotstart_unmatch_thresh=2, hotstart_dup_thresh=2)
    ours, _ = run(model, frames, ["red star", "circle"], settings)
    whole = Sam3VideoInferenceSession(video=torch.stack(frames), video_height=SIDE, video_width=SIDE,
                                      dtype=torch.float32)  # its default dtype, the string "float32", fails
    whole.add_phrases = types.MethodType(StreamingSession.add_phrases, whole)
    whole.add_phrases(["red star", "circle"], model.detector_model.tokenize)
    theirs = list(model.propagate_in_video_iterator(whole))
    assert [f.frame_idx for f in ours] == [t.frame_idx for t in theirs] == list(range(len(frames)))
    assert whole.hotstart_removed_obj_ids, "the run should exercise hot-start removal"
    for mine, reference in zip(ours, theirs):
        assert sorted(mine.output.obj_id_to_mask) == sorted(reference.obj_id_to_mask)
        for obj_id, mask in reference.obj_id_to_mask.items():
            torch.testing.assert_close(mine.output.obj_id_to_mask[obj_id], mask, atol=1e-5, rtol=0)
    # Hidden at release: suppressed there, or removed by hot-start by then (transformers' processor reads
    # the session's removed ids when the frame comes out; at the end all frames come out at once).
    assert ours[-1].hidden >= whole.hotstart_removed_obj_ids


def test_session_holds_a_bounded_window_on_a_long_video(model):
    """32 frames: at most the current frame's pixels, a fixed window of outputs per object, and the
    session's tensor bytes stop growing once the window is full."""
    torch.manual_seed(5)
    frames = [torch.randn(3, SIDE, SIDE) * 0.5 for _ in range(32)]
    settings = TrackingSettings(score_threshold_detection=0.0, new_det_thresh=0.0, max_num_objects=2,
                                hotstart_delay=0)
    settings.apply(model)
    session = StreamingSession(num_frames=len(frames), height=SIDE, width=SIDE)
    session.add_phrases(["red star"], model.detector_model.tokenize)
    tracker = model.tracker_model.config
    window = max(tracker.num_maskmem, tracker.max_object_pointers_in_encoder) - 1
    held = []
    for frame in propagate(model, session, enumerate(frames)):
        assert len(session.processed_frames) == 0  # the current frame is dropped once done
        for outputs in session.output_dict_per_obj.values():
            assert len(outputs["non_cond_frame_outputs"]) <= window
            assert len(outputs["cond_frame_outputs"]) <= tracker.max_cond_frame_num
            assert all("high_res_masks" not in o for o in outputs["non_cond_frame_outputs"].values())
        assert len(session.obj_id_to_tracker_score_frame_wise) <= 1
        held.append(session.held_bytes())
    assert session.output_dict_per_obj, "objects should be tracked"
    assert max(held[window + 2:]) <= 1.05 * held[window + 1], held


def test_frames_stream_from_a_folder_one_at_a_time(tmp_path):
    for i in (10, 2, 1):
        Image.fromarray(np.full((30, 40, 3), 10 * i, dtype=np.uint8)).save(tmp_path / f"frame{i}.png")
    source = FrameFolder(tmp_path)
    assert source.names == ["frame1.png", "frame2.png", "frame10.png"]  # natural order
    reads = []
    read = source.read
    source.read = lambda i: reads.append(i) or read(i)
    stream = model_inputs(source, 56)
    index, pixels = next(stream)
    assert (index, reads, pixels.shape) == (0, [0], (3, 56, 56))  # nothing read ahead
    torch.testing.assert_close(pixels, torch.full((3, 56, 56), 10 / 255 * 2 - 1))
    assert [i for i, _ in stream] == [1, 2] and reads == [0, 1, 2]


def test_animated_gif_is_a_frame_source(tmp_path):
    frames = [Image.fromarray(np.full((20, 24, 3), v, dtype=np.uint8)) for v in (0, 120, 250)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    source = open_frames(tmp_path / "clip.gif")
    assert len(source) == 3 and source.read(2).shape == (20, 24, 3)
    assert abs(int(source.read(1)[5, 5, 0]) - 120) <= 2


@pytest.mark.parametrize("case", ["missing", "empty", "mp4", "no_phrase"])
def test_bad_inputs_get_one_clear_message(case, tmp_path, checkpoints):
    kwargs = {"video": tmp_path / "frames", "phrases": ["red star"], "video_checkpoint": checkpoints["video"],
              "detector": None, "output": tmp_path / "out"}
    if case == "missing":
        expected = (FileNotFoundError, "frames does not exist")
    elif case == "empty":
        (tmp_path / "frames").mkdir()
        expected = (FileNotFoundError, "holds no frames: put the video's frames there as JPG or PNG")
    elif case == "mp4":
        (tmp_path / "clip.mp4").write_bytes(b"\0")
        kwargs["video"] = tmp_path / "clip.mp4"
        expected = (ValueError, "no video decoder .* is installed.*ffmpeg -i")
    else:
        kwargs["phrases"] = [" ", ""]
        expected = (ValueError, "No noun phrase given")
    with pytest.raises(expected[0], match=expected[1]):
        predict_video(**kwargs)


# ---------------------------------------------------------------------------------------- bookkeeping
class StandIn:
    """Scripted detections and a stand-in for the tracker's propagation (module docstring).

    ``objects[f]``: {name: [S, S] bool} true masks on frame f; ``detections[f]``: names detected on frame
    f (true objects or extra ``blobs``), all with score 0.9 for prompt 0.
    """

    def __init__(self, model, objects, detections, blobs):
        self.model, self.objects, self.detections, self.blobs = model, objects, detections, blobs
        self.size = model.low_res_mask_size
        self.frame = -1
        self.last: dict[int, torch.Tensor] = {}  # object id -> the low-res logits the stand-in gave it last
        self._add = model._tracker_add_new_objects

    def low_res(self, mask: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(mask[None, None].float(), size=(self.size, self.size), mode="nearest-exact")[0, 0]
        return torch.where(small > 0, 10.0, -10.0)

    def run_detection(self, inference_session, vision_embeds):
        self.frame += 1
        names = self.detections[self.frame]
        masks = [self.objects[self.frame].get(n, self.blobs.get(n)) for n in names]
        boxes = torch.tensor([[*(m.nonzero()[:, 1].min(), m.nonzero()[:, 0].min()),
                               *(m.nonzero()[:, 1].max() + 1, m.nonzero()[:, 0].max() + 1)] for m in masks],
                             dtype=torch.float32).reshape(-1, 4) / SIDE
        logits = torch.stack([self.low_res(m) for m in masks]) if masks else torch.zeros(0, self.size, self.size)
        return {0: {"bbox": boxes, "mask": logits, "scores": torch.full((len(masks),), 0.9)}}

    def run_tracker_propagation(self, inference_session, frame_idx, reverse):
        """Each masklet moves to the true object it overlaps most, or stays where it was."""
        truth = [self.low_res(m) > 0 for m in self.objects[frame_idx].values()]
        rows = []
        for obj_id in inference_session.obj_ids:
            last = self.last[obj_id] > 0
            overlaps = [float((last & t).sum() / (last | t).sum().clamp(min=1)) for t in truth]
            best = int(np.argmax(overlaps)) if overlaps else -1
            self.last[obj_id] = self.low_res(truth[best]) if best >= 0 and overlaps[best] > 0.1 else self.last[obj_id]
            rows.append(self.last[obj_id])
        if not rows:
            return torch.zeros(0, self.size, self.size), torch.zeros(0)
        return torch.stack(rows), torch.full((len(rows),), 10.0)

    def _tracker_add_new_objects(self, inference_session, frame_idx, new_obj_ids, new_obj_masks, reverse=False):
        for obj_id, mask in zip(new_obj_ids, new_obj_masks):
            self.last[obj_id] = mask.clone()
        return self._add(inference_session=inference_session, frame_idx=frame_idx, new_obj_ids=new_obj_ids,
                         new_obj_masks=new_obj_masks, reverse=reverse)

    def install(self, monkeypatch):
        for name in ("run_detection", "run_tracker_propagation", "_tracker_add_new_objects"):
            monkeypatch.setattr(self.model, name, getattr(self, name))


def scene(num_frames: int = 10):
    """Shape "a" on every frame, shape "b" from frame 3, a spurious blob detected on frame 2 only."""
    tracks = [Track(1, "star", "red", "large", 26.0, (60.0, 70.0), (2.5, 1.0), 0.0, 0.02, 0, num_frames - 1),
              Track(2, "circle", "blue", "large", 24.0, (160.0, 150.0), (-2.0, 1.5), 0.0, 0.0, 3, num_frames - 1)]
    background = np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)
    rendered = [render(tracks, f, image_size=SIDE, background=background) for f in range(num_frames)]
    images = [to_model_input(image, SIDE) for image, _ in rendered]
    objects = [{"ab"[k - 1]: torch.from_numpy(m) for k, m in visible.items()} for _, visible in rendered]
    blob = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    blob[170:205, 20:55] = True
    detections = [sorted(o) + (["blob"] if f == 2 else []) for f, o in enumerate(objects)]
    return images, objects, detections, {"blob": blob}


def ids_per_object(released, objects) -> dict[str, set[int]]:
    """For each true object, the output ids whose mask overlaps it with IoU >= 0.8 on any frame."""
    found: dict[str, set[int]] = {}
    for frame in released:
        masklets = frame_masklets(frame, image_size=SIDE, height=SIDE, width=SIDE)
        for name, mask in objects[frame.frame_idx].items():
            for obj_id, out in zip(masklets.ids, masklets.masks):
                if float((out & mask).sum() / (out | mask).sum()) >= 0.8:
                    found.setdefault(name, set()).add(obj_id)
    return found


def test_ids_are_stable_and_an_unconfirmed_masklet_is_never_output(model, monkeypatch):
    images, objects, detections, blobs = scene()
    stand_in = StandIn(model, objects, detections, blobs)
    stand_in.install(monkeypatch)
    consumed = []
    stream = ((i, consumed.append(i) or x) for i, x in enumerate(images))
    settings = TrackingSettings(hotstart_delay=4, hotstart_unmatch_thresh=2, hotstart_dup_thresh=2)
    settings.apply(model)
    session = StreamingSession(num_frames=len(images), height=SIDE, width=SIDE)
    session.add_phrases(["shape"], model.detector_model.tokenize)
    released = []
    for frame in propagate(model, session, stream):
        released.append(frame)
        assert len(consumed) == min(frame.frame_idx + 4, len(images))  # held back 4 frames, all out at the end
    assert [f.frame_idx for f in released] == list(range(10))
    found = ids_per_object(released, objects)
    assert len(found["a"]) == 1 and len(found["b"]) == 1 and found["a"] != found["b"]
    blob_id = 1  # born on frame 2, after "a" (0); "b" is 2
    assert session.hotstart_removed_obj_ids == {blob_id}
    for frame in released:
        shown = frame_masklets(frame, image_size=SIDE, height=SIDE, width=SIDE).ids
        assert blob_id not in shown
        assert set(shown) == {0} | ({2} if frame.frame_idx >= 3 else set())


def test_without_delay_the_unconfirmed_masklet_is_output(model, monkeypatch):
    images, objects, detections, blobs = scene()
    StandIn(model, objects, detections, blobs).install(monkeypatch)
    released, session = run(model, images, ["shape"], TrackingSettings(hotstart_delay=0))
    shown = frame_masklets(released[2], image_size=SIDE, height=SIDE, width=SIDE)
    blob = shown.masks[shown.ids.index(1)]
    assert float((blob & blobs["blob"]).sum() / (blob | blobs["blob"]).sum()) > 0.8
    assert not session.hotstart_removed_obj_ids  # no delay window: nothing is judged unconfirmed


@pytest.mark.parametrize("fixed", [True, False])
def test_masks_stay_with_their_ids_on_a_removal_frame(model, monkeypatch, fixed):
    """Frame 4 removes the blob (id 1), listed between "a" (0) and "b" (2): transformers' build_outputs
    gives "b" the blob's mask on that frame; VideoModel keeps each mask with its id."""
    images, objects, detections, blobs = scene()
    StandIn(model, objects, detections, blobs).install(monkeypatch)
    if not fixed:
        monkeypatch.setattr(model, "build_outputs", types.MethodType(Sam3VideoModel.build_outputs, model))
    released, _ = run(model, images, ["shape"],
                      TrackingSettings(hotstart_delay=4, hotstart_unmatch_thresh=2, hotstart_dup_thresh=2))
    on_frame_4 = frame_masklets(released[4], image_size=SIDE, height=SIDE, width=SIDE)
    b_mask = on_frame_4.masks[on_frame_4.ids.index(2)]
    truth = objects[4]["b"] if fixed else blobs["blob"]
    assert float((b_mask & truth).sum() / (b_mask | truth).sum()) > 0.8


# ---------------------------------------------------------------------------------------- outputs
def test_cli_end_to_end(checkpoints, clip, tmp_path):
    """The real command (python -m sam3_train.console predict-video) on a generated clip, with --gt."""
    frames, gt = clip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sam3_train.console", "predict-video", "--video", str(frames),
           "--phrases", "red star", "circle", "--video_checkpoint", str(checkpoints["video"]),
           "--detector", str(checkpoints["detector"]), "--output", str(out), "--gt", str(gt),
           "--score_threshold_detection", "0", "--new_det_thresh", "0", "--max_num_objects", "2",
           "--hotstart_delay", "3", "--hotstart_unmatch_thresh", "2", "--hotstart_dup_thresh", "2", "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict-video: 10 frames" in proc.stdout and "identity consistency" in proc.stdout
    record = read_masklets(out / "masklets.json")
    assert record["videos"][0]["length"] == 10 and [c["name"] for c in record["categories"]] == ["red star", "circle"]
    assert record["info"]["settings"]["hotstart_delay"] == 3
    assert record["annotations"], "random weights with thresholds at 0 still give masklets"
    for ann in record["annotations"]:
        assert len(ann["segmentations"]) == 10 and ann["phrase"] in ("red star", "circle")
        for rle, box in zip(ann["segmentations"], ann["bboxes"]):
            assert (rle is None) == (box is None)
            if rle is not None:
                assert rle_ops.decode(rle).shape == (SIDE, SIDE) and rle_ops.decode(rle).any()
    assert len({a["object_id"] for a in record["annotations"]}) == len(record["annotations"])  # one per id
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == [f"{i:05d}" for i in range(10)]
    assert Image.open(overlays[0]).size == (SIDE, SIDE)
    with Image.open(out / "masklets.gif") as gif:
        assert gif.n_frames == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"cgF1", "pmF1", "IL_MCC", "identity_consistency", "id_switches", "gt_tracks"} <= set(metrics)


def test_cli_error_exits_with_a_message(checkpoints, tmp_path, capsys):
    from sam3_train.console import main

    with pytest.raises(SystemExit) as exit_:
        main(["predict-video", "--video", str(tmp_path / "nowhere"), "--phrases", "star",
              "--video_checkpoint", str(checkpoints["video"]), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "predict-video: error: Video" in capsys.readouterr().err


def test_writer_keeps_one_colour_and_one_annotation_per_id(tmp_path):
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, :5, :5] = True
    masks[1, 10:, 10:20] = True
    from sam3_train.video.masklets import Masklets

    writer = MaskletWriter(tmp_path, phrases=["a", "b"], file_names=["0.jpg", "1.jpg"], height=20, width=30, gif=False)
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    writer.add(0, image, Masklets([3, 7], ["a", "b"], torch.tensor([0.9, 0.8]), masks,
                                   torch.tensor([[0, 0, 5, 5], [10, 10, 20, 20]], dtype=torch.float32)))
    writer.add(1, image, Masklets([7], ["b"], torch.tensor([0.8]), masks[1:], torch.tensor([[10, 10, 20, 20.0]])))
    record = json.loads(writer.close()["json"].read_text())
    by_id = {a["object_id"]: a for a in record["annotations"]}
    assert by_id[3]["segmentations"][1] is None and by_id[7]["segmentations"][1] is not None
    assert by_id[7]["bboxes"][0] == [10, 10, 10, 10] and by_id[7]["category_id"] == 2
    first, second = (np.asarray(Image.open(tmp_path / "overlays" / f"{i}.png")) for i in (0, 1))
    assert (first[15, 15] == second[15, 15]).all() and first[15, 15].any()  # id 7 in one colour on both frames


# ---------------------------------------------------------------------------------------- metrics
def square(x: int, y: int, side: int = 4, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_identity_consistency_on_hand_made_tracks():
    gt = [{1: square(0, 0), 2: square(8, 8)} for _ in range(10)]
    perfect = [{5: square(0, 0), 6: square(8, 8)} for _ in range(10)]
    assert identity_consistency(gt, perfect) == {"identity_consistency": 1.0, "consistent_tracks": 2.0,
                                                 "gt_tracks": 2.0, "id_switches": 0.0}
    # Track 2 switches id halfway (5 + 5 frames): no id covers more than half of it.
    halfway = [{5: square(0, 0), (6 if f < 5 else 7): square(8, 8)} for f in range(10)]
    assert identity_consistency(gt, halfway) == {"identity_consistency": 0.5, "consistent_tracks": 1.0,
                                                 "gt_tracks": 2.0, "id_switches": 1.0}
    # A switch after 6 of 10 frames: id 6 still covers most of it.
    late = [{5: square(0, 0), (6 if f < 6 else 7): square(8, 8)} for f in range(10)]
    assert identity_consistency(gt, late)["identity_consistency"] == 1.0
    # Found on 5 frames only, or never above IoU 0.5 (a 4x4 square shifted by 2: IoU 1/3).
    sparse = [{5: square(0, 0)} if f % 2 else {} for f in range(10)]
    shifted = [{5: square(2, 0), 6: square(8, 8)} for _ in range(10)]
    assert identity_consistency([{1: square(0, 0)}] * 10, sparse)["identity_consistency"] == 0.0
    assert identity_consistency(gt, shifted) == {"identity_consistency": 0.5, "consistent_tracks": 1.0,
                                                 "gt_tracks": 2.0, "id_switches": 0.0}
    # One prediction never stands for two tracks on one frame.
    assert match_frame({1: square(0, 0), 2: square(0, 0)}, {9: square(0, 0)}) in ({1: 9}, {2: 9})


def test_perfect_masklets_score_full_marks(clip):
    gt = read_masklets(clip[1])
    pred = json.loads(json.dumps(gt))
    for ann in pred["annotations"]:
        ann["id"] += 100
    phrases = sorted({a["phrase"] for a in gt["annotations"]}) + ["hexagon that is absent"]
    scores = evaluate_masklets(pred, gt, phrases=phrases)
    assert scores["identity_consistency"] == 1.0 and scores["id_switches"] == 0
    assert scores["cgF1"] > 99.9 and scores["num_pairs"] == 10 * len(phrases)
    # Drop one track: its frames become misses, its track inconsistent.
    pred["annotations"] = pred["annotations"][1:]
    fewer = evaluate_masklets(pred, gt, phrases=phrases)
    assert fewer["consistent_tracks"] == scores["consistent_tracks"] - 1 and fewer["cgF1"] < scores["cgF1"]


def test_moving_shapes_masks_follow_their_tracks(clip):
    tracks, frames = moving_shapes(3, num_frames=10, image_size=SIDE)
    gt = read_masklets(clip[1])
    assert len(sorted(clip[0].glob("*.jpg"))) == 10 == gt["videos"][0]["length"]
    assert [a["phrases"] for a in gt["annotations"]] == [t.phrases for t in tracks]
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for f, (image, visible) in enumerate(frames):
        assert image.shape == (SIDE, SIDE, 3)
        for track in tracks:
            cx, cy = track.centre(f, SIDE)
            if track.track_id in visible:  # inside its circumcircle (+ rasterisation), only while it lives
                assert track.first <= f <= track.last
                outside = (xx - cx) ** 2 + (yy - cy) ** 2 > (track.radius + 1.5) ** 2
                assert not (visible[track.track_id] & outside).any()
            stored = gt["annotations"][track.track_id - 1]["segmentations"][f]
            assert (stored is None) == (track.track_id not in visible)
            if f:
                px, py = track.centre(f - 1, SIDE)
                assert abs(cx - px) <= abs(track.velocity[0]) + 1e-6 and abs(cy - py) <= abs(track.velocity[1]) + 1e-6


# ---------------------------------------------------------------------------------------- CPU ops
def test_cpu_nms_and_connected_components():
    ious = torch.tensor([[1.0, 0.6, 0.0], [0.6, 1.0, 0.05], [0.0, 0.05, 1.0]])
    kept = CpuVisionOps.generic_nms(ious, torch.tensor([0.5, 0.9, 0.7]), 0.1)
    assert kept.tolist() == [1, 2]  # 0 overlaps the better 1; 2 overlaps 1 by only 0.05
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    mask[0, 0, 0, 0] = mask[0, 0, 1, 1] = 1  # diagonal neighbours: one 8-connected component
    mask[0, 0, 4, 2:5] = 1
    labels, counts = CpuVisionOps.cc_2d(mask)
    assert counts[0, 0, 0, 0] == counts[0, 0, 1, 1] == 2 and counts[0, 0, 4, 3] == 3 and counts[0, 0, 2, 2] == 0
    assert labels[0, 0, 0, 0] == labels[0, 0, 1, 1] != labels[0, 0, 4, 4]
