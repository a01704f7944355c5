"""Draw jobs.infer's detections (boxes, labels, scores) onto their images as PNG files.

    python -m jobs.visualize --predictions URI --images URI --output DIR [--limit N] [--min-score T]

--images is what jobs.infer read: with a shards folder the image bytes come from the shards (by
image id); with a folder/prefix or a COCO layout from each row's `uri`. Images are drawn in the
orientation the detector saw (EXIF applied), at most 2048 px on the longer side; rows with an
`error` are skipped. Part files are read only until --limit rows are found.
"""
from __future__ import annotations

import argparse
import io
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.images.transforms import ImageDecodeError, decode_image
from pipelines.inference import predictions

MAX_SIDE = 2048  # drawn images are scaled down to this: a 10000 px photo makes an unviewable PNG
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, metavar="URI", help="jobs.infer --output (or one part file)")
    p.add_argument("--images", required=True, metavar="URI", help="the --input jobs.infer read")
    p.add_argument("--output", required=True, metavar="DIR", help="folder/prefix for the PNG files")
    p.add_argument("--limit", type=int, default=20, help="images to draw (default 20)")
    p.add_argument("--min-score", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    return p


def first_rows(uri: str, limit: int) -> list[dict]:
    """The first `limit` rows without error, in part order, reading parts only until there are enough."""
    files = storage.list_files(uri, suffixes=[predictions.PART_SUFFIX])
    if not files:
        raise UserError(f"{uri}: no .parquet files found; give the --output of jobs.infer")
    rows: list[dict] = []
    for f in files:
        table = predictions.read_part(f, ["image_id", "uri", "width", "height", "detections", "error"])
        rows += table.filter(pc.is_null(table["error"])).slice(0, limit - len(rows)).to_pylist()
        if len(rows) >= limit:
            break
    return rows


def fetch_images(images_uri: str, rows: list[dict]) -> list[bytes | Exception]:
    """Encoded bytes of each row: from the shards by image id, else from the row's own uri."""
    if shards.input_kind(images_uri) == "shards":
        import pyarrow.dataset as pads

        fs, _ = storage.arrow_filesystem(images_uri)
        paths = [storage.resolve(u).path for u in shards.shard_uris(images_uri, shards.read_manifest(images_uri))]
        ids = [r["image_id"] for r in rows]
        table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(
            columns=["image_id", "image"], filter=pads.field("image_id").isin(pa.array(ids, pa.int64())))
        found = dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
        return [found.get(i, KeyError(f"image_id {i} not in {images_uri}")) for i in ids]
    if not rows:
        return []
    loc = storage.resolve(rows[0]["uri"])
    return storage.read_many(loc, [storage.resolve(r["uri"]).path for r in rows])


def draw(pixels: np.ndarray, detections: list[dict], min_score: float) -> Image.Image:
    """An RGB image with each detection's box and "category score" label, colored by category."""
    image = Image.fromarray(pixels)
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    width = max(1, round(max(image.size) / 300))
    for det in sorted((d for d in detections if d["score"] >= min_score), key=lambda d: d["score"]):
        color = PALETTE[det["category_id"] % len(PALETTE)]
        box = [det[k] * scale for k in ("x1", "y1", "x2", "y2")]
        canvas.rectangle(box, outline=color, width=width)
        label = f"{det['category']} {det['score']:.2f}"
        left, top, right, bottom = canvas.textbbox((box[0], box[1]), label, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] >= bottom - top + 2 else box[1]
        canvas.rectangle([box[0], y, box[0] + right - left + 2, y + bottom - top + 2], fill=color)
        canvas.text((box[0] + 1, y + 1 - (top - box[1])), label, fill=(0, 0, 0), font=font)
    return image


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    rows = first_rows(args.predictions, args.limit)
    out = storage.resolve(args.output)
    storage.ensure_dir(out.uri())
    written, skipped = 0, []
    for k, (row, data) in enumerate(zip(rows, fetch_images(args.images, rows))):
        try:
            if isinstance(data, Exception):
                raise ImageDecodeError(f"cannot read: {type(data).__name__}")
            pixels = decode_image(data)
        except ImageDecodeError as exc:
            skipped.append(f"{row['uri']}: {exc}")
            continue
        png = io.BytesIO()
        draw(pixels, row["detections"], args.min_score).save(png, format="PNG")
        stem = PurePosixPath(row["uri"]).stem or str(row["image_id"])
        storage.write_bytes_atomic(out.join(f"{k:04d}-{stem}.png").uri(), png.getvalue())
        written += 1
    for line in skipped:
        print(f"warning: skipped {line}")
    print(f"visualize: {written} images with detections >= {args.min_score} -> {out.uri()}")
    return 0


if __name__ == "__main__":
    run(main)
