"""Training input, one epoch at a time, on the workers of `jobs.train`.

Each epoch is its own dataset: images shuffled one by one in an order fixed by (seed, epoch),
minus the rows a resumed epoch already trained on (their (image id, copy) keys travel in the
checkpoint). Rank 0 builds it and splits it (`streaming_split(equal=True)`: every rank gets as
many rows as the others, so all ranks run out of data at the same batch, and the epoch ends
when its data ends, however many images were missing or undecodable). The other ranks receive
their iterators through the process group, so nothing depends on Ray Train's dataset setup.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipelines.training.datasets import detection_dataset
from pipelines.training.sampling import sample_keys


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epoch_shard(cfg: dict, epoch: int, exclude: np.ndarray, rank: int, world: int):
    """This rank's `DataIterator` over epoch `epoch` (rows whose keys are in `exclude` left out)."""
    splits = None
    if rank == 0:
        ds, _ = detection_dataset(cfg["data"], image_size=cfg["image_size"], max_size=cfg["model"]["max_size"],
                                  train=True, seed=cfg["seed"], epoch=epoch, scale_jitter=cfg["scale_jitter"],
                                  batch_size=cfg["batch_size"], repeat_factor_threshold=cfg["repeat_factor_threshold"],
                                  exclude_keys=exclude, max_pixels=cfg["max_pixels"],
                                  shuffle_window_bytes=cfg["shuffle_window_mb"] << 20)
        # The step lines are the run's progress. Ray Data's bars would be redrawn by the split
        # coordinator into the driver's log, through the log monitor, several times a second.
        ds.context.enable_progress_bars = False
        splits = ds.streaming_split(world, equal=True)
    if _distributed():
        box = [splits]
        dist.broadcast_object_list(box, src=0)
        splits = box[0]
    return splits[rank]


class StartedEpoch:
    """An epoch's batch iterator whose first batch is requested at once, in a thread.

    An epoch's first batch needs a new split coordinator (a process, Ray Data's imports, the
    executor) and its first shuffle window read and decoded: seconds. Made when the previous
    epoch ends, every worker would wait for that at each epoch start (measured on 2 workers
    here, with the all-to-all shuffle of before: a fifth of a 20-step window). Started a little
    before the previous epoch ends (`next_epoch_start_step`), it is ready when that one ends.
    Not earlier: once its first blocks wait unread, Ray Data 2.60's scheduling loop for it
    spins without sleeping (no task left to wait on) and takes a whole core until the epoch is
    read (measured: 0.6-1.0 core for the whole previous epoch when it was started with it).
    `ready_seconds` is how long the first batch took (None until it came).
    """

    _END = object()

    def __init__(self, shard, **iter_args):
        self._batches = iter(shard.iter_torch_batches(**iter_args))
        self._first, self._error, self.ready_seconds = self._END, None, None
        self._created = time.perf_counter()
        self._thread = threading.Thread(target=self._fetch_first, name="next-epoch-input", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first = next(self._batches, self._END)
            self.ready_seconds = time.perf_counter() - self._created
        except BaseException as exc:  # noqa: BLE001 - raised again in the training thread
            self._error = exc

    def close(self) -> None:
        """Stop the epoch's execution (a run that ends before this epoch needs it)."""
        self._thread.join()
        self._first = self._END
        self._batches.close()

    def __iter__(self) -> Iterator[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not self._END:
            first, self._first = self._first, self._END
            yield first
            yield from self._batches


def batch_keys(batch: dict) -> np.ndarray:
    """`sample_keys` of a collated batch's rows."""
    return sample_keys(batch["image_id"].numpy(), batch["copy"].numpy())


def gather_keys(local: list[np.ndarray]) -> np.ndarray:
    """Every rank's trained keys of this epoch, concatenated (called by all ranks)."""
    mine = np.concatenate(local) if local else np.zeros(0, np.int64)
    if not _distributed():
        return mine
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return np.concatenate(everyone)


def _reduce_over_ranks(values, dtype: torch.dtype, op) -> list:
    tensor = torch.tensor(values, dtype=dtype)
    if _distributed():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def sum_over_ranks(*counts: int) -> list[int]:
    """Element-wise sums of small counters over all ranks (called by all ranks)."""
    return _reduce_over_ranks(counts, torch.int64, dist.ReduceOp.SUM)


def max_over_ranks(*values: float) -> list[float]:
    """Element-wise maxima of small float values over all ranks (called by all ranks)."""
    return _reduce_over_ranks(values, torch.float64, dist.ReduceOp.MAX)


def next_epoch_start_step(steps_left: int, ready_seconds: float, step_seconds: float) -> int:
    """The step of this epoch (counted from its start) at which to start the next epoch's input:
    early enough that its first batch (which took `ready_seconds` last time) is ready when this
    epoch's `steps_left` steps of `step_seconds` are done, with half again as much to spare."""
    lead = math.ceil(1.5 * ready_seconds / max(step_seconds, 1e-6)) + 2
    return max(0, steps_left - lead)

