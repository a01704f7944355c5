"""Each training epoch's order of prepared shards: a seeded two-level shuffle that scales.

Ray Data's `random_shuffle` is an all-to-all: every map task returns one piece per output
block, so an epoch of N blocks makes N^2 objects and moves every encoded image through the
object store before the first row comes out (10M images in ~12k blocks of 128 MiB: ~144M
objects per epoch, ~1.6 TB exchanged). Instead, each epoch

1. cuts every shard into units of `UNIT_ROWS` consecutive rows (the shards' row groups) and
   permutes all units of all shards with the epoch's seed;
2. deals the permuted units, in that order, into windows of about `window_bytes` of encoded
   images; each window is one read task, which reads its units (ranged reads of row groups from
   many shards), repeats rows for repeat-factor sampling, permutes its rows with (epoch seed,
   window), and leaves out the rows a resumed epoch has already trained.

The epoch is its windows in order: fixed by (seed, epoch), every image read once by one task,
the first rows out as soon as the first window is read. A batch draws its images from one
window: with COCO-sized images (~160 KB) and 256 MiB windows, ~1,600 images from ~25 units of
64 images each in random places of the dataset. A dataset smaller than a window is one window:
one permutation of all its rows. Repeat-factor copies of an image stay in its window.

The driver passes the shard list only (O(shards), as the manifest); each task recomputes the
units from it (one numpy permutation of images / 64 entries, milliseconds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.formats.shards import ROW_GROUP_IMAGES
from pipelines.training.sampling import drop_keys, repeat_rows

UNIT_ROWS = ROW_GROUP_IMAGES
WINDOW_BYTES = 256 << 20
BYTES_PER_IMAGE_UNKNOWN = 160 << 10  # manifests without shard sizes: a COCO image
# A Ray worker with pyarrow and Ray Data loaded, before any data, with the 25% headroom Ray
# Data's memory check asks for: it saw read tasks' workers peak at 381-396 MiB with a 36 MB window.
WORKER_BASE_BYTES = 400 << 20


@dataclass(frozen=True)
class EpochOrder:
    """The units and windows of one epoch, from the manifest's shards and the epoch's seed."""

    uris: tuple[str, ...]
    rows: tuple[int, ...]
    num_bytes: tuple[int, ...]
    seed: int
    window_bytes: int = WINDOW_BYTES

    @classmethod
    def of_shards(cls, uris: list[str], shards: list[dict], seed: int, window_bytes: int = WINDOW_BYTES) -> EpochOrder:
        """From the manifest's shard entries ({"num_images", "num_bytes"}) of `uris`."""
        return cls(tuple(uris), tuple(int(s["num_images"]) for s in shards),
                   tuple(int(s.get("num_bytes") or 0) for s in shards), seed, window_bytes)

    def units(self) -> np.ndarray:
        """(shard index, first row, end row) of every unit, in the epoch's order."""
        rows = np.asarray(self.rows, np.int64)
        per_shard = -(-rows // UNIT_ROWS)
        shard = np.repeat(np.arange(len(rows)), per_shard)
        start = (np.arange(per_shard.sum()) - np.repeat(np.cumsum(per_shard) - per_shard, per_shard)) * UNIT_ROWS
        units = np.stack([shard, start, np.minimum(start + UNIT_ROWS, rows[shard])], 1)
        return units[np.random.default_rng(self.seed).permutation(len(units))]

    def _bytes_per_row(self) -> np.ndarray:
        rows, sizes = np.asarray(self.rows, np.float64), np.asarray(self.num_bytes, np.float64)
        return np.where(sizes > 0, sizes / np.maximum(rows, 1), np.where(rows > 0, BYTES_PER_IMAGE_UNKNOWN, 0.0))

    def window_bounds(self, units: np.ndarray) -> np.ndarray:
        """b with window w = units[b[w]:b[w + 1]]: window k holds the units whose bytes before
        them (in the epoch's order) are in [k, k + 1) x `window_bytes`, so a window's bytes are
        less than `window_bytes` plus one unit."""
        unit_bytes = (units[:, 2] - units[:, 1]) * self._bytes_per_row()[units[:, 0]]
        window_of = ((np.cumsum(unit_bytes) - unit_bytes) // self.window_bytes).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, window_of[1:] != window_of[:-1]]) if len(units) else np.zeros(0, np.int64)
        return np.r_[starts, len(units)]

    def max_window_bytes(self) -> int:
        """At most the bytes of one window (of the whole dataset when that is less)."""
        unit = UNIT_ROWS * float(self._bytes_per_row().max(initial=0))
        return int(min(self.window_bytes + unit, float(np.dot(self.rows, self._bytes_per_row()))))

    def num_windows(self) -> int:
        return len(self.window_bounds(self.units())) - 1


def shuffled_epoch(uris: list[str], shards: list[dict], columns: list[str], *, seed: int, epoch_seed: int,
                   epoch: int, factors: dict[int, float] | None, exclude_keys: np.ndarray | None,
                   window_bytes: int = WINDOW_BYTES) -> ray.data.Dataset:
    """The rows of epoch `epoch` (module doc), with a ``copy`` column as `repeat_rows` adds it.

    `shards` are the manifest's entries ({"num_images", "num_bytes"}) of `uris`; `seed` and
    `epoch` draw the repeat counts, `epoch_seed` the order. Each read task declares as memory a
    worker's own (`WORKER_BASE_BYTES`) plus three times its window's bytes (the rows read,
    repeated, permuted).
    """
    order = EpochOrder.of_shards(uris, shards, epoch_seed, window_bytes)
    windows = order.num_windows()
    window_memory = WORKER_BASE_BYTES + 3 * order.max_window_bytes()
    keys = np.unique(exclude_keys) if exclude_keys is not None and len(exclude_keys) else None
    ds = ray.data.from_items([{"window": w} for w in range(windows)], override_num_blocks=max(1, windows))
    return ds.map_batches(read_window, batch_size=1, batch_format="pyarrow", memory=window_memory,
                          fn_kwargs={"order": order, "columns": columns, "factors": factors, "seed": seed,
                                     "epoch": epoch, "exclude_keys": keys})


def read_window(batch: pa.Table, order: EpochOrder, columns: list[str], factors: dict[int, float] | None,
                seed: int, epoch: int, exclude_keys: np.ndarray | None) -> pa.Table:
    """Ray Data `map_batches` step (one row: the window's index) -> the window's rows, permuted."""
    window = batch["window"][0].as_py()
    units = order.units()
    bounds = order.window_bounds(units)
    mine = units[bounds[window]:bounds[window + 1]]
    mine = mine[np.lexsort((mine[:, 1], mine[:, 0]))]  # by shard, then row: each file opened once
    shard_of = mine[:, 0]
    tables = [read_rows(order.uris[s], mine[shard_of == s, 1:], columns) for s in np.unique(shard_of).tolist()]
    table = repeat_rows(pa.concat_tables(tables), factors, seed, epoch)
    table = table.take(pa.array(np.random.default_rng([order.seed, window]).permutation(table.num_rows)))
    # after the permutation: a resumed epoch keeps the order of the rows it has left
    return drop_keys(table, exclude_keys) if exclude_keys is not None else table


def read_rows(uri: str, ranges: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows [start, end) of each range of one Parquet shard, in that order, reading only the row
    groups they touch (ranged reads on object storage)."""
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        meta = parquet.metadata
        group_start = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        lengths = ranges[:, 1] - ranges[:, 0]
        wanted = np.repeat(ranges[:, 0] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        if len(wanted) and wanted.max() >= group_start[-1]:
            raise ValueError(f"{uri}: {group_start[-1]} rows, but its manifest entry has more; rerun jobs.prepare")
        group_of = np.searchsorted(group_start, wanted, side="right") - 1
        groups = np.unique(group_of)
        table = parquet.read_row_groups(groups.tolist(), columns=columns)
    sizes = group_start[groups + 1] - group_start[groups]
    offset = np.cumsum(sizes) - sizes - group_start[groups]  # a row's position in `table` minus its row
    return table.take(pa.array(wanted + offset[np.searchsorted(groups, group_of)]))
