"""data.frame.InputFrame: boxes and mask logits from the model's square input (content at the
top-left) to the original image's pixels, hand-computed on a landscape image."""

from __future__ import annotations

import torch

from sam3_train.data import Batch, InputFrame

# An 8 x 8 input holding a 4 x 8 content (the top half) of a 20 x 40 original: 5x in each direction.
FRAME = InputFrame(side=8, content=(4, 8), original=(20, 40))


def test_boxes_go_from_normalised_input_to_original_pixels():
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.25],   # input xyxy (2, 1, 6, 3) px
                          [0.875, 0.375, 0.5, 0.5]])  # input xyxy (5, 1, 9, 5) px: past the content
    expected = torch.tensor([[10.0, 5.0, 30.0, 15.0], [25.0, 5.0, 45.0, 25.0]])
    torch.testing.assert_close(FRAME.boxes_to_original(boxes), expected)
    clamped = FRAME.boxes_to_original(boxes, clamp=True)
    torch.testing.assert_close(clamped, torch.tensor([[10.0, 5.0, 30.0, 15.0], [25.0, 5.0, 40.0, 20.0]]))
    # Without an original size the frame stays in input pixels (the metrics' content frame).
    content = InputFrame(side=8, content=(4, 8), original=(4, 8))
    torch.testing.assert_close(content.boxes_to_original(boxes[:1]), torch.tensor([[2.0, 1.0, 6.0, 3.0]]))


def test_mask_logits_are_cropped_to_the_top_left_content_and_resized():
    """Two 4 x 4 logit grids over the input. Bilinear 4 -> 8 (half-pixel centres) turns a +10 / -10 step
    between grid cells 1 and 2 into 10, 10, 10, 5, -5, -10, -10, -10."""
    logits = torch.zeros(2, 4, 4)
    logits[0, :, :2], logits[0, :, 2:] = 10.0, -10.0  # left half positive
    logits[1, :2, :], logits[1, 2:, :] = 10.0, -10.0  # top half positive
    out = FRAME.mask_logits_to_original(logits)
    assert out.shape == (2, 20, 40) and out.dtype == torch.float32

    # Columns: the content is the whole width; 8 -> 40 samples input column x = (j + 0.5) / 5 - 0.5.
    # The zero crossing (between input columns 3 and 4, x = 3.5) falls between j = 19 (x = 3.4) and 20.
    row = out[0, 7]
    torch.testing.assert_close(row[[0, 10, 19, 20, 39]], torch.tensor([10.0, 10.0, 1.0, -1.0, -10.0]))
    assert torch.equal(out[0] > 0, torch.arange(40).expand(20, 40) < 20)
    torch.testing.assert_close(out[0], out[0, :1].expand(20, 40))  # nothing varies down the rows

    # Rows: the content is input rows 0-3 (10, 10, 10, 5), stretched to 20: y = (i + 0.5) / 5 - 0.5.
    column = out[1, :, 13]
    torch.testing.assert_close(column[[0, 10, 15, 19]], torch.tensor([10.0, 10.0, 7.0, 5.0]))
    assert bool((out[1] > 0).all())  # the padding's negative rows were cropped away

    assert FRAME.mask_logits_to_original(torch.zeros(0, 4, 4)).shape == (0, 20, 40)
    masks = torch.ones(3, 8, 8, dtype=torch.bool)
    assert FRAME.crop_content(masks).shape == (3, 4, 8)


def test_frame_of_a_batch_reads_its_image_sizes():
    batch = Batch(images=torch.zeros(2, 3, 8, 8), image_sizes=torch.tensor([[8, 8], [4, 8]]), pair_image=torch.tensor([1]),
                  input_ids=torch.zeros(1, 32, dtype=torch.long), attention_mask=torch.ones(1, 32, dtype=torch.long),
                  original_sizes=torch.tensor([[16, 16], [20, 40]]))
    assert InputFrame.of(batch, 1, batch.original_sizes) == FRAME
    assert InputFrame.of(batch, 1) == InputFrame(side=8, content=(4, 8), original=(4, 8))
