"""Ranks under torchrun: one process group per process, and the few collectives the stages use.

``torchrun --nproc_per_node N -m iprox.cli run cfg.toml`` (or ``features``) starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`world` initialises the group on first use:
NCCL on CUDA, after ``torch.cuda.set_device(LOCAL_RANK)`` (without it every rank's first collective
would use GPU 0 and hang), gloo on the CPU. Without torchrun everything here is a no-op on one rank.

The convention of every stage: all ranks compute, rank 0 alone writes shared files (stage folders,
checkpoints, logs) and the others wait at a barrier before reading them; decisions that depend on the
file system (skip, resume, refuse) are made on rank 0 and broadcast, with its error if it raised.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """A CUDA device spec becomes this rank's own GPU (``cuda:<LOCAL_RANK>``) under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective of ``backend``: NCCL moves only CUDA
    tensors, so host tensors (the step's loss sums, host-offloaded state) travel through this rank's
    GPU; gloo takes them where they are."""
    if str(backend).lower() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` over ranks in place (gloo and NCCL both take float32/float64 tensors)."""
    if world()[1] > 1:
        import torch.distributed as dist

        wire = wire_device(dist.get_backend(), t.device)
        if wire == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(wire)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved)
    return t


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (n_r, d) rows, concatenated in rank order (ranks may hold different n_r)."""
    rank, n = world()
    if n <= 1:
        return x
    import torch.distributed as dist

    home = x.device
    x = x.to(wire_device(dist.get_backend(), home))
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts, count)
    top = int(max(c.item() for c in counts))
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)]).to(home)


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 and gives every rank its result; if it raised, every rank raises (rank 0
    its own error, the others a RuntimeError naming it), so no rank is left waiting at a collective."""
    rank, n = world()
    if n <= 1:
        return fn()
    import torch.distributed as dist

    box: list = [None, None]
    error = None
    if rank == 0:
        try:
            box[0] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below, on every rank)
            error, box[1] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed: {box[1]}")
    return box[0]


def on_every_rank(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on every rank (each on its own share of some work) and returns its result; if it
    raised on any rank, every rank raises (that rank its own error, the others a RuntimeError naming
    it), so no rank waits forever at the collective that follows."""
    rank, n = world()
    if n <= 1:
        return fn()
    import torch.distributed as dist

    res, error = None, None
    try:
        res = fn()
    except BaseException as e:  # noqa: BLE001  (re-raised below, on every rank)
        error = e
    msgs: list = [None] * n
    dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return res
