"""Experiment: focal loss vs Seesaw Loss (decoupled objectness) on long-tailed synthetic data.

    .venv/bin/python bench/longtail.py [--steps 300] [--num-images 800] [--long-tail 100]

Trains the tiny preset twice with equal budgets (same data, steps, batch, lr, seed) through
`jobs.train`, one with `--cls-loss focal` and one with `--cls-loss seesaw` (optionally both
with repeat-factor sampling), then scores each on a balanced validation set: COCO AP, AP50 and
LVIS-style AP_rare / AP_common / AP_frequent by training-image count per category. The
results.json it writes carries the run's provenance (bench/provenance.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

import retinanet
from jobs import prepare, train
from pipelines.evaluation import scoring as evaluation
from pipelines.evaluation.report import frequency_ap
from pipelines.formats.annotations import train_image_counts
from pipelines.formats.synth import write_synth
from pipelines.images.transforms import decode_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402 - bench/provenance.py


def predictions(model, root: str) -> np.ndarray:
    """COCO results rows for every val image, by `model.predict` in batches of 16."""
    data = json.load(open(os.path.join(root, "annotations.json")))
    rows = []
    for start in range(0, len(data["images"]), 16):
        infos = data["images"][start:start + 16]
        images = [torch.from_numpy(decode_image(open(os.path.join(root, "images", i["file_name"]), "rb").read()))
                  .permute(2, 0, 1) for i in infos]
        for info, det in zip(infos, model.predict(images)):
            boxes = det["boxes"].double()
            ids = torch.tensor([model.categories[int(label)]["id"] for label in det["labels"]], dtype=torch.float64)
            xywh = [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]]
            rows.append(torch.stack([torch.full_like(ids, info["id"]), *xywh, det["scores"].double(), ids], 1).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=800)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--long-tail", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat-factor-threshold", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="jobs.train --seed (initialization and data order)")
    parser.add_argument("--output", default=None, help="folder for data, runs and results.json (default: a temp dir)")
    parser.add_argument("--losses", nargs="+", choices=["focal", "seesaw"], default=["focal", "seesaw"],
                        help="the runs to make (one alone: a check of the script, no comparison)")
    args = parser.parse_args()
    origin = provenance()
    work = args.output or tempfile.mkdtemp(prefix="bench-longtail-")
    train_root, val_root = os.path.join(work, "train"), os.path.join(work, "val")
    if not os.path.exists(os.path.join(train_root, "annotations.json")):
        write_synth(train_root, num_images=args.num_images, image_size=args.size, num_classes=args.num_classes,
                    long_tail=args.long_tail, seed=11, progress=lambda line: None)
        write_synth(val_root, num_images=max(200, args.num_images // 3), image_size=args.size,
                    num_classes=args.num_classes, seed=12, progress=lambda line: None)
    shards = os.path.join(work, "shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        assert prepare.main(["--images", os.path.join(train_root, "images"), "--annotations",
                             os.path.join(train_root, "annotations.json"), "--output", shards]) == 0
    counts = train_image_counts(shards)
    ground_truth = evaluation.load_ground_truth(os.path.join(val_root, "annotations.json"))
    results = {}
    for loss in args.losses:
        out = os.path.join(work, f"run-{loss}")
        argv = ["--data", shards, "--output", out, "--cls-loss", loss, "--max-steps", str(args.steps),
                "--num-workers", str(args.num_workers), "--batch-size", str(args.batch_size),
                "--image-size", str(args.size), "--checkpoint-every", str(args.steps), "--log-every", "50",
                "--seed", str(args.seed)]
        if args.repeat_factor_threshold:
            argv += ["--repeat-factor-threshold", str(args.repeat_factor_threshold)]
        assert train.main(argv) == 0
        model, _ = retinanet.load_checkpoint(os.path.join(out, "model.pt"))
        evaluated = evaluation.evaluate(ground_truth, predictions(model, val_root))
        groups = frequency_ap(evaluated, counts)
        results[loss] = {**{k: evaluated.stats[k] for k in ("AP", "AP50")},
                         **{k: v for k, v in groups.items() if k.startswith("AP_")}, "categories": groups["categories"]}
    print(f"\n{args.num_images} training images, {args.num_classes} classes, long tail {args.long_tail:g}, "
          f"{args.steps} steps x {args.num_workers} x {args.batch_size}; training images per category: "
          f"{dict(sorted(counts.items()))}; groups {results[args.losses[0]]['categories']}")
    print(f"{'':8s}" + "".join(f"{k:>13s}" for k in ("AP", "AP50", "AP_rare", "AP_common", "AP_frequent")))
    for loss, r in results.items():
        print(f"{loss:8s}" + "".join(f"{r[k]:13.3f}" if r.get(k) is not None else f"{'-':>13s}"
                                     for k in ("AP", "AP50", "AP_rare", "AP_common", "AP_frequent")))
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    json.dump({"provenance": origin, "settings": settings, "train_images_per_category": counts, **results},
              open(os.path.join(work, "results.json"), "w"), indent=1)
    print(f"results: {os.path.join(work, 'results.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
