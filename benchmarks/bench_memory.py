"""Peak training memory of one SAM 3 step, measured without a GPU: the table to read before renting one.

    python benchmarks/bench_memory.py                       # released sizes (sam3 preset), 1008 px, every setting
    python benchmarks/bench_memory.py --check               # the method against a real CPU step (small preset)
    python benchmarks/bench_memory.py --preset tiny --image-size 224 --only full_fp32

How. The step runs on *fake* tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
devices, no data, no arithmetic) under torch's ``MemTracker``, which follows every tensor storage's
life and keeps the peak of their sum, split into parameters, gradients, optimiser state, activations
and temporaries. The step is the one ``Sam3LitModule`` trains: ``zero_grad(set_to_none)``, the
detector's training forward (DAC halves) under the precision's autocast, SAM 3's objective, backward,
gradient clipping, fused AdamW over the framework's parameter groups; two steps, so the second runs
with the optimiser state the first allocated.

Two things in the step depend on values, which fake tensors do not have, and are replaced here:
- The matchers' assignments (scipy's Hungarian solve, the one-to-many top-k over IoU). The stand-ins
  compute the same cost matrices and return index tensors of the same length: each target matched once
  for one-to-one and ``topk`` times for one-to-many (the upper bound). Which query gets which target
  does not change a tensor's size.
- Target-side bookkeeping (packing boxes, gathering matched masks, semantic unions) runs on the real
  targets: the fake mode below runs an operator for real whenever none of its inputs is fake.

What the fake run cannot see, and the ``--check`` mode: the table counts tensors, as the CUDA caching
allocator's ``max_memory_allocated`` does, not the allocator's reserved slack, the CUDA context
(~0.5 GB) or cuBLAS/cuDNN workspaces; "fits" below keeps 2 GiB for those. Autocast is the CPU's bf16
autocast (CUDA's casts the same matmul, conv and attention ops to bf16). Attention runs through
``scaled_dot_product_attention`` like on a GPU (no probability matrix kept). ``--check`` runs the same
step at a size the CPU can run three ways, all with the stand-in matchers: fake tensors under
MemTracker, real tensors under MemTracker, and real tensors under the profiler's allocator events (the
CPU allocator's own running total and its peak); the three should agree
(tests/test_memory_estimate.py checks it at the tiny preset).

Why torch internals. No public torch API does either half: meta-device tensors refuse the real
targets (a device mismatch) and every data-dependent operator (``nonzero``, ``.tolist()``), so only
the private ``FakeTensorMode`` runs this step on shapes; and only the private ``MemTracker``
(``torch.distributed._tools``) follows every storage through autograd's backward and the optimiser,
with ``Tracker`` below reaching into its internals. A torch upgrade can therefore break this benchmark
(not training): its accuracy test is in the slow lane, which CI runs (``pytest -m "not slow"`` does
not even import this file), so the break shows there, with the test named.

Results: README ("Memory") and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from unittest import mock
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils._pytree import tree_leaves

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

from sam3_train.data import Sam3DataModule  # noqa: E402
from sam3_train.losses import Sam3Criterion  # noqa: E402
from sam3_train.losses.matcher import HungarianMatcher, MatchIndices, OneToManyMatcher  # noqa: E402
from sam3_train.losses.targets import as_packed  # noqa: E402
from sam3_train.model import build_detector  # noqa: E402
from sam3_train.model.lora import LoraSettings, apply_lora  # noqa: E402
from sam3_train.optim import param_groups  # noqa: E402

GIB = 2**30
HEADROOM_GIB = 2.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
GPUS_GIB = (24, 40, 80)
LORA_TARGETS = ["vit_attention", "detr_encoder_attention", "detr_decoder_attention"]  # configs/sam3_lora.yaml


@dataclass(frozen=True)
class Setting:
    name: str
    precision: str = "32-true"  # or "bf16-mixed"
    checkpointing: bool = False
    freeze_vision: bool = False
    lora_rank: int | None = None
    masks: bool = True  # the mask and semantic-segmentation losses (and the pixel decoder's training outputs)

    def describe(self) -> str:
        parts = ["fp32" if self.precision == "32-true" else "bf16 autocast"]
        if self.checkpointing:
            parts.append("act. checkpointing")
        if self.freeze_vision:
            parts.append("frozen vision")
        if self.lora_rank:
            parts.append(f"LoRA r{self.lora_rank}")
        if not self.masks:
            parts.append("boxes only")
        return ", ".join(parts)


SETTINGS = [
    Setting("full_fp32"),
    Setting("full_bf16", precision="bf16-mixed"),
    Setting("full_bf16_ckpt", precision="bf16-mixed", checkpointing=True),
    Setting("frozen_vision_bf16_ckpt", precision="bf16-mixed", checkpointing=True, freeze_vision=True),
    Setting("lora16_bf16_ckpt", precision="bf16-mixed", checkpointing=True, lora_rank=16),
    Setting("full_fp32_boxes", masks=False),
    Setting("full_bf16_ckpt_boxes", precision="bf16-mixed", checkpointing=True, masks=False),
    Setting("lora16_bf16_ckpt_boxes", precision="bf16-mixed", checkpointing=True, lora_rank=16, masks=False),
]
BATCHES = {"1x1": (1, 1), "2x4": (2, 4), "1x16": (1, 16)}  # images x phrases per image (1x16: the shipped configs)


class PartlyFakeMode(FakeTensorMode):
    """FakeTensorMode that runs an operator for real when it has tensor inputs and none is fake.

    Predictions are fake (they come from fake weights); targets are real, so the objective's
    data-dependent bookkeeping on targets alone (``nonzero``, ``unique``, ``.tolist()``) still works.
    Factory operators (no tensor inputs) stay fake while ``fake_factories`` is set: the model is built
    that way; inside the step they are real, so index and position tensors made on the fly are real
    like the targets they are combined with, except inside the fake mode's own decompositions of an
    operator (a dtype cast's empty buffer), which stay fake.
    """

    fake_factories = True
    _depth = 0  # > 0 while the fake mode runs an operator's decomposition: its own factories stay fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if (self._depth == 0 and not any(isinstance(t, FakeTensor) for t in tensors)
                and (tensors or not self.fake_factories)):
            return func(*args, **kwargs)
        self._depth += 1
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._depth -= 1


class Tracker(MemTracker):
    """torch's MemTracker, for models with frozen parameters and for the whole-step peak only.

    - torch's tracker hooks every parameter's gradient and fails on one that needs none (frozen
      encoders, LoRA's base, the detector's unused weights); this one hooks only trainable ones.
    - After every operator torch's tracker also updates the peak of every module seen so far: with
      SAM 3's ~1,000 modules that was 80% of a step's run time. Only the step's peak is kept here.
    """

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for param in module.parameters():
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                def track(grad: torch.Tensor) -> None:
                    self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(track), param.register_post_accumulate_grad_hook(lambda p: track(p.grad)))
        return memory


def _standin_one_to_one(self: HungarianMatcher, outputs: dict, targets) -> MatchIndices:
    """The Hungarian matcher's cost matrix, then each target matched once (query i to target i)."""
    packed = as_packed(targets, outputs["pred_logits"].device)
    self.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], packed)
    pair, query = [], []
    for p, n in enumerate(packed.num_boxes.tolist()):
        pair += [p] * n
        query += range(n)
    return _indices(pair, query, query, packed)


def _standin_one_to_many(self: OneToManyMatcher, outputs: dict, targets) -> MatchIndices:
    """The one-to-many matcher's scores, then each target matched ``topk`` times (its most)."""
    packed = as_packed(targets, outputs["pred_logits"].device)
    self.scores(outputs["pred_logits"], outputs["pred_boxes"], packed)
    num_queries = outputs["pred_logits"].shape[1]
    pair, query, local = [], [], []
    for p, n in enumerate(packed.num_boxes.tolist()):
        for t in range(n):
            pair += [p] * self.topk
            query += [(t * self.topk + k) % num_queries for k in range(self.topk)]
            local += [t] * self.topk
    return _indices(pair, query, local, packed)


def _indices(pair: list[int], query: list[int], local: list[int], packed) -> MatchIndices:
    pair_t = torch.tensor(pair, dtype=torch.long)
    return MatchIndices(pair_t, torch.tensor(query, dtype=torch.long),
                        torch.tensor(local, dtype=torch.long) + packed.offsets[pair_t])


def make_batches(root: Path, *, image_size: int, images: int, phrases: int, count: int = 2) -> list:
    """``count`` real batches of the built-in shapes dataset at ``image_size`` (images x phrases)."""
    dm = Sam3DataModule(shapes_root=str(root), shapes_splits={"train": 16, "val": 2, "test": 2}, image_size=image_size,
                        batch_size=images, max_phrases_per_image=phrases, num_workers=0,
                        # a shapes image holds up to 8 kinds of shape: 16 phrases need negatives (SA-Co's have many)
                        negative_share=0.5 if phrases > 8 else 0.0,
                        steps_per_epoch=count)
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.train_dataloader())


def build(setting: Setting, preset: str, image_size: int):
    """The detector, objective and optimiser ``Sam3LitModule`` would build for ``setting``."""
    detector = build_detector(preset, image_size=image_size, activation_checkpointing=setting.checkpointing,
                              init="transformers")  # the init only sets values, which fake tensors lack
    if setting.lora_rank:
        # peft moves each new adapter to its base layer's device and dtype with Module.to, which cannot swap
        # fake parameters; here everything is fp32 on one device already.
        with mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None), \
                mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
            apply_lora(detector, LoraSettings(rank=setting.lora_rank, alpha=2.0 * setting.lora_rank, dropout=0.05,
                                              target_modules=LORA_TARGETS))
    if setting.freeze_vision:
        detector.vision_encoder.requires_grad_(False)
    criterion = Sam3Criterion(use_masks=setting.masks, use_semantic=setting.masks)
    detector.train_masks = criterion.needs_masks
    if not criterion.needs_masks:
        detector.freeze_mask_path()  # as Sam3LitModule
    groups = param_groups(detector, lr=8e-5, lr_vision=2.5e-5, lr_text=5e-6, layer_decay=0.9, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=8e-5, fused=True)  # as Sam3LitModule
    return detector.train(), criterion, optimizer


def train_step(detector, criterion, optimizer, batch, precision: str) -> None:
    """One optimiser step as Lightning runs ``Sam3LitModule`` (automatic optimisation, clip 0.1)."""
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    with autocast:
        outputs = detector(batch)
        loss = criterion.weighted_total(criterion(outputs, batch.targets), num_pairs=batch.num_pairs)
    loss.backward()
    del outputs, loss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    optimizer.step()


@contextlib.contextmanager
def standin_matchers():
    saved = HungarianMatcher.forward, OneToManyMatcher.forward
    HungarianMatcher.forward, OneToManyMatcher.forward = _standin_one_to_one, _standin_one_to_many
    try:
        yield
    finally:
        HungarianMatcher.forward, OneToManyMatcher.forward = saved


def allocate_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's moments exist before the measured step, as in every step after the first."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tracked_peak(setting: Setting, preset: str, image_size: int, batch, *, fake: bool,
                 standins: bool | None = None) -> dict:
    """MemTracker's peak (bytes, by kind) of one training step, on fake or real tensors. ``standins``
    (default: with fake tensors) replaces the matchers' assignments (module docstring)."""
    mode = PartlyFakeMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    standins = fake if standins is None else standins
    with warnings.catch_warnings(), mode, (standin_matchers() if standins else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        detector, criterion, optimizer = build(setting, preset, image_size)
        allocate_optimizer_state(optimizer)
        if fake:
            mode.fake_factories = False
        tracker = Tracker()
        tracker.track_external(detector, optimizer)
        with tracker:
            train_step(detector, criterion, optimizer, batch, setting.precision)
        return _by_kind(tracker.get_tracker_snapshot("peak"))


def allocator_peak(setting: Setting, preset: str, image_size: int, batch, *, standins: bool = True) -> int:
    """The CPU allocator's own peak (bytes) over one real training step: what was resident before
    (weights, optimiser state) plus the highest running total the allocator reports to the profiler."""
    detector, criterion, optimizer = build(setting, preset, image_size)
    allocate_optimizer_state(optimizer)
    gc.collect()
    tensors = [*detector.parameters(), *detector.buffers(),
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    with (standin_matchers() if standins else contextlib.nullcontext()), \
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(detector, criterion, optimizer, batch, setting.precision)
    with tempfile.TemporaryDirectory() as tmp:  # the allocator's running total is in the trace's memory events
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    # The reporter's total runs over the whole process: start from what it counted before this step.
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    peak = max(e["args"]["Total Allocated"] for e in memory) - before
    return resident + peak


def _by_kind(snapshot: dict) -> dict:
    """{'Total': bytes, 'Parameter': ..., ...} summed over devices (a CPU run has one)."""
    out: dict[str, int] = {}
    for per_device in snapshot.values():
        for kind, value in per_device.items():
            key = getattr(kind, "value", str(kind))
            out[key] = out.get(key, 0) + int(value)
    return out


def fits(peak_bytes: int) -> str:
    """The GPU sizes (GiB) that hold the peak with HEADROOM_GIB to spare."""
    ok = [f"{g}" for g in GPUS_GIB if peak_bytes / GIB + HEADROOM_GIB <= g]
    return " / ".join(ok) if ok else "none of " + " / ".join(map(str, GPUS_GIB))


def table(preset: str, image_size: int, names: list[str], batch_names: list[str], root: Path,
          rows: list[dict], save) -> list[dict]:
    """Every (batch, setting) row not in ``rows`` yet; ``save(rows)`` after each (a long run resumes)."""
    settings = [s for s in SETTINGS if not names or s.name in names]
    for batch_name in batch_names:
        images, phrases = BATCHES[batch_name]
        (batch,) = make_batches(root, image_size=image_size, images=images, phrases=phrases, count=1)
        for setting in settings:
            if any(r["setting"] == setting.name and r["batch"] == batch_name for r in rows):
                continue
            start = time.perf_counter()
            peak = tracked_peak(setting, preset, image_size, batch, fake=True)
            row = {"setting": setting.name, "description": setting.describe(), "batch": batch_name,
                   "pairs": batch.num_pairs, "peak_gib": peak["Total"] / GIB, "fits_gib": fits(peak["Total"]),
                   **{f"{k.lower()}_gib": v / GIB for k, v in peak.items() if k != "Total"},
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            save(rows)
            print(f"{batch_name:<4} {setting.describe():<48} peak {row['peak_gib']:6.2f} GiB "
                  f"(weights {row['parameter_gib']:.2f}, gradients {row['gradient_gib']:.2f}, optimiser {row['optstate_gib']:.2f}, "
                  f"activations {row['activation_gib']:.2f}, temporaries {row['temp_gib']:.2f})  fits: {row['fits_gib']}",
                  flush=True)
    return rows


def check(preset: str, image_size: int, root: Path) -> list[dict]:
    """The method against real steps: fake and real tensors under the tracker, and the CPU allocator."""
    (batch,) = make_batches(root, image_size=image_size, images=2, phrases=4, count=1)
    rows = []
    for setting in SETTINGS:
        # The same step three ways: the stand-in matchers in all (at random weights the one-to-many
        # matcher finds fewer matches than its top-k bound, so the real matchers run a smaller step).
        fake = tracked_peak(setting, preset, image_size, batch, fake=True)["Total"]
        real = tracked_peak(setting, preset, image_size, batch, fake=False, standins=True)["Total"]
        allocator = allocator_peak(setting, preset, image_size, batch)
        rows.append({"setting": setting.name, "fake_tracked_mib": fake / 2**20, "real_tracked_mib": real / 2**20,
                     "allocator_mib": allocator / 2**20})
        print(f"{setting.describe():<48} fake {fake / 2**20:8.1f} MiB  real {real / 2**20:8.1f} MiB  "
              f"allocator {allocator / 2**20:8.1f} MiB  fake/allocator {fake / allocator:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: sam3 (the table), small (--check)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 1008 (the table), 224 (--check)")
    parser.add_argument("--only", nargs="*", default=[], choices=[s.name for s in SETTINGS])
    parser.add_argument("--batches", nargs="*", default=["1x1", "2x4"], choices=list(BATCHES))
    parser.add_argument("--check", action="store_true", help="compare with real CPU steps instead")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows; rows already there are kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    check_mode = args.check
    preset = args.preset or ("small" if check_mode else "sam3")
    size = args.image_size or (224 if check_mode else 1008)

    def save(rows: list[dict]) -> None:
        if args.out:
            args.out.write_text(json.dumps({"preset": preset, "image_size": size, "torch": torch.__version__,
                                            "headroom_gib": HEADROOM_GIB, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        if check_mode:
            save(check(preset, size, Path(tmp)))
        else:
            done = json.loads(args.out.read_text())["rows"] if args.out and args.out.exists() else []
            table(preset, size, args.only, args.batches, Path(tmp), done, save)

if __name__ == "__main__":
    main()
