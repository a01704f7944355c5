"""Repeat-factor sampling for long-tailed training data (Gupta et al., LVIS).

Each category c gets r_c = max(1, sqrt(t / f_c)), f_c being the fraction of training images
that contain c (t = 0.001 by default); each image is repeated r_i = max over its categories
times per epoch, the fractional part by a coin flip. The coin is a hash of (seed, epoch,
image_id), so the stream is the same on every rerun and every worker, with no per-image loop.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def category_repeat_factors(images_per_category: dict[int, int], num_images: int,
                            threshold: float = 0.001) -> dict[int, float]:
    """r_c = max(1, sqrt(t / f_c)) with f_c = images containing c / all images."""
    return {int(c): max(1.0, float(np.sqrt(threshold / (n / max(num_images, 1))))) if n else 1.0
            for c, n in images_per_category.items()}


def _uniform(image_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A deterministic uniform [0, 1) per (seed, epoch, image id): splitmix64 of the three."""
    with np.errstate(over="ignore"):
        z = image_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64(seed * 1_000_003 + epoch) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _box_factors(category_ids: np.ndarray, factors: dict[int, float]) -> np.ndarray:
    """r_c of each box's category (1 for categories the factors do not list)."""
    keys = np.array(sorted(factors), dtype=np.int64)
    values = np.array([factors[k] for k in keys.tolist()], dtype=np.float64)
    if not len(keys):
        return np.ones(len(category_ids))
    position = np.clip(np.searchsorted(keys, category_ids), 0, len(keys) - 1)
    return np.where(keys[position] == category_ids, values[position], 1.0)


def _draw_counts(per_image: np.ndarray, image_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """floor(r_i), plus one where the (seed, epoch, image id) coin falls under r_i's fraction."""
    whole = np.floor(per_image)
    return (whole + (_uniform(np.asarray(image_ids), seed, epoch) < per_image - whole)).astype(np.int64)


def image_repeat_counts(category_ids: pa.ChunkedArray | pa.Array, image_ids: np.ndarray,
                        factors: dict[int, float], seed: int, epoch: int) -> np.ndarray:
    """How many times each image appears this epoch: floor(r_i) or floor(r_i) + 1."""
    lists = category_ids.combine_chunks() if isinstance(category_ids, pa.ChunkedArray) else category_ids
    flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(lists).to_numpy()
    per_image = np.ones(len(image_ids))
    np.maximum.at(per_image, parents, _box_factors(flat, factors))
    return _draw_counts(per_image, image_ids, seed, epoch)


def epoch_sizes(category_image_pairs: np.ndarray, num_images: int, factors: dict[int, float],
                seed: int, epochs: range) -> np.ndarray:
    """Rows of the repeated stream in each of `epochs`, exactly what `repeat_rows` yields.

    `category_image_pairs` holds (category_id, image_id) per annotation; images without one
    appear once. Training needs the shortest epoch to fix its steps per epoch up front.
    """
    image_ids, image_index = np.unique(category_image_pairs[:, 1], return_inverse=True)
    per_image = np.ones(len(image_ids))
    np.maximum.at(per_image, image_index, _box_factors(category_image_pairs[:, 0], factors))
    unlabeled = num_images - len(image_ids)
    return np.array([unlabeled + _draw_counts(per_image, image_ids, seed, e).sum() for e in epochs], dtype=np.int64)


def repeat_rows(batch: pa.Table, factors: dict[int, float] | None, seed: int = 0, epoch: int = 0) -> pa.Table:
    """Ray Data `map_batches` step (pyarrow format): each row repeated by its image's count, with
    a ``copy`` column (0, 1, ... per image) that gives each copy its own flip and jitter and its
    own `sample_keys` entry. Without `factors` every row is kept once (copy 0)."""
    if not factors:
        return batch.append_column("copy", pa.array(np.zeros(batch.num_rows, np.int32)))
    counts = image_repeat_counts(batch.column("category_id"), batch.column("image_id").to_numpy(), factors, seed, epoch)
    copies = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return batch.take(pa.array(np.repeat(np.arange(batch.num_rows), counts))).append_column(
        "copy", pa.array(copies.astype(np.int32)))


MAX_COPIES = 1 << 10


def drop_keys(table: pa.Table, keys: np.ndarray) -> pa.Table:
    """The rows of `table` whose `sample_keys` are not in the sorted `keys` (rows a resumed
    epoch has already trained)."""
    rows = sample_keys(table["image_id"].to_numpy(), table["copy"].to_numpy())
    position = np.searchsorted(keys, rows).clip(0, max(len(keys) - 1, 0))
    return table.filter(pa.array(keys[position] != rows))


def sample_keys(image_ids: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """One int64 per row of an epoch, (image id, copy): what a resumed epoch leaves out."""
    copies = np.asarray(copies, np.int64)
    if len(copies) and copies.max() >= MAX_COPIES:
        raise ValueError(f"an image repeated {copies.max() + 1} times; at most {MAX_COPIES} per epoch")
    return np.asarray(image_ids, np.int64) * MAX_COPIES + copies
