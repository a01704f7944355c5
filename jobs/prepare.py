"""Convert annotated images (COCO json, Pascal VOC XML or YOLO labels) into Parquet shards and
manifest.json on any storage.

    python -m jobs.prepare --images s3://b/coco/train2017 --annotations s3://b/coco/train.json \
        --output s3://b/shards/train [--images-per-shard 1000] [--strict]
    python -m jobs.prepare --annotations VOC2012/Annotations [--split train] --output shards/voc-train
    python -m jobs.prepare --annotations data.yaml --split train --output shards/yolo-train

The format follows from --annotations (a .json file: COCO; a folder of .xml files: VOC; a .yaml
file: YOLO) or from --format. Problems in the input (bad boxes, unknown categories, missing or
corrupt files, duplicate ids, unreadable XML or label files) are fixed or skipped, counted, and
listed in the manifest and the summary; `--strict` fails on the first one instead (exit code 2,
naming it). An input without a single usable image is an error (exit code 2), not a dataset.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import run
from pipelines.formats.prepare import DEFAULT_IMAGES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES, FORMATS, prepare
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0],
                                epilog="VOC: images are <images>/<xml name>.jpg (or the extension <filename> has); "
                                       "category ids 1, 2, ... follow --classes or the sorted class names; "
                                       "objects marked difficult are kept with iscrowd=true, so that COCO "
                                       "evaluation ignores them as VOC's evaluation does. YOLO: category id = class "
                                       "index in data.yaml names (0, 1, ...). VOC and YOLO image ids are the digits "
                                       "of the file name when they are unique, else the position in the listing.")
    p.add_argument("--images", help="image folder: COCO: the folder the json's file_name values are relative to "
                                    "(required); VOC: default JPEGImages beside the annotations folder; YOLO: a "
                                    "split's image folder (or give --split)")
    p.add_argument("--annotations", required=True, help="COCO instances json, VOC folder of .xml files, or YOLO "
                                                        "data.yaml")
    p.add_argument("--format", choices=FORMATS, help="input format (default: detected from --annotations)")
    p.add_argument("--split", help="VOC: read only the images of ImageSets/Main/SPLIT.txt beside the annotations "
                                   "folder; YOLO: the split of data.yaml to read (train, val, test)")
    p.add_argument("--classes", metavar="FILE", help="VOC: class names, one a line, in category id order (default: "
                                                     "the sorted names found in the XML files, one more pass)")
    p.add_argument("--output", required=True, help="folder or prefix for shard-NNNNN.parquet + manifest.json")
    p.add_argument("--images-per-shard", type=int, default=DEFAULT_IMAGES_PER_SHARD)
    p.add_argument("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20,
                   help="start a new shard before one grows past this many MB of images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixel limit of one decode (default {DEFAULT_MAX_PIXELS}, as jobs.infer and training): larger "
                        "JPEGs are checked at reduced scale, other larger images are skipped as corrupt")
    p.add_argument("--max-tasks", type=int, help="at most this many shard tasks in flight (default: the cluster's "
                                                 "CPUs as it grows, plus a quarter queued)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = prepare(args.images, args.annotations, args.output, format=args.format, split=args.split,
                       classes=args.classes, images_per_shard=args.images_per_shard,
                       max_shard_bytes=int(args.max_shard_mb * 2**20), strict=args.strict,
                       max_pixels=args.max_pixels, max_tasks=args.max_tasks)
    issues = ", ".join(f"{k}={v}" for k, v in manifest.issues.items()) or "none"
    print(f"prepared {manifest.num_images} images ({manifest.num_annotations} boxes, "
          f"{manifest.num_empty_images} images without boxes) in {len(manifest.shards)} shards at {args.output}; "
          f"issues: {issues}", file=sys.stderr)
    for example in manifest.issue_examples:
        print(f"  {example['kind']}: {example['detail']}", file=sys.stderr)
    print(json.dumps({"output": args.output, "images": manifest.num_images, "annotations": manifest.num_annotations,
                      "shards": len(manifest.shards), "issues": manifest.issues}))
    return 0


if __name__ == "__main__":
    run(main)
