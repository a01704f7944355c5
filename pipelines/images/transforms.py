"""Per-image and per-batch transforms: decode, resize, flip, normalize, collate.

No Ray here on purpose: the same functions run inside Ray Data `map_batches`, in a torch
`DataLoader` baseline and on a GPU box without Ray. Images travel between stages as raw uint8
pixels in a binary column plus height/width, never as variable-shape tensor columns (fragile in
Ray 2.60).

Rows produced by `preprocess_batch` (the columns `collate_detection_batch` reads):
``image_id`` int64, ``pixels`` binary (uint8 HxWx3 RGB, resized and maybe flipped),
``height``/``width`` int32 after resize, ``orig_height``/``orig_width`` int32, ``scale``
float32 (resized / original), ``boxes`` binary (float32 [n, 4] xyxy in resized pixels),
``labels`` binary (int64 [n], contiguous class index), ``num_boxes`` int32.
Batches of such rows become tensors in `pipelines.images.collate`.
"""
from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.images import pixel_limit
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5..8 swap width and height


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image (empty, truncated, corrupt, another format)."""


# ---------------------------------------------------------------------------------- decoding
def _open(data: bytes, max_pixels: int | None = None) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file")
    if max_pixels:
        pixel_limit.replace_pil_guard()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not a supported image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image too large (decompression bomb guard)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken headers
        raise ImageDecodeError(f"unreadable header ({type(exc).__name__}: {exc})") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image will look after its EXIF orientation is applied."""
    w, h = img.size
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Load pixels, apply EXIF orientation and convert any mode to 8-bit RGB."""
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - keep the pixels when EXIF is malformed
        pass
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit grayscale (PNG) opens as I;16 or I: PIL's convert would clip at 255, so
        # rescale 0..65535 to 0..255 instead; float images are taken as 0..255.
        arr = np.array(img, dtype=np.float32)  # one float32 copy, scaled in place: ~10 bytes/pixel at the peak
        if img.mode != "F":
            arr *= np.float32(255.0 / 65535.0)
        arr += np.float32(0.5)
        gray = np.clip(arr, 0, 255, out=arr).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # drop alpha the way torchvision's RGB read mode does
    return img.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 HxWx3 RGB with EXIF orientation applied.

    Raises `ImageDecodeError` with a short reason for anything that is not a readable image.
    """
    return np.asarray(_to_rgb(_open(data)))


def probe_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after orientation, decoding every byte so truncation is caught.

    JPEGs decode at reduced DCT scale (`draft`), which reads the whole stream at a fraction
    of the cost: `jobs.prepare` checks every image this way without paying a full decode.
    Other formats above `max_pixels` are refused (`pipelines.images.pixel_limit`).
    """
    img = _open(data, max_pixels)
    width, height = _oriented_size(img)
    if img.format == "JPEG":
        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    if pixel_limit.exceeds(*img.size, max_pixels):
        raise ImageDecodeError(pixel_limit.describe(width, height, max_pixels))
    _to_rgb(img)
    return width, height


# ---------------------------------------------------------------------------- resize / flip
def resized_shape(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """Shorter side to `min_size` unless the longer side would exceed `max_size` (paper: 800/1333)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_boxes(boxes: np.ndarray, old_hw: Sequence[int], new_hw: Sequence[int]) -> np.ndarray:
    """Scale xyxy boxes from an image of size `old_hw` to `new_hw` (per axis)."""
    sy, sx = new_hw[0] / old_hw[0], new_hw[1] / old_hw[1]
    return (np.asarray(boxes, np.float32).reshape(-1, 4) * np.float32([sx, sy, sx, sy])).astype(np.float32)


def resize_image(image: np.ndarray, min_size: float, max_size: float) -> np.ndarray:
    """Resize an HxWx3 uint8 image (bilinear, PIL) so its sides obey `resized_shape`."""
    new_h, new_w = resized_shape(image.shape[0], image.shape[1], min_size, max_size)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an HxWx3 image and its xyxy boxes left-right."""
    width = image.shape[1]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.ascontiguousarray(image[:, ::-1]), flipped


def load_resized(data: bytes, min_size: float, max_size: float,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize in one go; returns (pixels, (orig_height, orig_width)).

    Large JPEGs are decoded at a reduced DCT scale first (never below the target size, and
    small enough for `max_pixels`), which is where most of the decode time of big photos goes;
    other images above `max_pixels` raise `ImageDecodeError` naming their size.
    """
    img = _open(data, max_pixels)
    width, height = _oriented_size(img)
    new_h, new_w = resized_shape(height, width, min_size, max_size)
    if img.format == "JPEG":
        swap = img.size != (width, height)
        request = pixel_limit.draft_request(*img.size, (new_h, new_w) if swap else (new_w, new_h), max_pixels)
        if request:
            img.draft("RGB", request)
    if pixel_limit.exceeds(*img.size, max_pixels):
        raise ImageDecodeError(pixel_limit.describe(width, height, max_pixels))
    img = _to_rgb(img)
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(img), (height, width)


# ------------------------------------------------------------------------ batch preprocessing
def _list_values(column, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list<...> column -> (flat numpy values, per-row counts), vectorized."""
    import pyarrow as pa  # local: the DataLoader path never needs pyarrow

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    counts = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten()
    if width is not None:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    return (flat.reshape(-1, width) if width else flat), counts


def preprocess_batch(
    batch,
    *,
    category_ids: Sequence[int],
    min_size: float,
    max_size: float,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    execution: int = 0,
    scale_jitter: tuple[float, float] | None = None,
    flip_prob: float = 0.5,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Shard rows (pyarrow table) -> training rows for `collate_detection_batch`.

    Targets are made vectorized for the whole batch (crowd boxes dropped, category ids mapped
    to contiguous labels = position in the sorted `category_ids`); decode/resize/flip are per
    image because images differ in size. Randomness (flip, scale jitter) comes from a
    generator seeded by (seed, epoch, execution, image_id, copy), so it does not depend on block
    boundaries or scheduling, and each repeat-factor copy of an image (the optional ``copy``
    column, passed through) draws its own. Scale jitter multiplies the shorter side only; the
    longer side keeps `max_size` (detectron2's ResizeShortestEdge rule).
    Rows whose bytes do not decode (or, other than JPEGs, exceed `max_pixels`) are dropped with a
    warning instead of stopping the run.
    """
    sorted_ids = np.asarray(sorted(category_ids), np.int64)
    boxes, counts = _list_values(batch["boxes"], width=4)
    cats, _ = _list_values(batch["category_id"])
    crowd, _ = _list_values(batch["iscrowd"])
    pos = np.searchsorted(sorted_ids, cats.astype(np.int64)).clip(0, max(len(sorted_ids) - 1, 0))
    known = (sorted_ids[pos] == cats) if len(sorted_ids) else np.zeros(len(cats), bool)
    keep = known & ~crowd.astype(bool)
    row_of_box = np.repeat(np.arange(len(counts)), counts)
    kept_counts = np.bincount(row_of_box[keep], minlength=len(counts))
    splits = np.cumsum(kept_counts)[:-1]
    boxes_per_row = np.split(boxes[keep].astype(np.float32), splits)
    labels_per_row = np.split(pos[keep].astype(np.int64), splits)

    out: dict[str, list] = {k: [] for k in (
        "image_id", "copy", "pixels", "height", "width", "orig_height", "orig_width", "scale",
        "boxes", "labels", "num_boxes")}
    image_ids = batch["image_id"].to_numpy()
    copies = batch["copy"].to_numpy() if "copy" in batch.column_names else np.zeros(len(image_ids), np.int64)
    for i, data in enumerate(batch["image"].to_pylist()):
        image_id = int(image_ids[i])
        rng = np.random.default_rng([seed, epoch, execution, image_id & 0x7FFFFFFFFFFFFFFF, int(copies[i])])
        lo, hi = scale_jitter if (train and scale_jitter) else (1.0, 1.0)
        factor = float(rng.uniform(lo, hi)) if hi > lo else lo
        try:
            pixels, (orig_h, orig_w) = load_resized(data, min_size * factor, max_size, max_pixels)
        except ImageDecodeError as exc:
            log.warning("skipping image_id %s: %s", image_id, exc)
            continue
        new_h, new_w = pixels.shape[:2]
        bxs = resize_boxes(boxes_per_row[i], (orig_h, orig_w), (new_h, new_w))
        if train and rng.random() < flip_prob:
            pixels, bxs = hflip(pixels, bxs)
        out["image_id"].append(image_id)
        out["copy"].append(int(copies[i]))
        out["pixels"].append(np.ascontiguousarray(pixels).tobytes())
        out["height"].append(new_h)
        out["width"].append(new_w)
        out["orig_height"].append(orig_h)
        out["orig_width"].append(orig_w)
        out["scale"].append(min(new_h / orig_h, new_w / orig_w))
        out["boxes"].append(bxs.tobytes())
        out["labels"].append(labels_per_row[i].tobytes())
        out["num_boxes"].append(len(bxs))
    dtypes = {"image_id": np.int64, "copy": np.int32, "height": np.int32, "width": np.int32, "orig_height": np.int32,
              "orig_width": np.int32, "scale": np.float32, "num_boxes": np.int32}
    return {k: (np.asarray(v, dtypes[k]) if k in dtypes else _object_array(v)) for k, v in out.items()}


def preprocess_images_batch(batch, *, min_size: float, max_size: float, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Inference rows (``uri``, ``image``, ``image_id``, ``error``; pyarrow) -> the same plus
    ``pixels``/``height``/``width``/``orig_height``/``orig_width``/``scale``, never raising.

    An image that does not decode keeps its row with ``error`` set and a 0x0 image, so the
    predictions still hold one row per input; `collate_detection_batch` accepts such rows.
    """
    import pyarrow as pa

    errors = batch["error"].to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
    cols: dict[str, list] = {k: [] for k in ("pixels", "height", "width", "orig_height", "orig_width", "scale")}
    for i, data in enumerate(batch["image"].to_pylist()):
        pixels, orig = np.zeros((0, 0, 3), np.uint8), (0, 0)
        if errors[i] is None:
            try:
                pixels, orig = load_resized(data or b"", min_size, max_size, max_pixels)
            except ImageDecodeError as exc:
                errors[i] = f"cannot decode: {exc}"
        cols["pixels"].append(pixels.tobytes())
        cols["height"].append(pixels.shape[0])
        cols["width"].append(pixels.shape[1])
        cols["orig_height"].append(orig[0])
        cols["orig_width"].append(orig[1])
        cols["scale"].append(min(pixels.shape[0] / orig[0], pixels.shape[1] / orig[1]) if orig[0] else 0.0)
    types = {"pixels": pa.binary(), "height": pa.int32(), "width": pa.int32(), "orig_height": pa.int32(),
             "orig_width": pa.int32(), "scale": pa.float32()}
    table = batch.drop_columns([c for c in ("error", "image") if c in batch.column_names])
    for name, values in cols.items():
        table = table.append_column(name, pa.array(values, types[name]))
    return table.append_column("error", pa.array(errors, pa.string()))


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr
