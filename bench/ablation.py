"""Experiment: the focal-loss paper's Table 1 on this project's RetinaNet, side by side.

    .venv/bin/python bench/ablation.py [--steps 120] [--batch-size 4] [--seeds 0 1] [--rows 3 0 6] [--tile 64]

Rows: alpha-balanced cross entropy (focal gamma 0, alpha .75), focal loss at gamma 0.5 / 1 / 2 / 5
with the paper's best alpha for each (Table 1b), OHEM with and without the 1:3 ratio (Table 1d,
128 anchors per image, NMS 0.5), and focal gamma 2 and alpha-CE without the prior initialisation
(zero bias). Every row trains the tiny preset from scratch on the same generated data with the same steps,
batch, learning-rate schedule and seeds, in this one process (no Ray: the loss is what differs),
and is scored with the project's COCO evaluation on a held-out set. A run whose loss turns
non-finite is recorded as diverged (AP 0), which is the paper's point about the prior.

Data: `pipelines.formats.synth` images of --tile px (default 64: 0-6 objects of 5-45 px), or
--grid x --grid mosaics of them (more objects per image), with anchors from 8 px, so that as on
COCO nearly every anchor is background. The imbalance is raised with --num-classes (up to 100:
more negative terms per anchor) and --canvas (the same objects on a larger image: more negative
anchors); negatives per positive are measured with the training matcher and reported. --split
tune scores a second held-out set, for choosing a learning rate without looking at the test set.
Tables, paired differences and plots: bench/ablation_report.py. On a loaded 2-core machine use
--threads 1: with two, each thread waits on the other at every operator and a step took ~15x longer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import retinanet
from pipelines.evaluation.scoring import coco_stats
from pipelines.formats.synth import class_name, class_probabilities, generate_image
from pipelines.images.transforms import decode_image
from retinanet.matching import BACKGROUND, IGNORE, match_anchors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402 - bench/provenance.py

ANCHOR_SIZES = (8, 16, 32, 64, 128)  # for 5-45 px objects (the tiny preset's start at 16)

# (name, RetinaNetConfig overrides, the paper's AP on COCO minival; Table 1a/b: ResNet-50, 1d: ResNet-101)
ROWS = [
    ("alpha-CE (gamma 0, alpha .75)", dict(focal_gamma=0.0, focal_alpha=0.75), 31.1),
    ("FL gamma 0.5, alpha .5", dict(focal_gamma=0.5, focal_alpha=0.5), 32.9),
    ("FL gamma 1, alpha .25", dict(focal_gamma=1.0, focal_alpha=0.25), 33.7),
    ("FL gamma 2, alpha .25", dict(focal_gamma=2.0, focal_alpha=0.25), 34.0),
    ("FL gamma 5, alpha .25", dict(focal_gamma=5.0, focal_alpha=0.25), 32.2),
    ("OHEM 1:3 (128/img, NMS .5)", dict(cls_loss="ohem", ohem_ratio=3.0), 31.1),
    ("OHEM (128/img, NMS .5)", dict(cls_loss="ohem"), 32.8),
    ("FL gamma 2, no prior (bias 0)", dict(focal_gamma=2.0, focal_alpha=0.25, prior_prob=0.0), None),
    ("alpha-CE, no prior (bias 0)", dict(focal_gamma=0.0, focal_alpha=0.75, prior_prob=0.0), None),
]
SPLIT_SEEDS = {"test": 2000, "tune": 3000}  # held-out sets: "tune" chooses learning rates, "test" reports


def mosaic_dataset(count: int, seed: int, tile: int, grid: int, num_classes: int, canvas: int) -> dict:
    """`count` images of grid x grid synth tiles of `canvas` px holding objects sized for `tile` px:
    normalized images, padded targets, COCO ground truth."""
    probs = class_probabilities(num_classes)
    size = canvas * grid
    images = np.zeros((count, size, size, 3), np.uint8)
    boxes, labels, coco_images, annotations = [], [], [], []
    for i in range(count):
        image_boxes, image_labels = [], []
        for t in range(grid * grid):
            data, anns = generate_image(i * grid * grid + t, seed=seed, image_size=canvas, class_probs=probs,
                                        object_scale=tile)
            ox, oy = canvas * (t % grid), canvas * (t // grid)
            images[i, oy:oy + canvas, ox:ox + canvas] = decode_image(data)
            for cls, (x, y, w, h), area in anns:
                image_boxes.append([x + ox, y + oy, x + ox + w, y + oy + h])
                image_labels.append(cls)
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                    "bbox": [x + ox, y + oy, w, h], "area": area, "iscrowd": 0})
        boxes.append(image_boxes)
        labels.append(image_labels)
        coco_images.append({"id": i + 1, "file_name": f"{i + 1}.jpg", "width": size, "height": size})
    most = max(1, max(len(b) for b in boxes))
    padded_boxes = torch.zeros(count, most, 4)
    padded_labels = torch.zeros(count, most, dtype=torch.int64)
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        if image_boxes:
            padded_boxes[i, :len(image_boxes)] = torch.tensor(image_boxes, dtype=torch.float32)
            padded_labels[i, :len(image_labels)] = torch.tensor(image_labels)
    mean = torch.tensor(retinanet.config.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(retinanet.config.IMAGENET_STD)[:, None, None]
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    categories = [{"id": k + 1, "name": class_name(k)} for k in range(num_classes)]
    return {"images": pixels, "boxes": padded_boxes, "labels": padded_labels,
            "num_boxes": torch.tensor([len(b) for b in boxes]),
            "coco": {"images": coco_images, "annotations": annotations, "categories": categories}}


def anchor_shares(data: dict, cfg: retinanet.RetinaNetConfig) -> dict:
    """Shares of negative / positive / ignored anchors over the training set, with the training matcher."""
    model = retinanet.RetinaNet(cfg)
    size = data["images"].shape[-1]
    strides = [8, 16, 32, 64, 128]
    anchors, _ = model.anchors((size, size), [(math.ceil(size / s),) * 2 for s in strides], torch.device("cpu"),
                               torch.float32)
    matched = match_anchors(data["boxes"], data["num_boxes"], anchors, cfg.fg_iou, cfg.bg_iou,
                            cfg.allow_low_quality_matches)
    total = matched.numel()
    negatives, positives = float((matched == BACKGROUND).sum()), float((matched >= 0).sum())
    return {"anchors_per_image": int(anchors.shape[0]), "num_classes": cfg.num_classes,
            "negatives_per_positive": negatives / positives,
            # each anchor is num_classes binary terms; a positive anchor is one positive term
            "negative_terms_per_positive":
                (negatives * cfg.num_classes + positives * (cfg.num_classes - 1)) / positives,
            "objects_per_image": round(float(data["num_boxes"].float().mean()), 2),
            "negative": float((matched == BACKGROUND).sum()) / total,
            "positive": float((matched >= 0).sum()) / total,
            "ignored": float((matched == IGNORE).sum()) / total}


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The paper's schedule, shortened: linear warm-up from 1/3, x0.1 at 2/3 and 8/9 of the run."""
    decay = 0.1 ** ((step >= steps * 2 // 3) + (step >= steps * 8 // 9))
    return decay * (1 / 3 + (2 / 3) * min(1.0, step / warmup))


def train_and_score(cfg: retinanet.RetinaNetConfig, train: dict, val: dict, args, seed: int) -> dict:
    torch.manual_seed(seed)
    model = retinanet.RetinaNet(cfg, categories=val["coco"]["categories"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                                weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)  # same batches and flips for every row of a seed
    count, size = train["images"].shape[0], train["images"].shape[-1]
    sizes = torch.tensor([[size, size]] * args.batch_size)
    passes = args.steps * args.batch_size // count + 1
    order = torch.cat([torch.randperm(count, generator=generator) for _ in range(passes)])
    losses, grad_norms, started, diverged = [], [], time.time(), None
    model.train()
    for step in range(args.steps):
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], train["images"][index].flip(-1), train["images"][index])
        boxes = train["boxes"][index]
        flipped = torch.stack([size - boxes[..., 2], boxes[..., 1], size - boxes[..., 0], boxes[..., 3]], -1)
        targets = {"boxes": torch.where(flip[:, None, None], flipped, boxes), "labels": train["labels"][index],
                   "num_boxes": train["num_boxes"][index]}
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        try:
            parts = model(images, sizes, targets)
        except FloatingPointError as exc:
            diverged = f"step {step}: {exc}"
            break
        loss = sum(parts.values())
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))  # measured only
        optimizer.step()
        losses.append(round(float(loss.detach()), 4))
        if args.progress and (step + 1) % args.progress == 0:
            print(f"  step {step + 1}: loss {losses[-1]:.4f} ({time.time() - started:.0f} s)", flush=True)
    train_seconds = time.time() - started
    if diverged:
        stats = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    else:
        stats = coco_stats(val["coco"], detections(model, val))
    return {"seed": seed, "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"], "diverged": diverged,
            "train_seconds": round(train_seconds, 1), "loss_first10": losses[:10], "loss_last": losses[-1:],
            "loss_every25": losses[::25], "max_grad_norm_first50": round(max(grad_norms[:50], default=0.0), 2)}


@torch.inference_mode()
def detections(model: retinanet.RetinaNet, val: dict) -> np.ndarray:
    """COCO results rows (image_id, x, y, w, h, score, category_id) for the validation images."""
    model.eval()
    rows = []
    size = val["images"].shape[-1]
    for start in range(0, val["images"].shape[0], 32):
        batch = val["images"][start:start + 32]
        for offset, det in enumerate(model(batch, torch.tensor([[size, size]] * batch.shape[0]))):
            b = det["boxes"].double()
            rows.append(torch.stack([torch.full_like(b[:, 0], start + offset + 1), b[:, 0], b[:, 1], b[:, 2] - b[:, 0],
                                     b[:, 3] - b[:, 1], det["scores"].double(), det["labels"].double() + 1], 1).numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("AP", "AP50", "AP75"):
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2,
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    out["diverged"] = sum(r["diverged"] is not None for r in runs)
    return out


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", type=int, nargs="*", help="row indices of ROWS to run, in this order (default all)")
    parser.add_argument("--tile", type=int, default=64, help="object scale, px: objects 10-90 px per 128 (default 64)")
    parser.add_argument("--canvas", type=int, help="synth image side, px (default --tile): larger adds background")
    parser.add_argument("--grid", type=int, default=1, help="tiles per side of a training image (2: 4x the objects)")
    parser.add_argument("--num-classes", type=int, default=3, help="classes (beyond 10: shape and colour pairs)")
    parser.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="test",
                        help="held-out set scored: tune (to choose a learning rate) or test (default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", type=int, default=0, help="print the loss every N steps (0: never)")
    parser.add_argument("--out", default="bench/results/ablation-cpu.json")
    args = parser.parse_args()
    args.canvas = args.canvas or args.tile
    torch.set_num_threads(args.threads)
    train = mosaic_dataset(args.num_train, 1000, args.tile, args.grid, args.num_classes, args.canvas)
    val = mosaic_dataset(args.num_val, SPLIT_SEEDS[args.split], args.tile, args.grid, args.num_classes, args.canvas)
    base = retinanet.preset("tiny", num_classes=args.num_classes, anchor_sizes=ANCHOR_SIZES)
    result = {
        "provenance": provenance(),
        "device": f"CPU, torch.set_num_threads({args.threads})",
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {
            "preset": "tiny", "anchor_sizes": ANCHOR_SIZES, "image_size": args.canvas * args.grid,
            "data": f"{args.grid}x{args.grid} mosaics of synth {args.canvas} px images, objects at {args.tile} px "
                    f"scale (train seed 1000, {args.split} seed {SPLIT_SEEDS[args.split]})"},
        "anchors": anchor_shares(train, base),
        "load_average_start": load_average(), "rows": [],
    }
    print(json.dumps(result["anchors"]), flush=True)
    for index in (args.rows if args.rows else range(len(ROWS))):  # in the order given: key rows first
        name, overrides, paper_ap = ROWS[index]
        cfg = base.replace(**overrides)
        row = {"row": index, "name": name, "overrides": overrides, "paper_AP": paper_ap, "runs": []}
        result["rows"].append(row)
        for seed in args.seeds:
            run = train_and_score(cfg, train, val, args, seed)
            run["load_average"] = load_average().split("load average: ")[-1]
            row["runs"].append(run)
            row.update(summarize(row["runs"]))
            print(f"{name} seed {seed}: AP {run['AP']:.4f} AP50 {run['AP50']:.4f} AP75 {run['AP75']:.4f} "
                  f"({run['train_seconds']} s{', diverged ' + run['diverged'] if run['diverged'] else ''}) "
                  f"| {load_average()}", flush=True)
            result["load_average_end"] = load_average()
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:  # rewritten after every run, so a stopped run keeps what it measured
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
