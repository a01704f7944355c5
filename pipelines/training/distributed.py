"""The few collectives the training engine runs besides DDP's, on small values.

Each one is called by every rank at the same point of the loop (a rank that skips one leaves
the others waiting forever), and each one is a no-op outside a process group of two or more,
so the same code runs in one process, in tests and on a cluster.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from retinanet.losses import is_distributed


def broadcast_object(value, src: int = 0):
    """Rank `src`'s `value` on every rank (a picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_arrays(local: list[np.ndarray]) -> np.ndarray:
    """Every rank's int64 arrays, concatenated in rank order."""
    mine = np.concatenate(local) if local else np.zeros(0, np.int64)
    if not is_distributed():
        return mine
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return np.concatenate(everyone)


def _reduce_over_ranks(values, dtype: torch.dtype, op) -> list:
    tensor = torch.tensor(values, dtype=dtype)
    if is_distributed():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def sum_over_ranks(*counts: int) -> list[int]:
    """Element-wise sums of small counters over all ranks."""
    return _reduce_over_ranks(counts, torch.int64, dist.ReduceOp.SUM)


def max_over_ranks(*values: float) -> list[float]:
    """Element-wise maxima of small float values over all ranks."""
    return _reduce_over_ranks(values, torch.float64, dist.ReduceOp.MAX)
