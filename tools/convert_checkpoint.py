"""Convert Meta's SAM 3 checkpoint (sam3.pt) into the HF-layout directory our detector loads.

    python tools/convert_checkpoint.py --input sam3.pt --output checkpoints/sam3
    python tools/convert_checkpoint.py --input tiny.pt --output out/ --config tiny_config.json

The output (config.json, model.safetensors, CLIP tokenizer files) loads strictly with
``Sam3Detector.from_pretrained(DIR)`` and ``transformers.Sam3Model.from_pretrained(DIR)``; point
``model.pretrained`` of a config (e.g. configs/sam3_finetune.yaml) at it. ``--config`` is a
``Sam3Config`` JSON for a model of other sizes; without it, the released sizes. The tracker's
tensors are skipped and counted; any key without a conversion rule, any model weight left unfilled
and any shape that does not fit the config stop the conversion with one error naming them. See
sam3_train/model/meta_checkpoint.py for the key mapping.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sam3_train.model.meta_checkpoint import MetaCheckpointError, convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="Meta's checkpoint (sam3.pt)")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument("--config", type=Path, default=None,
                        help="Sam3Config JSON for non-released sizes (default: the released sizes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        conversion = convert_checkpoint(args.input, args.output, config=args.config, progress=not args.no_progress)
    except (MetaCheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.output}: {conversion.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
