"""Batches of preprocessed rows (`pipelines.images.transforms.preprocess_batch`) -> model input.

Images cross from the data pipeline to the model as uint8, channels-last and zero-padded
(`collate_pixels`): a quarter of float32's bytes through the iterator, pinned memory and the
host-to-device copy, and built with numpy alone. That matters because Ray Data runs a collate
function in a thread beside the training step: torch work there (a float batch, normalizing)
starts a second team of intra-op threads that competes with the step's own on the same cores
(measured: the training step ran ~9% slower on a 2-core machine). `normalize_images` then runs
where the model runs, on the GPU when there is one. `collate_detection_batch` does both, for
callers that want float images on the CPU (validation, inference, tests).

Targets are padded to the largest box count M in the batch (boxes with 0, labels with -1) and
`num_boxes` says how many are real: the batched matcher needs no Python loop. Batches without
`boxes`/`labels` (inference) get M = 0; a null `image_id` becomes -1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipelines.images.transforms import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch


def _int_column(batch: dict, name: str, default: int) -> np.ndarray:
    values = np.asarray(batch[name])
    if values.dtype == object:  # nulls (custom images have no image_id) as None ...
        values = np.asarray([default if v is None else v for v in values])
    elif values.dtype.kind == "f":  # ... or as NaN, depending on how the batch was made
        values = np.where(np.isnan(values), default, values)
    return np.array(values, np.int64)  # a copy: Ray's arrays are read-only


def padded_size(heights: np.ndarray, widths: np.ndarray, size_divisible: int) -> tuple[int, int]:
    """The batch's (height, width): the largest image rounded up to `size_divisible`, so every
    FPN level divides evenly."""
    pad_h = -(-max(int(heights.max(initial=0)), 1) // size_divisible) * size_divisible
    pad_w = -(-max(int(widths.max(initial=0)), 1) // size_divisible) * size_divisible
    return int(pad_h), int(pad_w)


def arrow_columns(table) -> dict:
    """A pyarrow Table of preprocessed rows as `collate_pixels` reads them, without copying the
    pixels: binary columns become per-row uint8 views into Arrow's own buffers (which Ray maps
    from its object store), the other columns numpy arrays. Saves one full copy of every batch's
    decoded pixels (~50 MB per batch of 16 at 800 px) in the process that feeds the GPU."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table[name]
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            out[name] = binary_views(column)
        else:
            out[name] = column.to_numpy()
    return out


def binary_views(column) -> list[np.ndarray]:
    """Each value of a binary Array or ChunkedArray as a uint8 view into Arrow's buffer (no copy)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return [view for chunk in column.chunks for view in binary_views(chunk)]
    chunk = column
    _, offsets, data = chunk.buffers()
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    bounds = np.frombuffer(offsets, width)[chunk.offset:chunk.offset + len(chunk) + 1]
    values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return [values[bounds[i]:bounds[i + 1]] for i in range(len(chunk))]


def collate_pixels(batch: dict, size_divisible: int = 128) -> dict[str, torch.Tensor]:
    """Rows (numpy columns, or `arrow_columns` of a Table) -> ``pixels`` uint8 [n, H, W, 3]
    (zero-padded at the bottom/right to a multiple of `size_divisible`), ``image_sizes`` [n, 2],
    padded ``boxes``/``labels``, ``num_boxes``, ``image_id``, ``copy``, ``scale``, ``original_sizes``.
    No torch computation (see module doc)."""
    import torch

    heights = np.asarray(batch["height"], np.int64)
    widths = np.asarray(batch["width"], np.int64)
    n = len(heights)
    pixels = np.zeros((n, *padded_size(heights, widths, size_divisible), 3), np.uint8)
    for i, data in enumerate(batch["pixels"]):  # one copy per image: sizes differ
        h, w = heights[i], widths[i]
        if h and w:
            pixels[i, :h, :w] = np.frombuffer(data, np.uint8).reshape(h, w, 3)

    if "boxes" in batch:
        counts = np.asarray(batch["num_boxes"], np.int64)
        flat_boxes = np.frombuffer(b"".join(batch["boxes"]), np.float32).reshape(-1, 4)
        flat_labels = np.frombuffer(b"".join(batch["labels"]), np.int64)
    else:
        counts = np.zeros(n, np.int64)
        flat_boxes, flat_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    m = int(counts.max(initial=0))
    rows = np.repeat(np.arange(n), counts)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    boxes = np.zeros((n, m, 4), np.float32)
    labels = np.full((n, m), -1, np.int64)
    boxes[rows, cols] = flat_boxes
    labels[rows, cols] = flat_labels

    return {
        "pixels": torch.from_numpy(pixels),
        "image_sizes": torch.from_numpy(np.stack([heights, widths], axis=1)),
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(labels),
        "num_boxes": torch.from_numpy(np.array(counts)),
        "image_id": torch.from_numpy(_int_column(batch, "image_id", -1)),
        "copy": torch.from_numpy(_int_column(batch, "copy", 0) if "copy" in batch else np.zeros(n, np.int64)),
        "scale": torch.from_numpy(np.array(batch["scale"], np.float32)),
        "original_sizes": torch.from_numpy(np.stack(
            [np.asarray(batch["orig_height"], np.int64), np.asarray(batch["orig_width"], np.int64)], axis=1)),
    }


def normalize_images(pixels: torch.Tensor, image_sizes: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, channels_last: bool = False) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] normalized with the model's mean/std (0..1 scale),
    on the pixels' device; the padding outside each image's `image_sizes` is exactly 0, as
    torchvision's batching leaves it. `channels_last` keeps the memory layout the pixels already
    have (what a GPU model in channels_last wants); otherwise the result is contiguous NCHW."""
    import torch

    n, height, width, _ = pixels.shape
    device = pixels.device
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    bias = -torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) / std_t
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.empty((n, 3, height, width), dtype=torch.float32, device=device, memory_format=layout)
    images.copy_(pixels.permute(0, 3, 1, 2))  # uint8 -> float and the layout change in one pass
    torch.addcmul(bias, images, scale, out=images)
    sizes = image_sizes.to(device)
    inside = ((torch.arange(height, device=device).view(1, height, 1) < sizes[:, 0].view(n, 1, 1))
              & (torch.arange(width, device=device).view(1, 1, width) < sizes[:, 1].view(n, 1, 1)))
    return images.masked_fill_(~inside.unsqueeze(1), 0.0)


def collate_detection_batch(batch: dict[str, np.ndarray], size_divisible: int = 128,
                            mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> dict[str, torch.Tensor]:
    """`collate_pixels` with the pixels normalized on the CPU: ``images`` float32 [n, 3, H, W]
    instead of ``pixels`` (for `iter_torch_batches(collate_fn=...)` outside a training loop)."""
    out = collate_pixels(batch, size_divisible)
    out["images"] = normalize_images(out.pop("pixels"), out["image_sizes"], mean, std)
    return out
