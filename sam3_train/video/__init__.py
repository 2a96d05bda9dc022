"""Video inference: a detector trained here inside transformers' SAM 3 video model (no tracker training).

- :mod:`~sam3_train.video.model`: ``build_video_model`` (released tracker + our detector, sizes checked);
- :mod:`~sam3_train.video.session`: bounded, frame-by-frame propagation with delayed (hot-start) output;
- :mod:`~sam3_train.video.frames`: frames streamed from a folder or an animated image;
- :mod:`~sam3_train.video.masklets`: per-frame masks, overlays, GIF and the masklets JSON;
- :mod:`~sam3_train.video.moving_shapes` and :mod:`~sam3_train.video.evaluate`: generated videos with
  ground truth, per-frame cgF1 and identity consistency;
- :mod:`~sam3_train.video.predict`: ``sam3-train predict-video``;
- :mod:`~sam3_train.video.cpu_ops`: CPU stand-ins for the video model's Hub kernels (NMS, hole filling).
"""
