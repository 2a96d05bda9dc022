"""Detector step time, and what encoding each image once (instead of once per phrase) buys.

    python benchmarks/bench_detector.py                 # tiny + small, and sam3 component timings
    python benchmarks/bench_detector.py --skip-sam3     # without the (slow, ~minutes) sam3 part

For ``tiny`` and ``small`` at 2 images x 8 phrases (training mode, DAC on) it times a forward +
backward step (a) with shared image encoding, as the trainer runs, and (b) with every pair carrying
its own copy of the image (the vision encoder runs 16 times). It also times the vision encoder alone
on the 16 copies, which gives its share of step (b) and the ideal shared-encoding step:
``ideal = (b) - vision + vision / phrases_per_image``. Efficiency = ideal time / measured time (a).

For ``sam3`` (1008 px) a full step is too slow on a CPU, so it times components once in eval mode:
the vision encoder on one image and everything after it for one pair, then derives the same
figures for an image with 8 phrases. Results print as a table and are saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sam3_train.data import Batch
from sam3_train.model import build_detector

PHRASES = ["red star", "blue circle", "small green square", "large yellow triangle",
           "purple heart", "orange cross", "star", "small star"]


def make_batch(det, images: int, phrases: list[str], shared: bool) -> Batch:
    side = det.image_size
    pixels = torch.randn(images, 3, side, side)
    pair_image = torch.arange(images).repeat_interleave(len(phrases))
    ids, mask = det.tokenize(phrases * images)
    if not shared:  # one image copy per pair
        pixels, pair_image = pixels[pair_image], torch.arange(len(pair_image))
    return Batch(images=pixels, image_sizes=torch.full((len(pixels), 2), side), pair_image=pair_image,
                 input_ids=ids, attention_mask=mask)


def output_sum(out: dict) -> torch.Tensor:
    """A scalar touching every output, so the backward pass covers the whole model."""
    total = sum(v.float().mean() for v in out.values() if torch.is_tensor(v))
    total = total + sum(v.float().mean() for v in out.get("o2m", {}).values() if torch.is_tensor(v))
    return total


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_preset(preset: str, repeats: int) -> dict:
    torch.manual_seed(0)
    det = build_detector(preset).train()
    params = sum(p.numel() for p in det.parameters())

    def step(batch):
        det.zero_grad(set_to_none=True)
        output_sum(det(batch)).backward()

    shared = make_batch(det, 2, PHRASES, shared=True)
    per_pair = make_batch(det, 2, PHRASES, shared=False)

    def vision_only():
        det.zero_grad(set_to_none=True)
        out = det.vision_encoder(per_pair.images)
        sum(level.mean() for level in out.fpn_hidden_states[:-1]).backward()

    t_shared = timed(lambda: step(shared), repeats)
    t_per_pair = timed(lambda: step(per_pair), repeats)
    t_vision = timed(vision_only, repeats)
    ideal = t_per_pair - t_vision + t_vision / len(PHRASES)
    return {
        "preset": preset, "params_M": round(params / 1e6, 2), "batch": "2 images x 8 phrases",
        "step_shared_s": t_shared, "step_per_pair_s": t_per_pair, "vision_per_pair_s": t_vision,
        "vision_share_of_per_pair_step": t_vision / t_per_pair,
        "speedup": t_per_pair / t_shared, "ideal_speedup": t_per_pair / ideal,
        "efficiency_vs_ideal": ideal / t_shared,
    }


@torch.no_grad()
def bench_sam3_components(phrases_per_image: int = 8) -> dict:
    """Forward-only component timings of the released sizes at 1008 px (one image, one pair)."""
    torch.manual_seed(0)
    det = build_detector("sam3").eval()
    single = make_batch(det, 1, PHRASES[:1], shared=True)
    start = time.perf_counter()
    vision = det.vision_encoder(single.images)
    t_vision = time.perf_counter() - start

    def rest():
        levels = list(vision.fpn_hidden_states[:-1])
        pos = list(vision.fpn_position_encoding[:-1])
        text, mask = det.encode_text(single.input_ids, single.attention_mask)
        memory, memory_pos, shape = det.encode_fusion(levels[-1], pos[-1], text, mask)
        from sam3_train.model.decoder import run_decoder

        states = run_decoder(det.detr_decoder, vision_features=memory, vision_pos=memory_pos, text_features=text,
                             text_mask=mask, spatial_shape=shape, dac=False)
        det.dot_product_scoring(decoder_hidden_states=states.hidden, text_features=text, text_mask=mask)
        det.mask_decoder(decoder_queries=states.hidden[-1], backbone_features=levels, encoder_hidden_states=memory,
                         prompt_features=text, prompt_mask=mask)

    t_rest = timed(rest, repeats=1, warmup=1)
    n = phrases_per_image
    per_pair = n * (t_vision + t_rest)
    shared = t_vision + n * t_rest
    return {
        "preset": "sam3", "image_size": det.image_size, "vision_forward_1_image_s": t_vision,
        "rest_forward_1_pair_s": t_rest, "vision_share_of_pair_forward": t_vision / (t_vision + t_rest),
        f"forward_{n}_phrases_per_pair_encoding_s": per_pair, f"forward_{n}_phrases_shared_s": shared,
        "ideal_speedup": per_pair / shared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sam3", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detector.json"))
    args = parser.parse_args()
    results = [bench_preset(p, args.repeats) for p in ("tiny", "small")]
    for r in results:
        print(f"{r['preset']:>5} ({r['params_M']} M): step {r['step_shared_s']:.3f} s shared vs "
              f"{r['step_per_pair_s']:.3f} s per-pair encoding; vision share {r['vision_share_of_per_pair_step']:.0%}; "
              f"speed-up {r['speedup']:.2f}x of ideal {r['ideal_speedup']:.2f}x "
              f"(efficiency {r['efficiency_vs_ideal']:.0%})")
    if not args.skip_sam3:
        s = bench_sam3_components()
        results.append(s)
        print(f" sam3 ({s['image_size']} px, forward): vision {s['vision_forward_1_image_s']:.1f} s per image, "
              f"rest {s['rest_forward_1_pair_s']:.2f} s per pair; vision share {s['vision_share_of_pair_forward']:.0%}; "
              f"ideal speed-up at 8 phrases/image {s['ideal_speedup']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "results": results}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
