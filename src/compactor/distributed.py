"""More than one process under ``torchrun``: the one place that reads ``RANK`` /
``WORLD_SIZE``, and the collectives calibration needs.

Calibration is data-parallel: each process takes every ``world``-th batch of the
calibration windows, observes its own share, and the per-module statistics are summed
across processes (all-reduce) before every process solves the same problem and
propagates its own windows. gloo on CPU; nothing here assumes CPU (nccl works the same).
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
