"""``sam3-train``: the console front. It sits above every other part and routes each subcommand to
the part that owns it, so that nothing below imports upwards (tests/test_layout.py)::

    # sam3_train/cli.py
    sam3-train fit|validate|test|predict --config configs/shapes_tiny.yaml
    # sam3_train/engine/learned/
    sam3-train fit-verifier --config configs/verifiers/base.yaml --config configs/verifiers/mv.yaml
    # sam3_train/video/predict.py
    sam3-train predict-video --video frames/ --phrases "red star" ...
    # sam3_train/deploy/
    sam3-train export --detector runs/x/checkpoints/last.ckpt --output exported/x
    sam3-train predict-onnx --model exported/x --shards 'test-{000000..000007}.tar' --output_dir preds/

``python -m sam3_train.console`` is the same command.
"""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    if command == "predict-video":  # video inference has its own argparse parser
        from sam3_train.video.predict import main as predict_video

        raise SystemExit(predict_video(argv[1:]))
    if command == "fit-verifier":  # the data engine's learned verifiers, on the same CLI class as fit
        from sam3_train.engine.learned import fit_verifier

        raise SystemExit(fit_verifier(argv[1:]))
    if command == "export":  # ONNX graphs of a trained detector
        from sam3_train.deploy.export import main as export

        raise SystemExit(export(argv[1:]))
    if command == "predict-onnx":  # predict's files from the exported graphs under onnxruntime
        from sam3_train.deploy.predict import main as predict_onnx

        raise SystemExit(predict_onnx(argv[1:]))
    from sam3_train.cli import main as lightning_main

    lightning_main(args)


if __name__ == "__main__":
    main()
