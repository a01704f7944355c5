"""Decode, resize, flip, batch preprocessing and collate on real encoded images (no Ray)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.formats import shards
from pipelines.images.collate import arrow_columns, collate_detection_batch, collate_pixels, normalize_images
from pipelines.images.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    decode_image,
    hflip,
    load_resized,
    preprocess_batch,
    preprocess_images_batch,
    probe_image,
    resize_boxes,
    resize_image,
    resized_shape,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)


# ---------------------------------------------------------------------------------- decoding
def test_decode_png_is_exact_and_jpeg_close():
    pixels = gradient(30, 50)
    assert np.array_equal(decode_image(encode(Image.fromarray(pixels), "PNG")), pixels)
    jpeg = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert jpeg.shape == (30, 50, 3) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - pixels).mean() < 3


def test_decode_applies_exif_orientation():
    pixels = gradient(20, 40)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (40, 20, 3)
    expected = np.rot90(pixels, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 4
    assert probe_image(data) == (20, 40)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("1", "PNG"), ("LA", "PNG")])
def test_decode_converts_modes_to_rgb(mode, fmt):
    src = Image.fromarray(gradient(16, 24)).convert(mode)
    out = decode_image(encode(src, fmt))
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    expected = np.asarray(src.convert("RGB"))
    assert np.abs(out.astype(int) - expected).mean() < 8


def test_decode_16bit_png_keeps_full_range():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    src = Image.fromarray(values)  # mode I;16
    out = decode_image(encode(src, "PNG"))
    assert out.shape == (8, 8, 3)
    assert np.abs(out[..., 0].astype(int) - np.round(values / 257)).max() <= 1
    assert out.max() == 255 and out.min() == 0  # not clipped to white


def test_decode_palette_with_transparency():
    src = Image.fromarray(gradient(10, 10)).convert("P")
    src.info["transparency"] = 0
    assert decode_image(encode(src, "PNG", transparency=0)).shape == (10, 10, 3)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is a text file, not an image", "not a supported image format"),
    (bytes(range(256)) * 4, "not a supported image format"),
])
def test_decode_rejects_non_images(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decode_rejects_truncated_jpeg_and_png():
    for fmt in ("JPEG", "PNG"):
        data = encode(Image.fromarray(gradient(64, 64)), fmt)
        with pytest.raises(ImageDecodeError, match="truncated|corrupt|header"):
            decode_image(data[: len(data) // 2])
        with pytest.raises(ImageDecodeError):
            probe_image(data[: len(data) // 2])


# ---------------------------------------------------------------------------- resize / flip
def test_resized_shape_follows_paper_rule():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)  # shorter side -> 800
    assert resized_shape(500, 2000, 800, 1333) == (333, 1333)  # longer side capped
    assert resized_shape(640, 480, 512, 512) == (512, 384)


def test_resize_image_and_boxes_agree():
    img = gradient(100, 200)
    out = resize_image(img, 50, 1000)
    assert out.shape == (50, 100, 3)
    boxes = resize_boxes(np.array([[10, 20, 110, 60]], np.float32), (100, 200), out.shape[:2])
    np.testing.assert_allclose(boxes, [[5, 10, 55, 30]])


def test_load_resized_uses_jpeg_draft_but_keeps_geometry():
    data = encode(Image.fromarray(gradient(800, 1200)), "JPEG", quality=90)
    pixels, orig = load_resized(data, 200, 1333)
    assert orig == (800, 1200) and pixels.shape == (200, 300, 3)
    reference = resize_image(decode_image(data), 200, 1333)
    assert np.abs(pixels.astype(int) - reference).mean() < 4


def test_hflip_mirrors_pixels_and_boxes():
    img = np.zeros((10, 20, 3), np.uint8)
    img[2:5, 1:4] = 255  # object at x in [1, 4)
    flipped, boxes = hflip(img, np.array([[1, 2, 4, 5]], np.float32))
    np.testing.assert_array_equal(boxes, [[16, 2, 19, 5]])
    assert flipped[2:5, 16:19].min() == 255 and flipped.sum() == img.sum()


# --------------------------------------------------------------------------- preprocess rows
def shard_rows(sizes, boxes, cats, crowd) -> pa.Table:
    records = [{"image_id": i + 1, "file_name": f"{i}.png", "width": w, "height": h, "boxes": b,
                "category_id": c, "iscrowd": k, "area": [1.0] * len(b)}
               for i, ((h, w), b, c, k) in enumerate(zip(sizes, boxes, cats, crowd))]
    images = [encode(Image.fromarray(gradient(h, w)), "PNG") for h, w in sizes]
    return shards.records_table(records, images)


def test_preprocess_batch_maps_labels_drops_crowd_and_scales():
    table = shard_rows(
        sizes=[(100, 200), (50, 50), (60, 80)],
        boxes=[[[0, 0, 100, 50], [10, 10, 20, 20], [50, 50, 60, 60]], [], [[8, 6, 16, 12]]],
        cats=[[90, 5, 17], [], [5]], crowd=[[False, True, False], [], [False]])
    out = preprocess_batch(table, category_ids=[17, 5, 90], min_size=50, max_size=1000, train=False)
    assert out["image_id"].tolist() == [1, 2, 3]
    assert out["height"].tolist() == [50, 50, 50] and out["width"].tolist() == [100, 50, 67]
    assert out["num_boxes"].tolist() == [2, 0, 1]  # the crowd box is gone
    labels = np.frombuffer(out["labels"][0], np.int64)
    assert labels.tolist() == [2, 1]  # 90 -> 2, 17 -> 1 in sorted (5, 17, 90)
    np.testing.assert_allclose(np.frombuffer(out["boxes"][0], np.float32).reshape(-1, 4),
                               [[0, 0, 50, 25], [25, 25, 30, 30]])
    np.testing.assert_allclose(out["scale"], [0.5, 1.0, 50 / 60], rtol=1e-3)
    assert np.frombuffer(out["pixels"][2], np.uint8).size == 50 * 67 * 3


def test_preprocess_batch_flip_is_seeded_per_image_and_skips_bad_bytes():
    table = shard_rows([(40, 40)] * 8, [[[0, 0, 10, 10]]] * 8, [[1]] * 8, [[False]] * 8)
    kw = dict(category_ids=[1], min_size=40, max_size=40, train=True)
    first = preprocess_batch(table, seed=1, **kw)
    again = preprocess_batch(table.slice(4), seed=1, **kw)  # block boundaries do not matter
    x1 = np.array([np.frombuffer(b, np.float32)[0] for b in first["boxes"]])
    assert set(x1) == {0.0, 30.0}  # some flipped, some not
    assert np.array_equal(x1[4:], [np.frombuffer(b, np.float32)[0] for b in again["boxes"]])
    other_epoch = preprocess_batch(table, seed=1, epoch=1, **kw)
    assert any(a != b for a, b in zip(first["boxes"], other_epoch["boxes"]))

    broken = table.set_column(table.schema.get_field_index("image"), "image",
                              pa.array([b"junk"] + table["image"].to_pylist()[1:], pa.binary()))
    assert preprocess_batch(broken, seed=1, **kw)["image_id"].tolist() == list(range(2, 9))


def test_preprocess_batch_scale_jitter_changes_sizes_within_range():
    table = shard_rows([(100, 100)] * 16, [[]] * 16, [[]] * 16, [[]] * 16)
    out = preprocess_batch(table, category_ids=[1], min_size=100, max_size=1000, train=True,
                           scale_jitter=(0.5, 1.0))
    assert len(set(out["height"].tolist())) > 4 and 50 <= out["height"].min() and out["height"].max() <= 100


# ----------------------------------------------------------------------------------- collate
def make_rows(images, boxes, labels):
    rows = {"image_id": np.arange(len(images), dtype=np.int64) + 10,
            "pixels": np.array([im.tobytes() for im in images], dtype=object),
            "height": np.array([im.shape[0] for im in images], np.int32),
            "width": np.array([im.shape[1] for im in images], np.int32),
            "orig_height": np.array([2 * im.shape[0] for im in images], np.int32),
            "orig_width": np.array([2 * im.shape[1] for im in images], np.int32),
            "scale": np.full(len(images), 0.5, np.float32),
            "boxes": np.array([np.asarray(b, np.float32).tobytes() for b in boxes], dtype=object),
            "labels": np.array([np.asarray(image_labels, np.int64).tobytes() for image_labels in labels],
                               dtype=object),
            "num_boxes": np.array([len(image_labels) for image_labels in labels], np.int32)}
    return rows


def test_collate_pads_normalizes_and_packs_targets():
    a = np.full((100, 130, 3), 255, np.uint8)
    b = np.zeros((60, 40, 3), np.uint8)
    out = collate_detection_batch(make_rows([a, b], [[[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 9, 9]], []],
                                            [[0, 2, 1], []]))
    assert out["images"].shape == (2, 3, 128, 256) and out["images"].dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["images"][0, :, 5, 5], (1 - mean) / std)
    torch.testing.assert_close(out["images"][1, :, 5, 5], -mean / std)
    assert out["images"][0, :, 100:].abs().sum() == 0 and out["images"][0, :, :, 130:].abs().sum() == 0
    assert out["images"][1, :, 60:].abs().sum() == 0 and out["images"][1, :, :, 40:].abs().sum() == 0
    assert out["image_sizes"].tolist() == [[100, 130], [60, 40]]
    assert out["original_sizes"].tolist() == [[200, 260], [120, 80]]
    assert out["boxes"].shape == (2, 3, 4) and out["boxes"][0, 2].tolist() == [0, 0, 9, 9]
    assert out["boxes"][1].abs().sum() == 0
    assert out["labels"].tolist() == [[0, 2, 1], [-1, -1, -1]]
    assert out["num_boxes"].tolist() == [3, 0] and out["image_id"].tolist() == [10, 11]
    assert out["scale"].dtype == torch.float32 and out["labels"].dtype == torch.int64


def test_uint8_pixels_normalized_on_the_device_equal_the_float_collate():
    """The training path (uint8 batch, normalized by the trainer) gives the float collate's images:
    same values, padding exactly 0, channels-last or contiguous as asked."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((100, 130), (60, 40), (128, 128))]
    rows = make_rows(images, [[[1, 2, 3, 4]], [], [[0, 0, 5, 5]]], [[1], [], [0]])
    floats = collate_detection_batch(rows, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    pixels = collate_pixels(rows)
    assert pixels["pixels"].dtype == torch.uint8 and pixels["pixels"].shape == (3, 128, 256, 3)
    assert "images" not in pixels and "pixels" not in floats
    for name in ("image_sizes", "boxes", "labels", "num_boxes", "image_id", "copy", "scale", "original_sizes"):
        assert torch.equal(pixels[name], floats[name]), name
    for channels_last in (False, True):
        out = normalize_images(pixels["pixels"], pixels["image_sizes"], (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(out, floats["images"], rtol=0, atol=1e-6)
        assert out[1, :, 60:].abs().sum() == 0 and out[1, :, :, 40:].abs().sum() == 0
    # the same batch as Arrow (what Ray hands PixelCollate), sliced and in two chunks: same tensors
    table = pa.concat_tables([pa.table({k: list(v[:2]) for k, v in rows.items()}),
                              pa.table({k: list(v[1:]) for k, v in rows.items()}).slice(1)])
    assert table["pixels"].num_chunks == 2 and table["pixels"].type == pa.binary()
    from_arrow = collate_pixels(arrow_columns(table))
    for name, value in pixels.items():
        assert torch.equal(from_arrow[name], value), name
    expected = (images[0][5, 7] / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.3, 0.4])
    np.testing.assert_allclose(floats["images"][0, :, 5, 7].numpy(), expected, rtol=1e-5)


def test_collate_without_any_boxes_and_other_divisor():
    out = collate_detection_batch(make_rows([np.zeros((10, 10, 3), np.uint8)], [[]], [[]]), size_divisible=32)
    assert out["images"].shape == (1, 3, 32, 32)
    assert out["boxes"].shape == (1, 0, 4) and out["labels"].shape == (1, 0)


def test_inference_rows_keep_failures_and_collate():
    good = encode(Image.fromarray(gradient(40, 80)), "JPEG")
    table = pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"], "image": [good, b"broken", None],
                      "image_id": pa.nulls(3, pa.int64()), "error": [None, None, "cannot read: FileNotFoundError"]})
    rows = preprocess_images_batch(table, min_size=20, max_size=100)
    assert rows["uri"].to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    errors = rows["error"].to_pylist()
    assert errors[0] is None and errors[1].startswith("cannot decode") and errors[2].startswith("cannot read")
    assert rows["height"].to_pylist() == [20, 0, 0] and rows["width"].to_pylist() == [40, 0, 0]
    out = collate_detection_batch({name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names})
    assert out["images"].shape == (3, 3, 128, 128) and out["image_id"].tolist() == [-1, -1, -1]
    assert out["images"][1:].abs().sum() == 0 and out["num_boxes"].tolist() == [0, 0, 0]
