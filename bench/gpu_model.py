"""GPU figures: retinanet/ vs torchvision's RetinaNet (same architecture, same weights) at 800 px.

Run by bench/gpu.sh on a machine with a GPU and only torch/torchvision (no Ray, no pycocotools):
(1) training step (forward + backward + SGD step) of R50-FPN, fp32 and AMP bf16, images/s;
(2) inference (forward + post-processing), fp32 and AMP bf16, images/s;
(3) detections on the GPU equal those on the CPU (fp32, TF32 off) within tolerance, and ours
    equal torchvision's on the GPU.
Writes one JSON naming the device, with the run's provenance. `--dry-run` runs every code path with the tiny preset at
128 px, once, on whatever device there is (CPU included), so the script is checked anywhere.

The weights are random (nothing can be downloaded on the GPU machines). Timed models keep the
focal-loss prior bias (scores ~0.01: post-processing is light, the network dominates, as for a
confident trained model; bench/model.py times post-processing under heavy load on its own).
The detection comparison uses a copy whose classification bias is 0, so that scores spread over
(0, 1) and every image yields its 100 detections: the comparison has something to compare.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import retinanet  # noqa: E402

from model import _targets, torchvision_twin  # noqa: E402  (bench/model.py)
from provenance import provenance  # noqa: E402  (bench/provenance.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_pair(preset: str, size: int, device: torch.device, spread_scores: bool = False):
    torch.manual_seed(0)
    ours = retinanet.build(preset, num_classes=80, min_size=size, max_size=size)
    if spread_scores:
        with torch.no_grad():  # scores spread over (0, 1) instead of the prior's ~0.01
            head_cls = [m for m in ours.head.modules() if isinstance(m, torch.nn.Conv2d)
                        and m.out_channels == ours.config.num_anchors * 80]
            head_cls[-1].bias.zero_()
    tv = torchvision_twin(ours)
    return ours.to(device), tv.to(device)


def _inputs(batch: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    return images


def bench_train(ours, tv, size, batch, precision, device, repeats, warmup):
    images = _inputs(batch, size, device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in _targets(batch, size, 80)]
    cfg = ours.config
    mean = torch.tensor(cfg.image_mean, device=device)[:, None, None]
    std = torch.tensor(cfg.image_std, device=device)[:, None, None]
    padded = {"boxes": torch.stack([t["boxes"] for t in targets]),
              "labels": torch.stack([t["labels"] for t in targets]),
              "num_boxes": torch.full((batch,), 6, device=device)}
    sizes = [[size, size]] * batch
    rows = {}
    for name, model, forward in (
            ("retinanet", ours, lambda: ours((torch.stack(images) - mean) / std, sizes, padded)),
            ("torchvision", tv, lambda: tv(images, targets))):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                              momentum=0.9)

        def step(forward=forward, opt=opt):
            with _autocast(device, precision):
                losses = forward()
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
        rows[name] = _median_s(step, device, repeats, warmup)
    return rows


def bench_infer(ours, tv, size, batch, precision, device, repeats, warmup):
    images = _inputs(batch, size, device, seed=1)
    cfg = ours.config
    mean = torch.tensor(cfg.image_mean, device=device)[:, None, None]
    std = torch.tensor(cfg.image_std, device=device)[:, None, None]
    sizes = [[size, size]] * batch
    rows = {}
    for name, model, forward in (
            ("retinanet", ours, lambda: ours((torch.stack(images) - mean) / std, sizes)),
            ("torchvision", tv, lambda: tv(images))):
        model.eval()

        def run(forward=forward):
            with torch.inference_mode(), _autocast(device, precision):
                forward()
        rows[name] = _median_s(run, device, repeats, warmup)
    return rows


def _match(a: dict, b: dict, top: int) -> dict:
    """How many of a's `top` detections b has (same label, IoU > 0.99), and the largest score
    and box differences among them."""
    a_boxes, b_boxes = a["boxes"][:top].cpu(), b["boxes"].cpu()
    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return {"compared": len(a_boxes), "matched": 0, "max_score_diff": None, "max_box_diff": None}
    iou = torchvision.ops.box_iou(a_boxes, b_boxes)
    same_label = a["labels"][:top].cpu()[:, None] == b["labels"].cpu()[None, :]
    best_iou, best = (iou * same_label).max(dim=1)
    ok = best_iou > 0.99
    score_diff = (a["scores"][:top].cpu()[ok] - b["scores"].cpu()[best[ok]]).abs()
    box_diff = (a_boxes[ok] - b_boxes[best[ok]]).abs()
    return {"compared": len(a_boxes), "matched": int(ok.sum()),
            "max_score_diff": float(score_diff.max()) if ok.any() else None,
            "max_box_diff": float(box_diff.max()) if ok.any() else None}


def compare_detections(preset: str, size: int, device: torch.device, top: int = 50) -> dict:
    """fp32 detections of the same 2 images on `device` vs on the CPU, and ours vs torchvision
    on `device`. Passes when >= 95% of the top detections match within 1e-3 score, 0.5 px."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours, tv = build_pair(preset, size, device, spread_scores=True)
    images = _inputs(2, size, torch.device("cpu"), seed=2)
    cpu_ours = copy.deepcopy(ours).to("cpu")
    with torch.inference_mode():
        on_cpu = cpu_ours.eval().predict(images)
        on_dev = ours.eval().predict([im.to(device) for im in images])
        tv_dev = tv.eval()([im.to(device) for im in images])
    result = {"gpu_vs_cpu": [_match(a, b, top) for a, b in zip(on_dev, on_cpu)],
              "ours_vs_torchvision": [_match(a, b, top) for a, b in zip(on_dev, tv_dev)]}

    def passed(rows):
        return all(r["compared"] > 0 and r["matched"] >= 0.95 * r["compared"]
                   and r["max_score_diff"] <= 1e-3 and r["max_box_diff"] <= 0.5 for r in rows)
    result["passed"] = passed(result["gpu_vs_cpu"]) and passed(result["ours_vs_torchvision"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="JSON to write (default: bench/results/model-gpu.json "
                   "on a GPU; nothing on a CPU or with --dry-run, whose figures are no results)")
    p.add_argument("--dry-run", action="store_true", help="tiny preset, 128 px, once: checks the paths")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, size, repeats, warmup = "r50", args.size, args.repeats, 3
    train_batch, infer_batch = args.train_batch, args.infer_batch
    if args.dry_run:
        preset, size, repeats, warmup, train_batch, infer_batch = "tiny", 128, 1, 1, 2, 2
    elif device.type == "cpu":
        print("no GPU: run with --dry-run to check the paths on a CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"preset {preset}, {size} px", flush=True)
    ours, tv = build_pair(preset, size, device)
    report = {"provenance": provenance(), "device": name, "device_type": device.type, "torch": torch.__version__,
              "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "preset": preset, "image_size": size, "dry_run": args.dry_run,
              "repeats": repeats, "train": [], "infer": []}
    for precision in ("fp32", "bf16"):
        for kind, batch, bench in (("train", train_batch, bench_train),
                                   ("infer", infer_batch, bench_infer)):
            try:
                seconds = bench(ours, tv, size, batch, precision, device, repeats, warmup)
            except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
                report[kind].append({"precision": precision, "batch": batch,
                                     "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"{kind} {precision}: FAILED {exc}", flush=True)
                continue
            row = {"precision": precision, "batch": batch}
            for impl, s in seconds.items():
                row[f"{impl}_s"] = round(s, 5)
                row[f"{impl}_images_per_s"] = round(batch / s, 2)
            row["speedup_vs_torchvision"] = round(seconds["torchvision"] / seconds["retinanet"], 3)
            report[kind].append(row)
            print(f"{kind:5s} {precision} batch {batch}: ours {row['retinanet_images_per_s']} img/s, "
                  f"torchvision {row['torchvision_images_per_s']} img/s "
                  f"({row['speedup_vs_torchvision']}x)", flush=True)
    del ours, tv  # the training steps moved their weights: the comparison builds its own
    report["detections"] = compare_detections(preset, size, device)
    print(f"detections equal within tolerance: {report['detections']['passed']}", flush=True)
    output = args.output or ("bench/results/model-gpu.json" if device.type == "cuda" and not args.dry_run else None)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    return 0 if report["detections"]["passed"] and not any(
        "error" in r for r in report["train"] + report["infer"]) else 1


if __name__ == "__main__":
    sys.exit(main())
