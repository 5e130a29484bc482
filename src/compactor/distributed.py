"""More than one process under ``torchrun``: the one place that reads ``RANK`` /
``WORLD_SIZE``, and the collectives calibration needs.

Calibration is data-parallel: each process takes every ``world``-th batch of the
calibration windows, observes its own share, and the per-module statistics are summed
across processes (all-reduce). The modules of a group that share an input (q/k/v, gate/up)
are then solved by owner processes chosen by size (:func:`owners`), each broadcasting its
result (:func:`broadcast_module`), and every process propagates its own windows. gloo on
CPU; nothing here assumes CPU (nccl works the same).
"""

from __future__ import annotations

import os

import torch

from compactor.errors import CompactorError


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises a gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def shutdown() -> None:
    """Destroy the process group (if any) while the interpreter is still whole.

    Why: a process that exits with its gloo group alive can abort (SIGABRT) in interpreter
    finalization, when gloo's worker threads free the tensors of finished work objects after
    Python is gone — the rank that finishes first is the one that dies (pytorch/pytorch#179291,
    seen in CI on the torchrun distill test). Destroying a gloo group is local: it waits for no
    peer, so a rank done early leaves without blocking the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shard_batches(n_windows: int, batch: int, rank: int, world: int) -> list[int]:
    """Window indices of this process: every ``world``-th batch of ``batch`` windows, so each
    batch is the same forward pass as in a single process."""
    starts = list(range(0, n_windows, batch))[rank::world]
    return [i for s in starts for i in range(s, min(s + batch, n_windows))]


def all_reduce_stats(stat) -> None:
    """Sum a calibration statistic over all processes, in place: Hessian sums and counts;
    input moments (sums), maxima (max) and counts. Row samples cannot be merged into what
    one process would have drawn, so a statistic that keeps them is refused."""
    from compactor.primitives.hessian import HessianAccumulator
    from compactor.primitives.stats import InputSample

    dist = torch.distributed
    if isinstance(stat, HessianAccumulator):
        dist.all_reduce(stat.sum, op=dist.ReduceOp.SUM)
        count = torch.tensor([stat.count], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        stat.count = int(count)
    elif isinstance(stat, InputSample):
        if stat.max_rows:
            raise CompactorError("this method keeps a sample of input rows, which cannot be merged "
                                 "across processes yet: run it in one process (without torchrun)")
        for t in (stat.abs_sum, stat.sq_sum):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.all_reduce(stat.abs_max, op=dist.ReduceOp.MAX)
        count = torch.tensor([stat.count], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        stat.count = int(count)
    else:
        raise CompactorError(f"statistic {type(stat).__name__} cannot be reduced across processes")


def owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Which process solves each module: largest first, each to the least-loaded process
    (by parameter count), as llm-compressor assigns its GPTQ work. Deterministic, so every
    process computes the same assignment without talking."""
    load = [0] * world
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += sizes[name]
    return out


def broadcast_module(module, src: int):
    """``module`` from process ``src`` to every process (the others pass None). Peers of one
    torchrun job exchange the solved module over the process group (pickled by
    ``broadcast_object_list``: trusted, in-job data, never a file)."""
    box = [module]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
