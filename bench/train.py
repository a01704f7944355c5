"""Benchmark: training throughput of `jobs.train` (tiny preset, 1 worker, CPU) side by side with
(1) the same model stepping on batches already collated in memory (pipeline efficiency: how
much the Ray Data -> Ray Train path costs), and (2) torchvision's RetinaNet at identical
architecture trained with a torch DataLoader loop in the style of torchvision's detection
references (PIL decode in DataLoader workers, the model's own transform, per-image targets).

    PYTHONPATH=. .venv/bin/python bench/train.py [--images 320] [--steps 40] [--size 128] [--save FILE]

All three use the same images, batch size, image size, threads and number of steps; images/s
excludes the first logging window / warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from model import torchvision_twin  # noqa: E402

import retinanet  # noqa: E402
from jobs import prepare, train  # noqa: E402
from pipelines.formats.synth import write_synth  # noqa: E402
from pipelines.images.transforms import collate_detection_batch, preprocess_batch  # noqa: E402


def run_job(shards: str, out: str, args) -> float:
    log_every = max(1, args.steps // 4)
    assert train.main(["--data", shards, "--output", out, "--num-workers", "1", "--batch-size", str(args.batch),
                       "--max-steps", str(args.steps), "--image-size", str(args.size), "--log-every", str(log_every),
                       "--checkpoint-every", str(10 * args.steps)]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    return float(np.mean([r["images_per_s"] for r in rows[1:]]))  # skip the first window (start-up)


def in_memory_batches(shards: str, args) -> list[dict]:
    """Collated batches exactly as the job's pipeline produces them, decoded beforehand."""
    import pyarrow.parquet as pq

    from pipelines.formats.shards import read_manifest

    manifest = read_manifest(shards)
    table = pq.read_table(os.path.join(shards, manifest.shards[0]["file"]))
    rows = preprocess_batch(table.slice(0, args.batch * 4), category_ids=manifest.category_ids, min_size=args.size,
                            max_size=int(round(args.size * 1333 / 800)), train=True, seed=0, epoch=0)
    return [collate_detection_batch({k: v[i * args.batch:(i + 1) * args.batch] for k, v in rows.items()})
            for i in range(4)], manifest.num_classes


def run_in_memory(batches, num_classes, args) -> float:
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=num_classes, min_size=args.size,
                            max_size=int(round(args.size * 1333 / 800))).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = batches[step % len(batches)]
        losses = model(batch["images"], batch["image_sizes"],
                       {k: batch[k] for k in ("boxes", "labels", "num_boxes")})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return (args.steps - args.warmup) * args.batch / (time.perf_counter() - start)


class CocoImages(torch.utils.data.Dataset):
    """torchvision-references style: PIL decode, to tensor, random flip, per-image target dicts."""

    def __init__(self, root: str, num_classes: int):
        data = json.load(open(os.path.join(root, "annotations.json")))
        self.root, self.images = root, data["images"]
        self.boxes = {img["id"]: [] for img in self.images}
        ids = sorted(c["id"] for c in data["categories"])
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            self.boxes[a["image_id"]].append(([x, y, x + w, y + h], ids.index(a["category_id"])))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        info = self.images[i]
        image = torch.from_numpy(np.asarray(Image.open(os.path.join(self.root, "images", info["file_name"]))
                                            .convert("RGB"))).permute(2, 0, 1).float() / 255
        pairs = self.boxes[info["id"]]
        boxes = torch.tensor([b for b, _ in pairs], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in pairs], dtype=torch.int64)
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels}


def run_torchvision(root: str, num_classes: int, args) -> float:
    torch.manual_seed(0)
    ours = retinanet.build("tiny", num_classes=num_classes, min_size=args.size, max_size=int(round(args.size * 1333 / 800)))
    model = torchvision_twin(ours).train()
    loader = torch.utils.data.DataLoader(CocoImages(root, num_classes), batch_size=args.batch, shuffle=True,
                                         num_workers=1, collate_fn=lambda b: tuple(zip(*b)), drop_last=True,
                                         persistent_workers=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    step, start = 0, None
    while step < args.steps:
        for images, targets in loader:
            if step == args.warmup:
                start = time.perf_counter()
            losses = model(list(images), list(targets))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            step += 1
            if step >= args.steps:
                break
    return (args.steps - args.warmup) * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--save", help="also write the figures as JSON here (e.g. bench/results/train-cpu.json)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-train-")
    root, shards = os.path.join(work, "synth"), os.path.join(work, "shards")
    write_synth(root, num_images=args.images, image_size=args.size, num_classes=3, seed=0, progress=lambda line: None)
    assert prepare.main(["--images", os.path.join(root, "images"), "--annotations",
                         os.path.join(root, "annotations.json"), "--output", shards]) == 0
    job = run_job(shards, os.path.join(work, "run"), args)
    import ray

    ray.shutdown()  # the job's local Ray instance must not compete with the two baselines
    batches, num_classes = in_memory_batches(shards, args)
    memory = run_in_memory(batches, num_classes, args)
    tv = run_torchvision(root, num_classes, args)
    print(f"\ncores {os.cpu_count()}, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.size} px, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    print(f"{'jobs.train (Ray Data -> Ray Train, 1 worker)':52s} {job:7.2f} images/s")
    print(f"{'same model on in-memory batches':52s} {memory:7.2f} images/s   efficiency {job / memory:.2f}")
    print(f"{'torchvision RetinaNet + DataLoader (references style)':52s} {tv:7.2f} images/s   "
          f"jobs.train / torchvision {job / tv:.2f}x")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after} on {os.cpu_count()} cores")
    if args.save:
        figures = {"jobs_train_images_per_s": job, "in_memory_images_per_s": memory, "torchvision_images_per_s": tv,
                   "pipeline_efficiency": job / memory, "vs_torchvision": job / tv, "cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
                   "load_average_after": load_after, **{k: getattr(args, k) for k in ("images", "steps", "warmup",
                                                                                      "batch", "size")}}
        with open(args.save, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
