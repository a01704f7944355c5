"""Benchmark: retinanet/ vs torchvision's RetinaNet with identical architecture and weights.

(1) Training step time (forward + backward + SGD step), tiny preset at 256 px batch 8 and
    R50-FPN at 512 px batch 2. Ours includes normalizing the batch (its data pipeline's job),
    torchvision includes its transform (normalize, resize at scale 1, pad).
(2) Post-processing alone on the same head outputs at batch 8 (COCO's 80 classes, 512 px),
    with logits drawn so that far more than 1000 candidates per level pass the 0.05 threshold.
Prints medians and ratios (torchvision time / ours: > 1 means ours is faster).

    .venv/bin/python bench/model.py [--quick] [--smoke]

The first line printed is the run's provenance (bench/provenance.py), so that a saved copy of
the output says where its figures come from.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

import retinanet
from retinanet.anchors import anchor_sizes
from retinanet.postprocess import postprocess_detections

from provenance import provenance  # bench/provenance.py: bench/ is on the path of a script under it


def torchvision_twin(ours: retinanet.RetinaNet) -> TorchvisionRetinaNet:
    """torchvision's RetinaNet with our architecture, loaded with our weights."""
    cfg = ours.config
    from copy import deepcopy

    from torchvision.models.detection.anchor_utils import AnchorGenerator

    generator = AnchorGenerator(anchor_sizes(cfg.anchor_sizes), (cfg.aspect_ratios,) * 5)
    norm = partial(nn.GroupNorm, 32) if cfg.head_norm == "group" else None
    head = RetinaNetHead(cfg.fpn_channels, 9, cfg.num_classes, norm_layer=norm)
    head.regression_head._loss_type = "giou" if cfg.box_loss == "giou" else "smooth_l1"
    tv = TorchvisionRetinaNet(deepcopy(ours.backbone), cfg.num_classes, min_size=cfg.min_size, max_size=cfg.max_size,
                              anchor_generator=generator, head=head, image_mean=list(cfg.image_mean),
                              image_std=list(cfg.image_std), detections_per_img=cfg.detections_per_img)
    tv.load_state_dict(ours.state_dict())
    return tv


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _targets(batch: int, size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_image = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=g) * size * 0.7
        wh = torch.rand(6, 2, generator=g) * size * 0.25 + 8
        per_image.append({"boxes": torch.cat([xy, xy + wh], 1),
                          "labels": torch.randint(0, num_classes, (6,), generator=g)})
    return per_image


def bench_training(preset: str, size: int, batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    ours = retinanet.build(preset, num_classes=80, min_size=size, max_size=size, smooth_l1_beta=0.0)
    tv = torchvision_twin(ours)
    images = [torch.rand(3, size, size) for _ in range(batch)]
    targets = _targets(batch, size, 80)
    mean = torch.tensor(ours.config.image_mean)[:, None, None]
    std = torch.tensor(ours.config.image_std)[:, None, None]
    padded = {"boxes": torch.stack([t["boxes"] for t in targets]),
              "labels": torch.stack([t["labels"] for t in targets]),
              "num_boxes": torch.full((batch,), 6)}
    sizes = [[size, size]] * batch

    def step(model, forward):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def run():
            losses = forward()
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        return run

    ours.train()
    tv.train()
    t_ours = _timed(step(ours, lambda: ours((torch.stack(images) - mean) / std, sizes, padded)), repeats)
    t_tv = _timed(step(tv, lambda: tv(images, targets)), repeats)
    return t_ours, t_tv


def bench_postprocess(batch: int, size: int, repeats: int) -> tuple[float, float, int]:
    torch.manual_seed(0)
    ours = retinanet.build("r50", num_classes=80, min_size=size, max_size=size).eval()
    tv = torchvision_twin(ours).eval()
    grids = [(size // s, size // s) for s in (8, 16, 32, 64, 128)]
    anchors, level_sizes = ours.anchors((size, size), grids, torch.device("cpu"), torch.float32)
    total = anchors.shape[0]
    outputs = {"cls_logits": torch.randn(batch, total, 80) - 2.0, "bbox_regression": torch.randn(batch, total, 4) * 0.1,
               "objectness": None}
    image_sizes = torch.tensor([[size, size]] * batch)
    split = {"cls_logits": list(outputs["cls_logits"].split(level_sizes, dim=1)),
             "bbox_regression": list(outputs["bbox_regression"].split(level_sizes, dim=1))}
    tv_anchors = [list(anchors.split(level_sizes))] * batch
    min_candidates = min(int((outputs["cls_logits"][0, a:a + n].sigmoid() > 0.05).sum())
                         for a, n in zip([0] + list(torch.tensor(level_sizes).cumsum(0)[:-1].tolist()), level_sizes))
    with torch.inference_mode():
        ours_out = postprocess_detections(outputs, anchors, level_sizes, image_sizes, ours.config, ours.box_coder)
        tv_out = tv.postprocess_detections(split, tv_anchors, [(size, size)] * batch)
        same = all(torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"])
                   for a, b in zip(ours_out, tv_out))
        t_ours = _timed(lambda: postprocess_detections(outputs, anchors, level_sizes, image_sizes, ours.config,
                                                       ours.box_coder), repeats)
        t_tv = _timed(lambda: tv.postprocess_detections(split, tv_anchors, [(size, size)] * batch), repeats)
    print(f"  (same detections as torchvision: {same}; fewest candidates over 0.05 in a level: {min_candidates})")
    return t_ours, t_tv, min_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip R50 training")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--smoke", action="store_true", help="every path once at toy sizes (tiny 64 px batch 2, "
                        "post-processing batch 2 at 128 px): checks that the script runs; its figures mean nothing")
    args = parser.parse_args()
    print("provenance: " + json.dumps(provenance()), flush=True)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else 3 if args.quick else 5
    (train_size, train_batch), (post_batch, post_size) = ((64, 2), (2, 128)) if args.smoke else ((256, 8), (8, 512))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [(f"train step, tiny {train_size}px batch {train_batch}",
             *bench_training("tiny", train_size, train_batch, repeats))]
    if not (args.quick or args.smoke):
        rows.append(("train step, R50-FPN 512px batch 2", *bench_training("r50", 512, 2, 2)))
    t_ours, t_tv, _ = bench_postprocess(post_batch, post_size, repeats)
    rows.append((f"post-processing, batch {post_batch}, 80 classes, {post_size}px", t_ours, t_tv))
    print(f"{'what':48s} {'ours s':>9s} {'torchvision s':>14s} {'ratio':>7s}")
    for name, ours, tv in rows:
        print(f"{name:48s} {ours:9.4f} {tv:14.4f} {tv / ours:7.2f}x")


if __name__ == "__main__":
    main()
