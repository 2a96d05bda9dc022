"""Fold a LoRA run's adapters into its base model and write a plain HF-layout SAM 3 directory.

    python tools/merge_lora.py --ckpt runs/sam3_lora/checkpoints/last.ckpt --output checkpoints/sam3_lora
    python tools/merge_lora.py --ckpt last.ckpt --output merged/ --pretrained /moved/sam3   # base moved

The checkpoint (written by ``sam3-train fit`` with ``model.lora``) holds the adapters, any fully trained
modules and the base's fingerprint; its hyper-parameters name the base (``model.pretrained``). The base
is rebuilt from them, refused if its fingerprint differs, the adapters are loaded and merged, and
``Sam3Detector.save_pretrained`` writes config.json, model.safetensors and the tokenizer files, which
``Sam3Detector.from_pretrained`` and ``transformers.Sam3Model.from_pretrained`` load strictly; point
``model.pretrained`` at it to fine-tune further or predict without peft. ``lora_merge.json`` beside
them records the source checkpoint and base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sam3_train.checkpointing import CheckpointError
from sam3_train.loading import load_module
from sam3_train.model.lora import CHECKPOINT_KEY, merge_lora


def merge_checkpoint(ckpt: str | Path, output: str | Path, *, pretrained: str | None = None) -> Path:
    """Merge the adapters of LoRA checkpoint ``ckpt`` into its base and save to ``output``; returns it."""
    # The one loader (sam3_train/loading.py): file checks, weights-only read, the base rebuilt and its
    # fingerprint checked. Not load_detector: the record below also wants the run's LoRA settings.
    module = load_module(ckpt, **({"pretrained": str(pretrained)} if pretrained else {}))
    if module.lora is None:
        raise CheckpointError(f"{ckpt} was not written by a model.lora run: it holds the whole model already, "
                              "nothing to merge (sam3-train's checkpoints load with --ckpt_path as they are).")
    detector = merge_lora(module.detector)
    output = Path(output)
    detector.save_pretrained(output)
    record = {"checkpoint": str(ckpt), "pretrained": module.hparams.pretrained,
              "base_fingerprint": module.base_fingerprint, "lora": module.lora.to_dict()}
    (output / "lora_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="adapter checkpoint of a model.lora run")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument("--pretrained", default=None, help="the base's folder, when not where the run read it")
    args = parser.parse_args(argv)
    try:
        out = merge_checkpoint(args.ckpt, args.output, pretrained=args.pretrained)
    except (FileNotFoundError, CheckpointError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{out}: adapters of {args.ckpt} merged into its base ({CHECKPOINT_KEY} recorded in {out / 'lora_merge.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
