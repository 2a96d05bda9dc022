"""The SAM 3 detector, its presets, checkpoint IO and post-processing."""

from sam3_train.model.checkpoint_io import state_mismatch
from sam3_train.model.detector import Init, Sam3Detector, build_detector
from sam3_train.model.drop_path import set_vit_drop_path
from sam3_train.model.postprocess import postprocess
from sam3_train.model.presets import PRESETS, ImageSizeError, preset_config

__all__ = [
    "PRESETS",
    "ImageSizeError",
    "Init",
    "Sam3Detector",
    "build_detector",
    "postprocess",
    "preset_config",
    "set_vit_drop_path",
    "state_mismatch",
]
