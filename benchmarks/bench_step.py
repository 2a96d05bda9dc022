"""The main job's training step against this machine's matmul rate, and what the optimiser costs.

    python benchmarks/bench_step.py                     # configs/shapes_tiny.yaml's model, objective, batch
    python benchmarks/bench_step.py --profile           # + torch.profiler's top operators
    python benchmarks/bench_step.py --compile vision    # + the step with torch.compile'd parts, same run
    python benchmarks/bench_step.py --bf16              # + the step under CPU bf16 autocast (Lightning's bf16-mixed)

One step = the detector's training forward (DAC halves), the objective, backward, gradient clipping
and AdamW, on pre-materialised batches of the built-in shapes dataset at the config's settings (no
data loading, no Lightning: what the step itself costs). Its FLOPs come from torch's
``FlopCounterMode``; the machine's rate is the best fp32 1024 x 1024 matmul measured in the same run,
so the share (step FLOP/s / matmul FLOP/s) compares machines that differ 2x in speed. AdamW runs as
torch's per-parameter loop, ``foreach`` and ``fused`` (what ``Sam3LitModule`` uses), alternated,
median of the repeats. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from sam3_train.callbacks import matmul_gflops  # noqa: E402
from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.lit import Sam3LitModule  # noqa: E402
from sam3_train.losses import Sam3Criterion  # noqa: E402
from sam3_train.optim import param_groups  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml"
SPLITS = {"train": 64, "val": 8, "test": 8}


def build(config: Path, shapes_root: str, num_batches: int):
    cfg = yaml.safe_load(config.read_text())
    model = dict(cfg["model"])
    criterion = Sam3Criterion(**model.pop("criterion")["init_args"])
    module = Sam3LitModule(**model, criterion=criterion, image_size=cfg["data"]["image_size"])
    data = {**cfg["data"], "shapes_root": shapes_root, "shapes_splits": SPLITS, "num_workers": 0}
    dm = Sam3DataModule(**data)
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return module, [next(loader) for _ in range(num_batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", choices=["vision", "transformer"], default=None,
                        help="also time the step with the vision encoder, or the DETR encoder and decoder "
                             "layers, under torch.compile (compile time reported apart)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time the step with forward and objective under torch.autocast('cpu', bfloat16), "
                             "next to the bf16 matmul rate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as shapes_root:
        module, batches = build(args.config, shapes_root, args.steps + 2)
    detector, criterion, h = module.detector.train(), module.criterion, module.hparams
    initial = copy.deepcopy(detector.state_dict())

    def optimizer(kind: str) -> torch.optim.Optimizer:
        groups = param_groups(detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text,
                              layer_decay=h.layer_decay, weight_decay=h.weight_decay)
        options = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        return torch.optim.AdamW(groups, lr=h.lr, **options)

    def step(batch, opt, bf16: bool = False) -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:  # what Lightning's bf16-mixed wraps: the forward and the objective
            outputs = detector(batch)
            loss = criterion.weighted_total(criterion(outputs, batch.targets), num_pairs=batch.num_pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)
        opt.step()

    opt = optimizer("fused")
    step(batches[0], opt)
    with FlopCounterMode(display=False) as counter:
        step(batches[1], opt)
    gflop = counter.get_total_flops() / 1e9

    times: dict[str, list[float]] = {"loop": [], "foreach": [], "fused": []}
    if args.bf16:
        times["bf16"] = []  # fused AdamW, bf16 autocast
    rates, bf16_rates = [], []
    for _ in range(args.repeats):
        rates.append(matmul_gflops())
        if args.bf16:
            bf16_rates.append(matmul_gflops(dtype=torch.bfloat16))
        for kind in times:
            detector.load_state_dict(initial)
            opt = optimizer("fused" if kind == "bf16" else kind)
            step(batches[0], opt, kind == "bf16")  # warm-up: optimiser state allocated
            start = time.perf_counter()
            for batch in batches[2:]:
                step(batch, opt, kind == "bf16")
            times[kind].append((time.perf_counter() - start) / len(batches[2:]))
    rate = statistics.median(rates)
    print(f"{args.config.name}: {gflop:.1f} GFLOP a step; fp32 1024x1024 matmul {rate:.0f} GFLOP/s "
          f"(median of {args.repeats}), {args.threads} threads")
    for kind, values in times.items():
        seconds = statistics.median(values)
        print(f"  AdamW {kind:<8} {seconds:.3f} s a step  {gflop / seconds:6.1f} GFLOP/s  "
              f"{100 * gflop / seconds / rate:4.1f}% of the matmul rate  ({seconds / statistics.median(times['loop']):.2f}x the loop)")
    if args.bf16:
        print(f"  bf16 1024x1024 matmul {statistics.median(bf16_rates):.0f} GFLOP/s "
              f"({statistics.median(bf16_rates) / rate:.1f}x fp32); bf16-autocast step "
              f"{statistics.median(times['bf16']) / statistics.median(times['fused']):.2f}x the fp32 fused step's time")
    if args.compile:
        detector.load_state_dict(initial)
        opt = optimizer("fused")
        start = time.perf_counter()
        if args.compile == "vision":
            detector.vision_encoder.compile()
        else:
            for layer in [*detector.detr_encoder.layers, *detector.detr_decoder.layers]:
                layer.compile()
        for batch in batches[:2]:  # compiles (and recompiles for the other pair count)
            step(batch, opt)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches[2:]:
            step(batch, opt)
        seconds = (time.perf_counter() - start) / len(batches[2:])
        fused = statistics.median(times["fused"])
        print(f"  compiled {args.compile:<11} {seconds:.3f} s a step ({fused / seconds:.2f}x the eager fused step); "
              f"compiling took {compile_seconds:.0f} s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        opt = optimizer("fused")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[2:5]:
                step(batch, opt)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
