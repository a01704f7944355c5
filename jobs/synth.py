"""Write the synthetic shapes dataset (COCO layout) to a local folder or bucket prefix.

    python -m jobs.synth --output s3://bucket/shapes --num-images 2000 --image-size 128 --num-classes 3
"""
from __future__ import annotations

import argparse
import json

from jobs.cli import run
from pipelines.formats.synth import MAX_CLASSES, SHAPES, write_synth


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder or s3:// prefix for images/ and annotations.json")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=128, help="side of the square images in pixels")
    p.add_argument("--num-classes", type=int, default=3, help=f"1..{MAX_CLASSES}: {', '.join(SHAPES)}, "
                   f"then shape and colour pairs (default %(default)s)")
    p.add_argument("--long-tail", type=float, default=1.0,
                   help="head/tail class frequency ratio R of a power law (1 = balanced)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = write_synth(args.output, num_images=args.num_images, image_size=args.image_size,
                         num_classes=args.num_classes, long_tail=args.long_tail, seed=args.seed)
    print(json.dumps({"output": args.output, **counts}))
    return 0


if __name__ == "__main__":
    run(main)
