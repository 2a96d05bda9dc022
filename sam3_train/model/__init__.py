"""The SAM 3 detector, its presets, tokenizer and post-processing."""

from sam3_train.model.detector import Sam3Detector, build_detector
from sam3_train.model.presets import PRESETS, preset_config
from sam3_train.model.tokenizer import Sam3Tokenizer

__all__ = ["PRESETS", "Sam3Detector", "Sam3Tokenizer", "build_detector", "preset_config"]
