"""The data engine's process group: every rank runs the whole round loop, in step.

Lightning launches DDP ranks by re-running the script (``_SubprocessScriptLauncher``), and only at the
first ``Trainer`` call. The engine reads and writes round state between trainer calls, so it starts
the process group itself, first thing, with Fabric's launcher (the same mechanism; under torchrun or
SLURM it only joins the group). Every later ``Trainer`` then finds ``LOCAL_RANK`` set and the group
initialised, and reuses both (``_init_dist_connection`` returns early).

    world = launch(accelerator="cpu", devices=2, num_nodes=1)   # re-runs this script as rank 1
    if is_main(): write_marker(...)
    barrier()
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

import torch.distributed as torch_dist

KILL_ENV = "SAM3_ENGINE_KILL_AT"  # fault injection for the resumability tests: "<point>" or "<point>:<n>"
_hits: dict[str, int] = {}


def launch(*, accelerator: str = "auto", devices: int | str | list[int] = "auto", num_nodes: int = 1) -> int:
    """Start (or join) the process group for ``devices`` x ``num_nodes`` processes; returns the world size.

    A single process starts nothing. Several: the launching process re-runs ``sys.argv`` once per
    extra local rank, exactly as ``Trainer(strategy="ddp")`` would.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes)
    if fabric.world_size > 1:
        fabric.launch()
    return fabric.world_size


def _initialised() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if _initialised() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if _initialised() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialised():
        torch_dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled): one decision, taken once, shared by all."""
    if not _initialised():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank. An exception raised there is raised on every
    rank (a bad path must stop all of them, not leave the others waiting at the next collective)."""
    result: Any = None
    if is_main():
        try:
            result = ("ok", fn())
        except Exception as exn:  # re-raised below, on every rank
            result = ("error", exn)
    status, value = broadcast(result)
    if status == "error":
        raise value
    return value


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, no ``finally``) when ``$SAM3_ENGINE_KILL_AT`` names
    this point, optionally at its n-th visit (``write:3``). Only rank 0 dies; its DDP peers then fail
    at their next collective, as after a real crash. Tests use it to interrupt a round exactly there."""
    spec = os.environ.get(KILL_ENV)
    if not spec or rank() != 0:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
