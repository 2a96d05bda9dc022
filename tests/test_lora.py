"""LoRA fine-tuning (peft): only adapters train; adapter checkpoints hold only trained tensors, resume
bitwise, load on a fresh base (and refuse another base); the merged HF directory computes what the
adapted model computes; LoRA under 2-process CPU DDP through the real CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from fault_cli import IMAGE_SIZE, fit_config, logged, output, run
from fault_cli import callback as fault_callback

from sam3_train.lit import Sam3LitModule
from sam3_train.model import Sam3Detector, build_detector
from sam3_train.model.lora import CHECKPOINT_KEY as LORA_KEY
from sam3_train.model.lora import LoraSettings, apply_lora, merge_lora

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1,
        "target_modules": ["vit_attention", "detr_encoder_attention", "detr_decoder_attention"]}


def _merge_tool():
    spec = importlib.util.spec_from_file_location("merge_lora", REPO / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny HF-format checkpoint at 224 px (the shapes_batch size)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_base")
    build_detector("tiny").save_pretrained(path)
    return path


def _module(base: Path, **kw) -> Sam3LitModule:
    return Sam3LitModule(pretrained=str(base), lora=LoraSettings(**{**LORA, "dropout": 0.0, **kw.pop("lora", {})}),
                         warmup_steps=0, lr=1e-2, lr_vision=1e-2, **kw)


def _train(module: Sam3LitModule, batch, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    for _ in range(steps):
        loss = module.criterion.weighted_total(module.criterion(module.detector(batch), batch.targets),
                                               num_pairs=batch.num_pairs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def _eval_outputs(detector: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    detector.eval()
    with torch.no_grad():
        out = detector(batch)
    return {k: out[k] for k in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg")}


def _assert_outputs_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------------------------------ in process
def test_only_adapters_train_and_every_frozen_weight_stays_bitwise(base_dir, shapes_batch, one_thread):
    module = _module(base_dir)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trained = module.trained_keys()
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    assert any(k.startswith("detector.vision_encoder.") for k in trained)
    assert any(k.startswith("detector.detr_decoder.layers.") for k in trained)
    assert not any(k.startswith(("detector.text_encoder.", "detector.geometry_encoder.")) for k in trained)
    optimizer = _train(module, shapes_batch)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in module.named_parameters() if n in trained}
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trained  # nothing frozen moved, to the bit
    assert any(".lora_B." in k for k in changed)  # B starts at zero: moved means the adapters learned


def test_freezing_and_modules_to_save_combine_with_lora(base_dir, shapes_batch, one_thread):
    module = _module(base_dir, freeze_vision=True, lora={"modules_to_save": [r"detr_decoder\.box_head"]})
    trained = module.trained_keys()
    assert not any(k.startswith("detector.vision_encoder.") for k in trained)  # vision adapters frozen too
    head = {f"detector.detr_decoder.box_head.layer{i}.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}
    assert head <= trained  # trained in full, under the base model's keys
    assert trained - head and all(".lora_" in k for k in trained - head)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _train(module, shapes_batch, steps=2)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trained and changed & head


def test_a_pattern_that_matches_nothing_is_named(base_dir):
    with pytest.raises(ValueError, match=r"target_modules: 'vit_atention' matches no module"):
        _module(base_dir, lora={"target_modules": ["vit_atention"]})


def test_merged_directory_computes_what_the_adapted_model_computes(base_dir, shapes_batch, tmp_path, one_thread):
    torch.manual_seed(0)
    detector = Sam3Detector.from_pretrained(base_dir)
    base_keys = set(detector.state_dict())
    base_out = _eval_outputs(detector, shapes_batch)
    apply_lora(detector, LoraSettings(**LORA, modules_to_save=["heads"]))
    with torch.no_grad():  # adapters as if trained: B is zero at the start
        for name, param in detector.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    adapted = _eval_outputs(detector, shapes_batch)
    # (The random base's last box layer is zero, Meta's init: its boxes are the reference boxes.)
    assert (adapted["pred_logits"] - base_out["pred_logits"]).abs().max() > 1e-3  # the adapters matter
    merge_lora(detector).save_pretrained(tmp_path / "merged")
    assert set(detector.state_dict()) == base_keys
    merged = Sam3Detector.from_pretrained(tmp_path / "merged")  # strict: every key, every shape
    _assert_outputs_close(_eval_outputs(merged, shapes_batch), adapted)
    hf, info = transformers.Sam3Model.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    theirs = hf.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in merged.state_dict().items())


def test_adapter_checkpoint_loads_on_a_fresh_base_and_refuses_another(base_dir, shapes_batch, tmp_path, one_thread):
    module = _module(base_dir, lora={"modules_to_save": ["heads"]})
    _train(module, shapes_batch, steps=1)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == module.trained_keys()
    assert checkpoint[LORA_KEY] == {"pretrained": str(base_dir), "base_fingerprint": module.base_fingerprint}

    fresh = Sam3LitModule(**checkpoint["hyper_parameters"])  # what validate / predict rebuild
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: every trained tensor, the base's from the base
    _assert_outputs_close(_eval_outputs(fresh.detector, shapes_batch), _eval_outputs(module.detector, shapes_batch), 0)

    torch.manual_seed(2)
    other = tmp_path / "other_base"
    build_detector("tiny").save_pretrained(other)
    stranger = Sam3LitModule(**{**checkpoint["hyper_parameters"], "pretrained": str(other)})
    with pytest.raises(ValueError, match="trained on another base model"):
        stranger.on_load_checkpoint(checkpoint)
    partial = {**checkpoint, "state_dict": dict(list(checkpoint["state_dict"].items())[1:])}
    with pytest.raises(KeyError, match="missing keys"):
        fresh.on_load_checkpoint(partial)
    with pytest.raises(RuntimeError, match="missing detector"):
        fresh.load_state_dict(partial["state_dict"])


# ------------------------------------------------------------------------------------------ the real CLI
@pytest.fixture(scope="module")
def base_dir_112(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_base_112")
    build_detector("tiny", image_size=IMAGE_SIZE).save_pretrained(path)
    return path


def _lora_config(root: Path, shapes_root: str, base: Path, **trainer) -> Path:
    return fit_config(root, shapes_root, trainer={"max_steps": 4, **trainer},
                      model={"pretrained": str(base), "lora": LORA, "lr": 1e-3, "lr_vision": 1e-3})


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_lora_run_resumes_bitwise_then_validates_predicts_and_merges(shapes_root, base_dir_112, tmp_path):
    reference = _lora_config(tmp_path / "reference", shapes_root, base_dir_112)
    interrupted_root = tmp_path / "interrupted"
    interrupted = _lora_config(interrupted_root, shapes_root, base_dir_112)
    last = interrupted_root / "checkpoints" / "last.ckpt"
    proc = run(["fit", "--config", str(reference)], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    proc = run(["fit", "--config", str(interrupted), fault_callback("SignalAt", step=3, signal="SIGKILL")], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    assert _ckpt(last)["global_step"] == 2
    proc = run(["fit", "--config", str(interrupted), "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]

    expected = logged(tmp_path / "reference", 0)
    assert [step for step, _ in expected] == [0, 1, 2, 3]
    assert logged(interrupted_root, 0) == expected[:3] and logged(interrupted_root, 1) == expected[2:]
    ours, theirs = _ckpt(last), _ckpt(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k]) for k in ours["state_dict"])
    # Only the trained tensors: the adapters, nothing of the base.
    keys = ours["state_dict"].keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ours[LORA_KEY]["pretrained"] == str(base_dir_112)

    # validate / predict rebuild the base from the checkpoint's model settings, then load the adapters.
    proc = run(["validate", "--config", str(interrupted), "--ckpt_path", str(last), "--trainer.limit_val_batches=1"],
               tmp_path)
    assert proc.returncode == 0 and "val/cgF1" in output(proc), output(proc)[-4000:]
    writer = {"class_path": "sam3_train.callbacks.PredictionWriter", "init_args": {"output_dir": str(tmp_path / "pred")}}
    proc = run(["predict", "--config", str(interrupted), "--ckpt_path", str(last), "--trainer.limit_predict_batches=1",
                f"--trainer.callbacks+={json.dumps(writer)}"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert len((tmp_path / "pred" / "predictions-rank0.jsonl").read_text().splitlines()) == 2

    merged = _merge_tool().merge_checkpoint(last, tmp_path / "merged")
    adapted = Sam3LitModule.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    from sam3_train.data import Sam3DataModule
    from conftest import SHAPES_SPLITS
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=IMAGE_SIZE,
                        eval_batch_size=4, num_workers=0, eval_max_phrases=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    _assert_outputs_close(_eval_outputs(Sam3Detector.from_pretrained(merged), batch),
                          _eval_outputs(adapted.detector, batch))
    assert json.loads((merged / "lora_merge.json").read_text())["base_fingerprint"] == adapted.base_fingerprint


@pytest.mark.slow
def test_lora_under_two_process_ddp(shapes_root, base_dir_112, tmp_path):
    config = _lora_config(tmp_path / "ddp", shapes_root, base_dir_112, max_steps=2)
    proc = run(["fit", "--config", str(config), "--trainer.strategy=ddp", "--trainer.devices=2",
                "--trainer.accelerator=cpu"], tmp_path)
    assert proc.returncode == 0, output(proc)[-6000:]
    ckpt = _ckpt(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and len(ckpt["sam3_resume"]["rng"]) == 2
    state = ckpt["state_dict"]
    assert state and all(".lora_" in k for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapters took steps
