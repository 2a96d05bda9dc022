"""Deploying a trained detector: ONNX graphs and an onnxruntime predictor (docs/deploy.md).

    sam3-train export --detector runs/x/checkpoints/last.ckpt --output exported/x
    sam3-train predict-onnx --model exported/x --shards 'test-{000000..000007}.tar' --output_dir preds/

- ``export_ops``: export-only replacements for what transformers' SAM 3 cannot export, each equal to
  the original (tested);
- ``graphs``: the three graphs (vision once per image, text once per phrase, detector per pair);
- ``export``: ``sam3-train export`` (graphs in float32 or float16, tokenizer files, ``deploy.json`` with
  the fingerprint);
- ``runtime``: ``OnnxDetector``, the graphs under onnxruntime with the detector's batch contract;
- ``predict``: ``sam3-train predict-onnx``, shards -> the files ``sam3-train predict`` writes.

onnx / onnxruntime / onnxscript are the ``deploy`` extra: import this package's modules only where used.
"""
