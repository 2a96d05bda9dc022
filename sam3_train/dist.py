"""torch.distributed helpers that also work in a single process (no process group).

Every function here is a collective when a process group of more than one rank exists: all ranks
must call it at the same point, in the same order (Lightning's checkpoint save is such a point: it
runs ``dump_checkpoint`` on every rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# Substrings of the errors gloo and NCCL raise when a peer died or stopped answering.
_PEER_FAILURE_MARKERS = (
    "connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
    "nccl communicator was aborted", "watchdog", "socket", "gloo", "unhandled system error", "connection refused",
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
