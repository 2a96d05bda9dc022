"""User mistakes get one message that names the cause and what to do: unknown config key, wrong type,
missing checkpoint folder, a checkpoint that does not fit the model, a shard pattern that matches
nothing, a phrase longer than the text encoder's context (truncated, with a warning), images that
do not fit the configured resolution."""

from __future__ import annotations

import io
import logging
import sys

import lightning as L
import numpy as np
import pytest
import yaml
from conftest import SHAPES_SPLITS
from fault_cli import fit_config
from PIL import Image

from sam3_train.data import Sam3DataModule
from sam3_train.data import rle as rle_ops
from sam3_train.data.collate import Collator
from sam3_train.data.pipeline import ShardStream
from sam3_train.data.schema import make_key, query
from sam3_train.data.shards import ShardSink, expand_urls
from sam3_train.data.transforms import eval_transforms
from sam3_train.lit import Sam3LitModule
from sam3_train.data.tokenizer import Sam3Tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _cli(args: list[str], monkeypatch) -> SystemExit:
    """Run the CLI in process on arguments that must fail while parsing; the SystemExit."""
    from sam3_train.cli import main

    monkeypatch.setattr(sys, "argv", ["sam3-train"])
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value


# ---------------------------------------------------------------------------------------- configuration
def test_unknown_config_key_names_the_closest_valid_one(shapes_root, tmp_path, monkeypatch, capsys):
    config = fit_config(tmp_path, shapes_root)
    data = yaml.safe_load(config.read_text())
    data["model"]["lrr"] = 0.001
    config.write_text(yaml.safe_dump(data))
    assert _cli(["fit", "--config", str(config)], monkeypatch).code == 2
    assert "Subcommand 'fit' does not accept option 'model.lrr'. Did you mean 'model.lr'?" in capsys.readouterr().err
    assert _cli(["fit", "--config", str(fit_config(tmp_path, shapes_root)), "--data.batchsize=2"], monkeypatch).code == 2
    assert "unrecognized arguments: --data.batchsize=2. Did you mean 'data.batch_size'?" in capsys.readouterr().err


def test_missing_checkpoint_folders_are_named(shapes_root, tmp_path, monkeypatch):
    gone = tmp_path / "gone" / "checkpoints" / "last.ckpt"
    exit_ = _cli(["fit", "--config", str(fit_config(tmp_path, shapes_root)), "--ckpt_path", str(gone)], monkeypatch)
    assert str(exit_.code).startswith(f"sam3-train fit: --ckpt_path: Checkpoint directory {gone.parent} does not exist")
    assert "pass --ckpt_path last" in str(exit_.code)
    from sam3_train.cli import main

    monkeypatch.setattr(sys, "argv", ["sam3-train"])
    with pytest.raises(FileNotFoundError, match=rf"Checkpoint directory {tmp_path / 'no_model'} does not exist: pass a local "
                                                r"folder holding config.json and \*.safetensors"):
        main(["fit", "--config", str(fit_config(tmp_path, shapes_root)), f"--model.pretrained={tmp_path / 'no_model'}"])


def test_checkpoint_of_another_preset_is_refused_with_the_settings_named():
    small = Sam3LitModule(preset="small", image_size=112)
    checkpoint = {"state_dict": small.state_dict(), "hyper_parameters": dict(small.hparams)}
    tiny = Sam3LitModule(preset="tiny", image_size=112)
    with pytest.raises(KeyError) as info:
        tiny.on_load_checkpoint(checkpoint)
    message = info.value.args[0]
    assert message.startswith("The checkpoint does not fit the model: it was written with other model settings "
                              "(preset: checkpoint 'small', this run 'tiny'). Run with the model settings of the run")
    assert "shape mismatches: detector.detr_decoder.box_head.layer1.bias (checkpoint (128,), model (64,))" in message


def test_shard_pattern_that_matches_nothing_names_the_key(tmp_path):
    for pattern, reason in ((f"{tmp_path}/nowhere/train-{{000000..000003}}.tar", f"folder {tmp_path}/nowhere does not exist"),
                            (f"{tmp_path}/train-{{000000..000003}}.tar", f"{tmp_path}/train-000000.tar does not exist")):
        dm = Sam3DataModule(train_shards=pattern, num_workers=0)
        with pytest.raises(FileNotFoundError) as info:
            dm.setup("fit")
        message = str(info.value)
        assert message.startswith(f"data.train_shards: shard pattern {pattern!r}: {reason}")
        assert "Set data.train_shards to a brace pattern of existing shard files" in message
        assert "tools/make_shards.py" in message


# ---------------------------------------------------------------------------------------- data
def _shard_with(tmp_path, phrase: str, side: int = 16) -> list[str]:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, dtype=np.uint8)).save(buf, format="PNG")
    mask = np.zeros((side, side), dtype=bool)
    mask[2:6, 2:6] = True
    rle = rle_ops.encode(mask)
    meta = {"width": side, "height": side, "queries": [query(phrase, [{"box": rle_ops.to_xywh(rle), "rle": rle}])]}
    with ShardSink(out_dir=tmp_path, prefix="one") as sink:
        sink.write(make_key(0, "sample"), buf.getvalue(), "png", meta)
        return expand_urls(sink.pattern)


def test_phrase_longer_than_the_context_is_truncated_with_a_warning(tmp_path, caplog):
    phrase = "small red star next to a " * 12  # ~73 tokens, context 32
    stream = ShardStream(urls=_shard_with(tmp_path, phrase), batch_size=1, transforms=eval_transforms(image_size=16),
                         collate=Collator(tokenizer=Sam3Tokenizer.from_open_clip()))
    with caplog.at_level(logging.WARNING):
        (batch,) = list(stream)
    assert batch.input_ids.shape == (1, 32) and batch.attention_mask.sum() == 32
    assert batch.input_ids[0, 0] == 49406 and batch.input_ids[0, -1] == 49407  # start ... end token kept
    assert "1 phrase(s) exceed the text encoder's context of 32 tokens and are truncated: 'small red star" in caplog.text
    assert stream.skip_counter.value == 0  # not dropped


def test_input_size_that_the_preset_cannot_take_is_named(shapes_root, tmp_path, monkeypatch):
    from sam3_train.cli import main

    monkeypatch.setattr(sys, "argv", ["sam3-train"])
    with pytest.raises(ValueError, match=r"data.image_size=56 does not fit the 'tiny' preset: .* 112 is the smallest. "
                                         r"Use e.g. 112, 224."):
        main(["fit", "--config", str(fit_config(tmp_path, shapes_root)), "--data.image_size=56"])


def test_data_at_another_resolution_than_the_model_is_refused(shapes_root):
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=224, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"data.image_size is 224 px but the model takes 112 px images \(preset 'tiny'\): "
                                         r"images would be larger than the configured resolution. Set data.image_size: 112."):
        trainer.validate(Sam3LitModule(preset="tiny", image_size=112), datamodule=dm)


def test_image_too_large_to_decode_is_skipped_and_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images above twice this (decompression bombs)
    stream = ShardStream(urls=_shard_with(tmp_path, "star", side=32), batch_size=1,
                         transforms=eval_transforms(image_size=16), collate=Collator(tokenizer=Sam3Tokenizer.from_open_clip()))
    with caplog.at_level(logging.WARNING):
        assert list(stream) == []
    assert stream.skip_counter.value == 1
    assert "key 00000000_sample: sample 00000000_sample: undecodable image (DecompressionBombError: Image size (1024 pixels)" in caplog.text
