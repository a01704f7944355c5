"""Convert COCO json + image files into Parquet shards and manifest.json on any storage.

    python -m jobs.prepare --images s3://b/coco/train2017 --annotations s3://b/coco/train.json \
        --output s3://b/shards/train [--images-per-shard 1000] [--strict]

Problems in the input (bad boxes, unknown categories, missing or corrupt files, duplicate ids)
are fixed or skipped, counted, and listed in the manifest and the summary; `--strict` fails
on the first one instead (exit code 2, naming it).
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import run
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from pipelines.formats.prepare import DEFAULT_IMAGES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES, prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder or prefix the json's file_name values are relative to")
    p.add_argument("--annotations", required=True, help="COCO instances json")
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
    manifest = prepare(args.images, args.annotations, args.output, images_per_shard=args.images_per_shard,
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
