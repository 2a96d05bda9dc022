"""K-shot subsets (K images per category, seeded; data/kshot.py) through tools/make_shards.py, valid COCO
with absent categories as negatives, and tools/kshot.py's runner (commands, mean and spread, a real run)."""

from __future__ import annotations

import json
import random
import statistics
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sam3_train.data.kshot import images_per_category, kshot_subset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import kshot  # noqa: E402
import make_shards  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CATEGORIES = {1: "cat", 2: "dog", 3: "traffic_light", 4: "kite", 5: "rare_bird"}


def _coco(root: Path, n_images: int = 60) -> Path:
    """A small COCO set: 32x32 images with 1-2 rectangles of categories 1-4; category 5 on 3 images only;
    image 0 has no annotation; one crowd annotation."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n_images):
        Image.fromarray(np.full((32, 32, 3), i * 4 % 255, np.uint8)).save(root / "images" / f"im{i}.png")
        images.append({"id": 1000 + i, "file_name": f"im{i}.png", "width": 32, "height": 32})
        cats = [] if i == 0 else rng.sample([1, 2, 3, 4], rng.choice([1, 2])) + ([5] if i in (5, 17, 40) else [])
        for c in cats:
            x, y = rng.randrange(0, 20), rng.randrange(0, 20)
            annotations.append({"id": len(annotations) + 1, "image_id": 1000 + i, "category_id": c,
                                "bbox": [x, y, 8, 8], "area": 64.0, "iscrowd": int(i == 7 and c == cats[0]),
                                "segmentation": [[x, y, x + 8, y, x + 8, y + 8, x, y + 8]]})
    coco = {"info": {"description": "test"}, "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": k, "name": v, "supercategory": "x"} for k, v in CATEGORIES.items()]}
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def coco_path(tmp_path_factory) -> Path:
    return _coco(tmp_path_factory.mktemp("kshot"))


def test_subset_has_k_images_per_category_and_is_reproducible_per_seed(coco_path):
    coco = json.loads(coco_path.read_text())
    full = images_per_category(coco)
    for shots in (1, 3, 5):
        subset = kshot_subset(coco, shots=shots, seed=0)
        per_cat = images_per_category(subset)
        for cat, n in full.items():
            assert per_cat.get(cat, 0) >= min(shots, n)  # every category K images, a rare one all it has
        if shots >= 3:
            assert per_cat[5] == 3  # the rare category keeps all three of its images
        # greedy: each kept image was needed, so there are at most K images per category in all
        assert len(subset["images"]) <= shots * len(CATEGORIES)
        assert subset == kshot_subset(coco, shots=shots, seed=0)
        ids = {e["id"] for e in subset["images"]}
        assert {a["image_id"] for a in subset["annotations"]} == ids
        assert [a for a in coco["annotations"] if a["image_id"] in ids] == subset["annotations"]  # all kept
        assert 1000 not in ids  # an image without annotations is never a shot
        assert subset["categories"] == coco["categories"] and subset["info"]["kshot"]["shots"] == shots
    seeds = {tuple(sorted(e["id"] for e in kshot_subset(coco, shots=3, seed=s)["images"])) for s in range(5)}
    assert len(seeds) > 1  # another seed, another subset
    with pytest.raises(ValueError, match="at least 1"):
        kshot_subset(coco, shots=0, seed=0)


def test_make_shards_writes_the_subset_as_shards_and_valid_coco(coco_path, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["coco", "--annotations", str(coco_path), "--images", str(coco_path.parent / "images"), "--shots", "3",
            "--seed", "7", "--out", str(out), "--quiet"]
    assert make_shards.main(args) == 0
    printed = capsys.readouterr().out
    subset_json = out / "coco-3shot-seed7.json"
    assert f"subset COCO JSON: {subset_json}" in printed
    api = COCO(str(subset_json))  # pycocotools indexes it: valid COCO
    expected = kshot_subset(json.loads(coco_path.read_text()), shots=3, seed=7)
    assert sorted(api.getImgIds()) == sorted(e["id"] for e in expected["images"])
    metas = []
    for shard in sorted(out.glob("coco-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(m["image_id"] for m in metas) == sorted(api.getImgIds())
    for meta in metas:  # every category is a query: present ones positive, absent ones negatives
        phrases = {q["phrase"]: q for q in meta["queries"]}
        assert set(phrases) == {n.replace("_", " ") for n in CATEGORIES.values()}
        present = {api.cats[a["category_id"]]["name"].replace("_", " ") for a in api.imgToAnns[meta["image_id"]]}
        assert {p for p, q in phrases.items() if q["instances"]} == present
    again = tmp_path / "again"
    assert make_shards.main([*args[:-3], "--out", str(again), "--quiet"]) == 0
    assert (again / "coco-3shot-seed7.json").read_text() == subset_json.read_text()


def test_runner_aggregates_mean_and_sample_spread():
    summaries = {s: {"sets": {"domain": {"zero_shot": 10.0, "best": b, "last": b - 1, "at_selected": b}}}
                 for s, b in [(0, 20.0), (1, 24.0), (2, 22.0)]}
    result = kshot.aggregate(summaries)
    assert result["domain"]["zero_shot"] == {"values": [10.0] * 3, "mean": 10.0, "sd": 0.0}
    assert result["domain"]["best"]["mean"] == 22.0 and result["domain"]["best"]["sd"] == statistics.stdev([20, 24, 22])
    text = kshot.table(result, shots=10, seeds=[0, 1, 2])
    assert "10.00 +- 0.00" in text and "22.00 +- 2.00" in text and "21.00 +- 2.00" in text


def test_runner_commands_train_on_each_seeds_subset_and_mix_general(tmp_path, capsys):
    cmd = kshot.fit_command([str(REPO / "configs" / "sam3_finetune.yaml")], tmp_path / "seed3", train="t.tar",
                            val="v.tar", seed=3, general="g.tar", general_weight=1.0, general_val="gv.tar",
                            extra=["--trainer.max_steps=5"])
    sources = json.loads(next(a for a in cmd if a.startswith("--data.train_sources=")).split("=", 1)[1])
    assert sources == [{"name": "domain", "shards": "t.tar", "weight": 1.0},
                       {"name": "general", "shards": "g.tar", "weight": 1.0}]
    assert "--data.seed=3" in cmd and "--seed_everything=3" in cmd and cmd[-1] == "--trainer.max_steps=5"
    assert '--data.val_sets={"domain": "v.tar", "general": "gv.tar"}' in cmd
    import yaml

    copy = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text())
    assert copy["trainer"]["default_root_dir"] == str(tmp_path / "seed3")
    assert all(c["init_args"]["dirpath"] == str(tmp_path / "seed3" / "checkpoints")
               for c in copy["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))


@pytest.mark.slow
def test_runner_fine_tunes_each_seed_and_reports_mean_and_spread(coco_path, tmp_path, capsys):
    """tools/kshot.py end to end: two seeds of a 2-shot subset, a tiny model two steps each, through the real CLI."""
    import yaml

    root = tmp_path / "cfg"
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2, "val_check_interval": 2,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "default_root_dir": str(root),
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(root), "name": "csv"}}],
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(root / "checkpoints"), "monitor": "val/domain/cgF1",
                                       "mode": "max", "save_top_k": 1}},
                        {"class_path": "sam3_train.finetune.ZeroShotBaseline", "init_args": {"monitor": "val/domain/cgF1"}}]},
        "model": {"preset": "tiny", "warmup_steps": 1},
        "data": {"image_size": 112, "batch_size": 2, "eval_batch_size": 4, "num_workers": 0, "steps_per_epoch": 2,
                 "shuffle_buffer": 4, "max_phrases_per_image": 3},
    }
    root.mkdir()
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    images = str(coco_path.parent / "images")
    out = tmp_path / "kshot"
    argv = ["--train-annotations", str(coco_path), "--train-images", images, "--val-annotations", str(coco_path),
            "--val-images", images, "--shots", "2", "--seeds", "0", "1", "--config", str(root / "fit.yaml"),
            "--out", str(out), "--", "--trainer.limit_val_batches=2"]
    assert kshot.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "kshot_summary.json").read_text())
    domain = result["sets"]["domain"]
    per_seed = [json.loads((out / f"seed{s}" / "finetune_summary.json").read_text())["sets"]["domain"] for s in (0, 1)]
    assert domain["zero_shot"]["values"] == [p["zero_shot"] for p in per_seed]
    assert domain["at_selected"]["mean"] == pytest.approx(statistics.fmean(p["at_selected"] for p in per_seed))
    assert f"{domain['at_selected']['mean']:.2f} +- {domain['at_selected']['sd']:.2f}" in printed
    assert (out / "shards" / "train-seed0" / "train-2shot-seed0.json").is_file()
    assert (out / "seed1" / "checkpoints").is_dir() and not (root / "checkpoints").exists()
