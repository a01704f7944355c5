"""The main job end to end on one machine: local Ray, local storage, generated data.

    python -m jobs.demo [--output out/demo] [--epochs E] [--num-images N]

synth (train + val shapes) -> prepare (Parquet shards) -> train the tiny preset with 2 DDP
workers on local Ray -> batch inference on val -> evaluate against the val ground truth,
printing COCO AP. Every step is the real job (`python -m jobs.<name>`), run in this process on
one Ray instance; each step's output stays under --output for a look afterwards.
"""
from __future__ import annotations

import argparse
import importlib
import time

from jobs.cli import run
from pipelines import storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="out/demo", help="folder (or URI) for every step's output")
    p.add_argument("--num-images", type=int, default=1600, help="training images (val gets a quarter)")
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3.5)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    return p


def _step(name: str, argv: list[str]) -> None:
    started = time.perf_counter()
    print(f"\n=== jobs.{name} {' '.join(argv)}", flush=True)
    code = importlib.import_module(f"jobs.{name}").main(argv)
    if code:
        raise SystemExit(code)
    print(f"=== jobs.{name} done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = storage.resolve(args.output)
    path = lambda *parts: out.join(*parts).uri()  # noqa: E731
    started = time.perf_counter()
    size, classes = str(args.image_size), str(args.num_classes)
    for split, count, seed in (("train", args.num_images, "1"), ("val", max(args.num_images // 4, 16), "2")):
        if not storage.exists(path("synth", split, "annotations.json")):
            _step("synth", ["--output", path("synth", split), "--num-images", str(count), "--image-size", size,
                            "--num-classes", classes, "--seed", seed])
        if not storage.exists(path("shards", split, "manifest.json")):
            _step("prepare", ["--images", path("synth", split, "images"), "--annotations",
                              path("synth", split, "annotations.json"), "--output", path("shards", split)])
    _step("train", ["--data", path("shards", "train"), "--output", path("train"),
                    "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
                    "--epochs", str(args.epochs), "--image-size", size, "--checkpoint-every", "200"])
    _step("infer", ["--model", path("train", "model.pt"), "--input", path("shards", "val"),
                    "--output", path("predictions")])
    _step("evaluate", ["--predictions", path("predictions"), "--annotations", path("synth", "val", "annotations.json"),
                       "--output", path("evaluation")])
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs under {out.uri()}")
    return 0


if __name__ == "__main__":
    run(main)
