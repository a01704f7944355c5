"""Training input one epoch at a time: the plan of epochs, each epoch's split, and when to
start the next one.

Each epoch is its own dataset: images in an order fixed by (seed, epoch), minus the rows a
resumed epoch already trained on (their (image id, copy) keys travel in the checkpoint). Rank 0
builds it and splits it (`streaming_split(equal=True)`: every rank gets as many rows as the
others, so all ranks run out of data at the same batch, and the epoch ends when its data ends,
however many images were missing or undecodable). The other ranks receive their iterators
through the process group, so nothing depends on Ray Train's dataset setup.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import numpy as np

from pipelines.errors import UserError
from pipelines.formats.annotations import category_image_pairs, train_image_counts
from pipelines.training.config import TrainConfig
from pipelines.training.datasets import PixelCollate, detection_dataset
from pipelines.training.distributed import broadcast_object, gather_arrays, max_over_ranks, sum_over_ranks
from pipelines.training.sampling import category_repeat_factors, epoch_sizes, sample_keys

TIMING_STEPS = 4  # steps of each epoch timed to decide when to start the next epoch's input
NO_KEYS = np.zeros(0, np.int64)


def steps_per_epoch(images: int, world: int, batch_size: int, accumulation: int = 1) -> int:
    """Steps a rank trains of an epoch of `images`: its equal split, in whole batches, each
    step `accumulation` of them (the rows of a step left over at the end are read, not trained)."""
    return (int(images) // world) // batch_size // accumulation


def plan_epochs(cfg: TrainConfig, num_images: int) -> tuple[list[int], int]:
    """(images planned in each epoch, total steps), on the driver.

    Every epoch holds all images once, or with repeat-factor sampling its exact repeated size
    (`sampling.epoch_sizes`, drawn per (seed, epoch)). --epochs counts such epochs (a fraction
    of the next one at the end); --max-steps stays as given. An epoch with missing or
    undecodable images ends early when its data ends, so the run then takes a few more epochs
    to its planned step.
    """
    workers, batch = cfg.num_workers, cfg.batch_size
    accumulation = cfg.accumulation(workers)  # planned at the most workers; a smaller group steps alike
    plain_steps = steps_per_epoch(num_images, workers, batch, accumulation)
    if plain_steps < 1:
        raise UserError(f"{cfg.data}: {num_images} images are fewer than one global batch "
                        f"({cfg.global_batch}); lower --global-batch, --batch-size or --num-workers")
    wanted = math.ceil(cfg.epochs) + 1 if cfg.epochs else cfg.max_steps // plain_steps + 2
    wanted = min(wanted, 1000)  # sizes for logging; later epochs reuse the last one
    sizes = np.full(wanted, num_images, np.int64)
    if cfg.repeat_factor_threshold:
        factors = category_repeat_factors(train_image_counts(cfg.data), num_images, cfg.repeat_factor_threshold)
        sizes = epoch_sizes(category_image_pairs(cfg.data), num_images, factors, cfg.seed, range(wanted))
    if cfg.max_steps:
        return sizes.tolist(), cfg.max_steps
    steps = [steps_per_epoch(size, workers, batch, accumulation) for size in sizes]
    whole = int(cfg.epochs)
    total = sum(steps[:whole]) + int(round((cfg.epochs - whole) * steps[whole]))
    return sizes.tolist(), max(1, total)


def planned_size(cfg: TrainConfig, epoch: int) -> int:
    """Images epoch `epoch` holds by the plan (epochs past the plan repeat its last size)."""
    return int(cfg.epoch_sizes[min(epoch, len(cfg.epoch_sizes) - 1)])


def epoch_shard(cfg: TrainConfig, epoch: int, exclude: np.ndarray, rank: int, world: int):
    """This rank's `DataIterator` over epoch `epoch` (rows whose keys are in `exclude` left out)."""
    splits = None
    if rank == 0:
        ds, _ = detection_dataset(cfg.data, image_size=cfg.image_size, max_size=cfg.model["max_size"],
                                  train=True, seed=cfg.seed, epoch=epoch, scale_jitter=cfg.scale_jitter,
                                  batch_size=cfg.batch_size, repeat_factor_threshold=cfg.repeat_factor_threshold,
                                  exclude_keys=exclude, max_pixels=cfg.max_pixels,
                                  shuffle_window_bytes=cfg.shuffle_window_mb << 20)
        # The step lines are the run's progress. Ray Data's bars would be redrawn by the split
        # coordinator into the driver's log, through the log monitor, several times a second.
        ds.context.enable_progress_bars = False
        splits = ds.streaming_split(world, equal=True)
    return broadcast_object(splits)[rank]


class StartedBatches:
    """A batch iterator whose first batch is requested at once, in a thread.

    An epoch's first batch needs a new split coordinator (a process, Ray Data's imports, the
    executor) and its first shuffle window read and decoded: seconds, during which every worker
    would wait at each epoch start. Started a little before the previous epoch ends
    (`next_epoch_start_step`), it is ready when that one ends. Not earlier: once its first
    blocks wait unread, Ray Data 2.60's scheduling loop for it spins without sleeping (no task
    left to wait on) and takes a whole core until the epoch is read (0.6-1.0 core for the whole
    previous epoch when started with it). `ready_seconds` is how long the first batch took
    (None until it came).
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


def next_epoch_start_step(steps_left: int, ready_seconds: float, step_seconds: float) -> int:
    """The step of this epoch (counted from its start) at which to start the next epoch's input:
    early enough that its first batch (which took `ready_seconds` last time) is ready when this
    epoch's `steps_left` steps of `step_seconds` are done, with half again as much to spare."""
    lead = math.ceil(1.5 * ready_seconds / max(step_seconds, 1e-6)) + 2
    return max(0, steps_left - lead)


class EpochFeed:
    """One rank's epochs of batches, each next one started in time (`StartedBatches`).

    When to start the next epoch's input is decided at the same step on every rank, from the
    ranks' slowest figures, so that the collectives inside `epoch_shard` match.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self._iter_args = dict(batch_size=cfg.batch_size, collate_fn=PixelCollate(cfg.model["size_divisible"]),
                               prefetch_batches=2, pin_memory=cfg.use_gpu)  # uint8: normalized on the device
        self._current = self._upcoming = None

    def _start(self, epoch: int, exclude: np.ndarray) -> StartedBatches:
        return StartedBatches(epoch_shard(self.cfg, epoch, exclude, self.rank, self.world), **self._iter_args)

    def begin(self, epoch: int, done: np.ndarray, step: int) -> StartedBatches:
        """Epoch `epoch`'s batches (without the `done` keys), started now unless started ahead."""
        self._current = self._upcoming if self._upcoming is not None else self._start(epoch, done)
        self._upcoming, self._epoch = None, epoch
        # what the resumed epoch has left, at this world size (the checkpoint may come from another)
        self._left = steps_per_epoch(planned_size(self.cfg, epoch) - len(done), self.world, self.cfg.batch_size,
                                     self.cfg.accumulation(self.world))
        self._next_needed = step + self._left < self.cfg.max_steps
        self._start_at = 0 if self._left <= TIMING_STEPS + 1 else None
        if self._next_needed and self._start_at == 0:
            self._upcoming = self._start(epoch + 1, NO_KEYS)
        return self._current

    def stepped(self, epoch_steps: int) -> None:
        """After each trained step (`epoch_steps` of this epoch so far), on every rank: time the
        first steps, start the next epoch's input when due."""
        if epoch_steps == 1:
            self._first_step_end = time.perf_counter()
        if not self._next_needed or self._upcoming is not None:
            return
        if epoch_steps == TIMING_STEPS + 1:
            ready, step_seconds = max_over_ranks(self._current.ready_seconds or 0.0,
                                                 (time.perf_counter() - self._first_step_end) / TIMING_STEPS)
            self._start_at = max(epoch_steps, next_epoch_start_step(self._left, ready, step_seconds))
        if epoch_steps == self._start_at:
            self._upcoming = self._start(self._epoch + 1, NO_KEYS)

    def close(self) -> None:
        """The run ended inside an epoch: stop the next one if it was started."""
        if self._upcoming is not None:
            self._upcoming.close()
            self._upcoming = None


class EpochTally:
    """What one rank read and trained of an epoch: the counts of its `epoch_end` line and the
    keys a checkpoint keeps."""

    def __init__(self):
        self.rows_read, self.steps, self.skipped, self.trained, self.exhausted = 0, 0, 0, [], True
        self.trained_rows = 0

    def trained_batch(self, batches: list[dict], skipped: bool) -> np.ndarray:
        """Count a step's micro-batches stepped on (`skipped`: an fp16 overflow skipped its
        update); their `sample_keys`."""
        keys = np.concatenate([sample_keys(b["image_id"].numpy(), b["copy"].numpy()) for b in batches])
        self.steps += 1
        self.trained_rows += len(keys)
        self.skipped += skipped
        self.trained.append(keys)
        return keys

    def keys(self, done: np.ndarray) -> np.ndarray:
        """Every rank's keys of this epoch so far, `done` (from the checkpoint) first (all ranks)."""
        return np.concatenate([done, gather_arrays(self.trained)])

    def summary(self, cfg: TrainConfig, epoch: int, step: int, done: np.ndarray) -> dict:
        """The `epoch_end` record, summed over ranks (all ranks)."""
        read, trained_rows = sum_over_ranks(self.rows_read, self.trained_rows)
        if not trained_rows and not len(done):
            raise RuntimeError(f"epoch {epoch}: not one full batch of readable images ({read} read); check --data")
        planned = planned_size(cfg, epoch)
        return {"event": "epoch_end", "epoch": epoch, "step": step, "planned_images": planned,
                "read": read + len(done), "trained": trained_rows + len(done),
                "missing_or_undecodable": max(0, planned - read - len(done)), "rank_tails": read - trained_rows}
