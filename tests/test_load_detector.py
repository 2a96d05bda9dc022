"""``load_detector`` and its siblings: one loader for an HF folder and for ``sam3-train fit`` checkpoints, with
or without LoRA adapters; the file checks name the file; adapters are refused on another base."""

from __future__ import annotations

import os
import pickle

import lightning
import pytest
import torch

from sam3_train.checkpointing import CheckpointError
from sam3_train.engine.proposals import ProposeModule
from sam3_train.lit import Sam3LitModule
from sam3_train.loading import load_detector, load_module, load_weights
from sam3_train.model import Sam3Detector, build_detector
from sam3_train.model.lora import LoraSettings, is_adapted

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["vit_attention", "detr_decoder_attention"],
        "modules_to_save": [r"detr_decoder\.box_head"]}


def _save(module: Sam3LitModule, path) -> None:
    """What a ``sam3-train fit`` checkpoint holds of the model (its hooks applied), as a file."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _eval(detector: torch.nn.Module, batch) -> torch.Tensor:
    detector.eval()
    with torch.no_grad():
        out = detector(batch)
    return torch.cat([out["pred_logits"].flatten(), out["pred_boxes"].flatten(), out["presence_logit"].flatten()])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("base")
    build_detector("tiny").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapted(base_dir, tmp_path_factory):
    """(module, checkpoint path) of a LoRA run on ``base_dir`` whose adapters are not zero."""
    module = Sam3LitModule(pretrained=str(base_dir), lora=LoraSettings(**LORA))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name or ".box_head." in name:
                param.add_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("lora") / "last.ckpt"
    _save(module, path)
    return module, path


def test_an_hf_folder_loads_as_from_pretrained(base_dir):
    assert _same_weights(load_detector(base_dir), Sam3Detector.from_pretrained(base_dir))


def test_a_full_checkpoint_loads_its_detector(base_dir, tmp_path):
    torch.manual_seed(2)
    module = Sam3LitModule(preset="tiny")
    _save(module, tmp_path / "last.ckpt")
    detector = load_detector(tmp_path / "last.ckpt")
    assert type(detector) is Sam3Detector and _same_weights(detector, module.detector)


def test_a_lora_checkpoint_is_merged_into_its_base(adapted, base_dir, shapes_batch):
    module, path = adapted
    assert set(torch.load(path, weights_only=True)["state_dict"]) == module.trained_keys()  # adapters only
    detector = load_detector(path)
    assert not is_adapted(detector)
    assert detector.state_dict().keys() == Sam3Detector.from_pretrained(base_dir).state_dict().keys()
    torch.testing.assert_close(_eval(detector, shapes_batch), _eval(module.detector, shapes_batch), atol=1e-5, rtol=0)
    # The same detector reaches the data engine's propose step.
    assert _same_weights(ProposeModule(checkpoint=str(path), flip_tta=False).detector, detector)


def test_lora_adapters_are_refused_on_another_base_naming_the_file(adapted, tmp_path):
    _, path = adapted
    torch.manual_seed(3)
    build_detector("tiny").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=rf"Checkpoint {path} holds LoRA adapters trained on another base model"):
        load_detector(path, pretrained=tmp_path / "other")
    with pytest.raises(ValueError, match=rf"Checkpoint {path} holds LoRA adapters trained on another base model"):
        load_weights(Sam3LitModule(pretrained=str(tmp_path / "other"), lora=LoraSettings(**LORA)), path)


def test_load_weights_and_load_module_keep_the_adapters_on_their_base(adapted, base_dir, shapes_batch):
    module, path = adapted
    fresh = Sam3LitModule(pretrained=str(base_dir), lora=LoraSettings(**LORA))
    load_weights(fresh, path)
    assert _same_weights(fresh, module)
    loaded = load_module(path)
    assert loaded.lora is not None and _same_weights(loaded, module)


def test_a_checkpoint_of_another_architecture_is_named(tmp_path):
    _save(Sam3LitModule(preset="tiny", model_overrides={"num_queries": 20}), tmp_path / "fewer.ckpt")
    with pytest.raises(KeyError, match=rf"Checkpoint {tmp_path / 'fewer.ckpt'} does not fit the model: it was "
                                       r"written with other model settings \(model_overrides: checkpoint "):
        load_weights(Sam3LitModule(preset="tiny"), tmp_path / "fewer.ckpt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_file_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"Detector {tmp_path / 'nowhere.ckpt'} does not exist"):
        load_detector(tmp_path / "nowhere.ckpt")
    (tmp_path / "notes.ckpt").write_text("step 3: loss 0.5\n")
    with pytest.raises(CheckpointError, match=r"notes.ckpt is not a PyTorch checkpoint"):
        load_detector(tmp_path / "notes.ckpt")
    with open(tmp_path / "evil.ckpt", "wb") as f:
        torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": _Evil()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=r"evil.ckpt carries pickled Python objects"):
        load_detector(tmp_path / "evil.ckpt")
