"""`python -m jobs.inspect`: check a dataset against a model preset before training on it.

    python -m jobs.inspect DATA [--preset tiny|r50|r101] [--image-size S] [--max-size M]
        [--sample N] [--seed K] [--output report.json]

DATA is a shards folder of jobs.prepare (manifest.json + shard-*.parquet, any URI). Printed (and
with --output written as JSON):
  - per class: images and boxes (crowd boxes apart: training ignores them);
  - box sizes: width / height / area percentiles in original pixels and after the resize that
    training applies (shorter side --image-size, default the preset's; longer side at most
    --max-size, default the preset's ratio: 1333/800 for r50);
  - anchor coverage: the share of boxes whose best anchor IoU is below the matcher's positive
    threshold (0.5): kept only as a low-quality match (IoU in [0.4, 0.5), or lower but > 0) or
    not matched at all (IoU 0), overall and per class, on the preset's real anchors and feature
    grids; a warning line names the fix when more than 20% of the boxes are affected.

Only the annotation columns are read, never the image bytes. Counts are exact; sizes and coverage
use a seeded sample of --sample boxes (default 200,000) when there are more, and say so.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import coverage, inspect
from retinanet.config import PRESETS, preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="a jobs.prepare output folder (or its manifest.json), any URI")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model preset whose anchors and "
                   "input size are checked (default tiny, as jobs.train)")
    p.add_argument("--image-size", type=int, help="shorter side after resize (default: the preset's, as jobs.train)")
    p.add_argument("--max-size", type=int, help="longer side at most (default: --image-size x the preset's "
                   "max/min ratio)")
    p.add_argument("--sample", type=int, default=inspect.DEFAULT_SAMPLE, metavar="N",
                   help=f"boxes sampled for sizes and coverage (default {inspect.DEFAULT_SAMPLE:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the box sample (default 0)")
    p.add_argument("--output", metavar="URI", help="write the report as JSON here")
    return p


def model_config(name: str, image_size: int | None, max_size: int | None):
    """The preset's config at the requested input size, as jobs.train would resize."""
    base = preset(name)
    if image_size is not None and image_size < 1 or max_size is not None and max_size < 1:
        raise UserError("--image-size and --max-size must be positive numbers of pixels")
    size = image_size or base.min_size
    cap = max_size or (int(round(size * base.max_size / base.min_size)) if image_size else base.max_size)
    return base.replace(min_size=size, max_size=cap)


def inspect_data(data: str, config, sample: int, seed: int) -> dict:
    """The whole report as a plain dict (what --output writes)."""
    scanned = inspect.scan(data, sample=sample, seed=seed)
    boxes, _ = inspect.resized_boxes(scanned.sample, config.min_size, config.max_size)
    raw = np.stack([scanned.sample[f] for f in ("x1", "y1", "x2", "y2")], axis=1) if len(scanned.sample["key"]) \
        else np.zeros((0, 4))
    return {
        "data": data, "images": scanned.num_images, "boxes": scanned.num_boxes, "crowd_boxes": scanned.num_crowd,
        "empty_images": scanned.num_empty_images, "unknown_category_boxes": scanned.num_unknown_category,
        "classes": inspect.class_table(scanned),
        "box_sizes": {"original_pixels": inspect.size_percentiles(raw),
                      "resized_pixels": inspect.size_percentiles(boxes),
                      "sampled": scanned.sampled, "sample_size": len(scanned.sample["key"])},
        "anchor_coverage": coverage.coverage_report(scanned, config),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = model_config(args.preset, args.image_size, args.max_size)
    result = inspect_data(args.data, config, args.sample, args.seed)
    result["preset"] = args.preset
    _print(result)
    if args.output:
        storage.write_bytes_atomic(args.output, json.dumps(result, indent=1).encode())
        print(f"report: {args.output}")
    return 0


def _print(result: dict) -> None:
    cov = result["anchor_coverage"]
    print(f"{result['images']} images, {result['boxes']} boxes (+{result['crowd_boxes']} crowd), "
          f"{result['empty_images']} images without boxes")
    print(f"{'class':<24} {'images':>8} {'boxes':>9} {'share':>6} {'<0.5 IoU':>9}")
    for row, c in zip(result["classes"], cov["per_class"]):
        below = "-" if c["share_below_fg"] is None else f"{c['share_below_fg']:.1%}"
        print(f"{row['name'][:24]:<24} {row['images']:>8} {row['boxes']:>9} {row['share']:>6.1%} {below:>9}")
    sizes = result["box_sizes"]
    for kind in ("original_pixels", "resized_pixels"):
        s = sizes[kind]["sqrt_area"]
        if s:
            print(f"box sqrt(area), {kind.replace('_', ' ')}: p5 {s['p5']}, median {s['p50']}, p95 {s['p95']}")
    if cov["boxes"]:
        print(f"anchor coverage at --image-size {cov['image_size']} (max {cov['max_size']}), anchors "
              f"{cov['anchor_sizes']}: {cov['positive']} of {cov['boxes']} boxes have an anchor at IoU >= "
              f"{cov['fg_iou']}; {cov['low_quality_ignore_band']} only in [{cov['bg_iou']}, {cov['fg_iou']}), "
              f"{cov['low_quality_below_bg']} below {cov['bg_iou']}, {cov['no_anchor']} none ({cov['note']})")
    warning = coverage.coverage_warning(cov)
    if warning:
        print(f"warning: {warning}")


if __name__ == "__main__":
    run(main)
