"""The main job's training step against this machine's matmul rate, and what the optimiser costs.

    python benchmarks/bench_step.py                     # configs/shapes_tiny.yaml's model, objective, batch
    python benchmarks/bench_step.py --profile           # + torch.profiler's top operators
    python benchmarks/bench_step.py --compile vision    # + the step with torch.compile'd parts, same run
    python benchmarks/bench_step.py --bf16              # + the step under CPU bf16 autocast (Lightning's bf16-mixed)
    python benchmarks/bench_step.py --text-padding      # + the step with the text padded to SAM 3's 32 tokens
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --sweep --threads 1   # throughput against the batch shape

``--sweep`` times the fused step (no AdamW variants) for each batch shape of ``--shapes`` (images x
phrases per image, default 4 to 32 images at 6 phrases and 3 to 12 phrases at 8 images) and each preset
of ``--presets`` (``tiny``: configs/shapes_tiny.yaml, ``small``: configs/shapes_small.yaml), and prints
images/s, (image, phrase) pairs/s (the pairs a batch really holds: images have few labelled phrases),
the step's GFLOP, the fp32 matmul rate measured right before each shape's timed steps, the step's
share of it and the 1-minute load average (others' work on a shared machine).
Where images/s stops growing with the batch, the step has stopped being dispatch-bound.

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
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from sam3_train.callbacks import matmul_gflops  # noqa: E402
from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.lit import Sam3LitModule  # noqa: E402
from sam3_train.losses import Sam3Criterion  # noqa: E402
from sam3_train.optim import param_groups  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml"
SPLITS = {"train": 64, "val": 8, "test": 8}


PRESET_CONFIGS = {"tiny": CONFIG, "small": CONFIG.with_name("shapes_small.yaml")}
SWEEP_SHAPES = ["4x6", "8x6", "16x6", "32x6", "8x3", "8x12"]


def build(config: Path, shapes_root: str, num_batches: int, **data_overrides):
    """The config's LightningModule and ``num_batches`` training batches (``data_overrides``: e.g.
    ``batch_size``, ``max_phrases_per_image``)."""
    cfg = yaml.safe_load(config.read_text())
    model = dict(cfg["model"])
    criterion = Sam3Criterion(**model.pop("criterion")["init_args"])
    module = Sam3LitModule(**model, criterion=criterion, image_size=cfg["data"]["image_size"])
    data = {**cfg["data"], "shapes_root": shapes_root, "shapes_splits": SPLITS, "num_workers": 0, **data_overrides}
    dm = Sam3DataModule(**data)
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return module, [next(loader) for _ in range(num_batches)]


PHASES = ("forward", "objective", "backward", "clipping", "optimizer")


def train_step(detector, criterion, batch, opt, bf16: bool = False) -> None:
    """One optimiser step as ``Sam3LitModule`` trains: forward, objective, backward, clipping, AdamW.
    Each phase runs in a profiler range (a few microseconds a step unprofiled) that ``phase_table`` reads."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:  # what Lightning's bf16-mixed wraps: the forward and the objective
        with record_function("phase:forward"):
            outputs = detector(batch)
        with record_function("phase:objective"):
            loss = criterion.weighted_total(criterion(outputs, batch.targets), num_pairs=batch.num_pairs)
    opt.zero_grad(set_to_none=True)
    with record_function("phase:backward"):
        loss.backward()
    with record_function("phase:clipping"):
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)
    with record_function("phase:optimizer"):
        opt.step()


def phase_table(prof, steps: int) -> str:
    """Wall time and aten calls a step in each phase of ``train_step`` (an aten call counts once, in
    the phase whose range holds it; the backward's calls run in the ``backward`` range)."""
    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end, e.name.split(":", 1)[1]) for e in events
              if e.name.startswith("phase:")]
    calls = dict.fromkeys(PHASES, 0)
    for e in events:
        if e.name.startswith("aten::"):
            for start, end, name in ranges:
                if start <= e.time_range.start and e.time_range.end <= end:
                    calls[name] += 1
                    break
    ms = dict.fromkeys(PHASES, 0.0)
    for start, end, name in ranges:
        ms[name] += (end - start) / 1e3
    total = sum(ms.values())
    rows = [f"  {name:<10} {ms[name] / steps:7.1f} ms a step ({100 * ms[name] / total:4.1f}%)  "
            f"{calls[name] / steps:7.0f} aten calls a step (nested ones included)" for name in PHASES]
    return "The step's phases (profiled, so slower than the timed step):\n" + "\n".join(rows)


def sweep(args: argparse.Namespace) -> None:
    """Throughput of the fused step for each preset and batch shape (see the module docstring)."""
    print(f"{'preset':<6} {'shape':>6} {'pairs':>6} {'GFLOP':>6} {'s/step':>7} {'img/s':>6} {'pairs/s':>8} "
          f"{'matmul':>7} {'share':>6} {'load':>5}   ({args.threads} threads, {args.steps} timed steps a shape)")
    for preset in args.presets:
        for shape in args.shapes:
            images, phrases = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory() as shapes_root:
                module, batches = build(PRESET_CONFIGS[preset], shapes_root, args.steps + 2,
                                        batch_size=images, max_phrases_per_image=phrases)
            detector, criterion, h = module.detector.train(), module.criterion, module.hparams
            opt = torch.optim.AdamW(param_groups(detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text,
                                                 layer_decay=h.layer_decay, weight_decay=h.weight_decay),
                                    lr=h.lr, fused=True)
            train_step(detector, criterion, batches[0], opt)  # warm-up: optimiser state allocated
            with FlopCounterMode(display=False) as counter:
                train_step(detector, criterion, batches[1], opt)
            timed = batches[2:]
            # The rate right before the timed steps: a shared machine's load changes within a sweep.
            rate = statistics.median(matmul_gflops() for _ in range(3))
            start = time.perf_counter()
            for batch in timed:
                train_step(detector, criterion, batch, opt)
            seconds = (time.perf_counter() - start) / len(timed)
            # FLOPs of batch 1 scaled to the timed batches' mean pair count (the pair count varies).
            pairs = statistics.mean(b.num_pairs for b in timed)
            gflop = counter.get_total_flops() / 1e9 * pairs / batches[1].num_pairs
            print(f"{preset:<6} {shape:>6} {pairs:6.1f} {gflop:6.1f} {seconds:7.3f} {images / seconds:6.1f} "
                  f"{pairs / seconds:8.1f} {rate:7.0f} {100 * gflop / seconds / rate:5.1f}% {os.getloadavg()[0]:5.1f}",
                  flush=True)


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
    parser.add_argument("--text-padding", action="store_true",
                        help="also time the step with every phrase's 32 token columns (the step before "
                             "Sam3Detector.trim_text_padding), same run")
    parser.add_argument("--sweep", action="store_true",
                        help="only the throughput sweep over --shapes and --presets (module docstring)")
    parser.add_argument("--shapes", nargs="+", default=SWEEP_SHAPES, help="IMAGESxPHRASES batch shapes of --sweep")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESET_CONFIGS), default=["tiny", "small"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        sweep(args)
        return
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
        train_step(detector, criterion, batch, opt, bf16)

    opt = optimizer("fused")
    step(batches[0], opt)
    with FlopCounterMode(display=False) as counter:
        step(batches[1], opt)
    gflop = counter.get_total_flops() / 1e9

    times: dict[str, list[float]] = {"loop": [], "foreach": [], "fused": []}
    if args.bf16:
        times["bf16"] = []  # fused AdamW, bf16 autocast
    if args.text_padding:
        times["padded"] = []  # fused AdamW, text not trimmed (an instance attribute shadows the staticmethod)
    rates, bf16_rates = [], []
    for _ in range(args.repeats):
        rates.append(matmul_gflops())
        if args.bf16:
            bf16_rates.append(matmul_gflops(dtype=torch.bfloat16))
        for kind in times:
            detector.load_state_dict(initial)
            if kind == "padded":
                detector.trim_text_padding = lambda ids, mask: (ids, mask)
            opt = optimizer("fused" if kind in ("bf16", "padded") else kind)
            step(batches[0], opt, kind == "bf16")  # warm-up: optimiser state allocated
            start = time.perf_counter()
            for batch in batches[2:]:
                step(batch, opt, kind == "bf16")
            times[kind].append((time.perf_counter() - start) / len(batches[2:]))
            detector.__dict__.pop("trim_text_padding", None)
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
    if args.text_padding:
        print(f"  text padded to 32 tokens: {statistics.median(times['padded']) / statistics.median(times['fused']):.2f}x "
              f"the fused step's time (which trims to the longest phrase: {batches[2].attention_mask.sum(1).max()} tokens)")
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
                train_step(detector, criterion, batch, opt)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        print(phase_table(prof, steps=len(batches[2:5])))


if __name__ == "__main__":
    main()
