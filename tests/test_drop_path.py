"""ViT stochastic depth as Meta trains SAM 3: rates, identity in eval, whole-sample drops in training."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import StochasticDepth

from sam3_train.model import build_detector
from sam3_train.model.drop_path import Sam3ViTLayerWithDropPath, set_vit_drop_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_detector("tiny", dropout=0.0)


def _tokens(det, batch: int = 3) -> torch.Tensor:
    cfg = det.config.vision_config.backbone_config
    grid = cfg.image_size // cfg.patch_size
    return torch.randn(batch, grid, grid, cfg.hidden_size, generator=torch.Generator().manual_seed(1))


class _Scales(torch.nn.Module):
    """A stand-in drop path that multiplies the attention branch, then the MLP branch, by fixed factors."""

    def __init__(self, scales):
        super().__init__()
        self.scales, self.calls = scales, 0

    def forward(self, x):
        self.calls += 1
        return x * self.scales[(self.calls - 1) % 2]


def test_rates_grow_linearly_as_meta_and_checkpoints_are_unchanged(detector):
    layers = detector.vision_encoder.backbone.layers
    keys = set(detector.state_dict())
    set_vit_drop_path(layers, 0.1)
    try:
        assert not isinstance(layers[0], Sam3ViTLayerWithDropPath)  # linspace(0, 0.1, 4)[0] = 0
        rates = [layer.drop_path.p for layer in layers[1:]]
        assert rates == pytest.approx(torch.linspace(0, 0.1, len(layers)).tolist()[1:])
        assert set(detector.state_dict()) == keys
    finally:
        set_vit_drop_path(layers, 0.0)
    assert not any(isinstance(layer, Sam3ViTLayerWithDropPath) for layer in layers)


def test_eval_is_the_plain_block_and_training_drops_whole_samples(detector):
    layer = detector.vision_encoder.backbone.layers[-1]
    x = _tokens(detector)
    plain = layer.eval()(x)
    set_vit_drop_path(detector.vision_encoder.backbone.layers, 0.5)
    try:
        torch.testing.assert_close(layer.eval()(x), plain, rtol=0, atol=0)
        layer.train()
        layer.drop_path = StochasticDepth(1.0, mode="row")  # every sample's branches dropped
        torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
        layer.drop_path = StochasticDepth(0.5, mode="row")
        torch.manual_seed(3)
        out = layer(x)
        # Each sample's two branches are each either dropped or kept x 2 (survival 0.5): every row of the
        # output is one of the four whole-sample combinations, never a partly dropped mix.
        combos = []
        for scales in ((0, 0), (0, 2), (2, 0), (2, 2)):
            layer.drop_path = _Scales(scales)
            combos.append(layer(x))
        for i in range(len(x)):
            assert sum(torch.allclose(out[i], c[i], rtol=1e-5, atol=1e-5) for c in combos) >= 1, i
    finally:
        layer.eval()
        set_vit_drop_path(detector.vision_encoder.backbone.layers, 0.0)


def test_rate_outside_zero_one_is_refused(detector):
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        set_vit_drop_path(detector.vision_encoder.backbone.layers, 1.0)
