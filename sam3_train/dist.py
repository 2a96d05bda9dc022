"""torch.distributed helpers that also work in a single process (no process group).

The one place that says which rank this process is (:func:`rank_and_world`). Every other function
except :func:`launch` and :func:`is_peer_failure` is a collective when a process group of more than
one rank exists: all ranks must call it at the same point, in the same order (Lightning's checkpoint
save is such a point: it runs ``dump_checkpoint`` on every rank).

Code that runs between trainer calls (the data engine's round loop) starts the group itself::

    launch(accelerator="cpu", devices=2, num_nodes=1)   # re-runs this script as rank 1
    if is_rank_zero(): write_marker(...)
    barrier()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

# The variables a launcher (torchrun, Lightning's DDP, SLURM's srun through Lightning) sets to place a
# process in a group. A child process that must start its own group (the engine's verifier fits, the
# tests' CLI runs) gets an environment without them: see :func:`env_without_dist`.
DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR")

# Substrings of the errors gloo and NCCL raise when a peer died or stopped answering.
_PEER_FAILURE_MARKERS = (
    "connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
    "nccl communicator was aborted", "watchdog", "socket", "gloo", "unhandled system error", "connection refused",
)


def env_without_dist(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) without :data:`DIST_VARS`: for a child process that
    launches its own process group instead of joining this one."""
    import os

    return {k: v for k, v in (os.environ if env is None else env).items() if k not in DIST_VARS}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world(trainer: Any = None) -> tuple[int, int]:
    """(global rank, world size): the ``trainer``'s when given (a DataModule knows its place from
    its trainer, also where no process group exists yet), else the process group's, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    return rank_and_world()[0] == 0


def launch(*, accelerator: str = "auto", devices: int | str | list[int] = "auto", num_nodes: int = 1) -> int:
    """Start (or join) the process group of ``devices`` x ``num_nodes`` processes; returns the world size.

    Lightning launches DDP ranks by re-running the script, at the first ``Trainer`` call. Code that
    reads and writes shared state between trainer calls starts the group first, with Fabric's
    launcher (the same mechanism; under torchrun or SLURM it only joins their group). Every later
    ``Trainer`` finds ``LOCAL_RANK`` set and the group initialised, and reuses both. A single process
    starts nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes)
    if fabric.world_size > 1:
        fabric.launch()
    return fabric.world_size


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled): one decision, taken once, shared by all."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank. An exception raised there is raised on every
    rank (a bad path must stop all of them, not leave the others waiting at the next collective)."""
    result: Any = None
    if is_rank_zero():
        try:
            result = ("ok", fn())
        except Exception as exn:  # re-raised below, on every rank
            result = ("error", exn)
    status, value = broadcast(result)
    if status == "error":
        raise value
    return value


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool | int, device: torch.device | str = "cpu") -> int:
    """The largest of ``flag`` over all ranks (0 / False on every rank: 0)."""
    if not is_distributed():
        return int(flag)
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def is_peer_failure(exn: BaseException) -> bool:
    """Whether ``exn`` looks like a collective that failed because another rank died or hung."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exn, dist_error):
        return True
    text = str(exn).lower()
    return isinstance(exn, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)
