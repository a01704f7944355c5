"""GPU figures for the training input: does the GPU wait for decoded batches?

Run by bench/gpu.sh on the GPU machine (torch, torchvision, pyarrow; no Ray). It stands in for
the cluster's split of work: `--decoders` CPU processes decode and resize JPEGs to 800 px
(`pipelines.images.transforms.preprocess_batch`, what Ray Data's tasks run on CPU nodes) and
the main process trains R50-FPN (AMP bf16) on what they send, through the path `jobs.train`
takes: `collate_pixels` (uint8 channels-last, numpy only) in a thread, pinned memory, one
host-to-device copy, `normalize_images` on the GPU. Figures, each with its batch count:

1. train steps on batches already on the GPU: the GPU's own rate (the ceiling);
2. the same steps fed by the decoders: images/s and GPU busy fraction (summed step time on the
   GPU, from CUDA events, over wall time);
3. images/s one CPU process decodes and resizes at 800 px (d in cluster/README's sizing: a GPU
   at r img/s needs r / d decode cores).

`--dry-run` runs every path with the tiny preset at 128 px on whatever device there is. The
JSON written carries the run's provenance (bench/provenance.py).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import retinanet  # noqa: E402
from pipelines.images.collate import collate_pixels, normalize_images  # noqa: E402

from provenance import provenance  # noqa: E402  (bench/provenance.py)


def _jpegs(count: int, seed: int = 0) -> list[bytes]:
    """COCO-like 640x480 JPEGs: smooth gradients plus noise (JPEG decode cost depends on content)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for _ in range(count):
        base = (np.stack([xx * rng.uniform(0.1, 0.4), yy * rng.uniform(0.1, 0.5), (xx + yy) * 0.2], -1) % 255)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _decoder(jpegs: list[bytes], batch: int, size: int, start: int, step: int, out: mp.Queue, stop) -> None:
    """One decode process: preprocessed training rows of `batch` images, forever."""
    import pyarrow as pa

    from pipelines.images.transforms import preprocess_batch

    torch.set_num_threads(1)
    i = start
    while not stop.is_set():
        picked = [jpegs[(i + k) % len(jpegs)] for k in range(batch)]
        table = pa.table({"image_id": pa.array(range(i, i + batch), pa.int64()), "image": pa.array(picked, pa.binary()),
                          "boxes": pa.array([[[10.0, 20.0, 200.0, 220.0]]] * batch, pa.list_(pa.list_(pa.float32()))),
                          "category_id": pa.array([[1]] * batch, pa.list_(pa.int32())),
                          "iscrowd": pa.array([[False]] * batch, pa.list_(pa.bool_()))})
        rows = preprocess_batch(table, category_ids=[1], min_size=size, max_size=int(size * 1333 / 800), train=True)
        out.put(rows)
        i += step * batch


def _step_fn(model, optimizer, device, precision):
    def step(images, sizes, targets):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = model(images, sizes, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, size, batch, steps = ("tiny", 128, 2, 3) if args.dry_run else ("r50", args.size, args.batch, args.steps)
    if args.dry_run:
        args.decoders = min(args.decoders, 2)
    torch.manual_seed(0)
    model = retinanet.build(preset, num_classes=80, min_size=size, max_size=int(size * 1333 / 800)).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    step = _step_fn(model, optimizer, device, args.precision)
    mean, std = model.config.image_mean, model.config.image_std
    jpegs = _jpegs(8 if args.dry_run else 64)

    # 3. one decode process's rate (after its start-up)
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    one = ctx.Process(target=_decoder, args=(jpegs, batch, size, 0, 1, out, stop), daemon=True)
    one.start()
    first = [out.get()]
    start = time.perf_counter()
    first += [out.get() for _ in range(2 if args.dry_run else 6)]
    decode_rate = (len(first) - 1) * batch / (time.perf_counter() - start)
    stop.set()
    one.terminate()

    def collated(rows):  # what Ray's iterator thread does: collate, pin
        cpu = collate_pixels(rows, model.config.size_divisible)
        if device.type == "cuda":
            cpu["pixels"] = cpu["pixels"].pin_memory()
        return cpu

    def to_device(cpu):  # what the training loop does
        images = normalize_images(cpu["pixels"].to(device, non_blocking=True), cpu["image_sizes"], mean, std,
                                  channels_last=device.type == "cuda")
        return images, cpu["image_sizes"], {k: cpu[k].to(device) for k in ("boxes", "labels", "num_boxes")}

    # 1. the GPU's own rate on resident batches
    resident = [to_device(collated(rows)) for rows in first[:2]]
    for k in range(2):
        step(*resident[k % 2])
    timed = _timed_steps(lambda k: resident[k % 2], step, steps, device)

    # 2. fed by decode processes through a collate thread with two batches of prefetch
    feed, stop = ctx.Queue(maxsize=4 * args.decoders), ctx.Event()
    workers = [ctx.Process(target=_decoder, args=(jpegs, batch, size, w, args.decoders, feed, stop), daemon=True)
               for w in range(args.decoders)]
    for w in workers:
        w.start()
    ready: queue.Queue = queue.Queue(maxsize=2)
    threading.Thread(target=lambda: [ready.put(collated(feed.get())) for _ in range(steps + 1)], daemon=True).start()
    step(*to_device(ready.get()))  # the decoders are up
    fed = _timed_steps(lambda k: to_device(ready.get()), step, steps, device)
    stop.set()
    for w in workers:
        w.terminate()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "preset": preset, "image_size": size, "batch": batch, "steps": steps,
            "precision": args.precision, "decoders": args.decoders, "dry_run": args.dry_run,
            "resident_images_per_s": round(batch * steps / timed["wall_s"], 2),
            "fed_images_per_s": round(batch * steps / fed["wall_s"], 2),
            "fed_gpu_busy_fraction": round(fed["busy_s"] / fed["wall_s"], 3),
            "resident_gpu_busy_fraction": round(timed["busy_s"] / timed["wall_s"], 3),
            "decode_images_per_s_per_process": round(decode_rate, 2)}


def _timed_steps(batch_at, step, steps: int, device) -> dict:
    """Wall time of `steps` steps and the summed time the GPU spent in them (CUDA events)."""
    events = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for k in range(steps):
        inputs = batch_at(k)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(*inputs)
            end.record()
            events.append((begin, end))
        else:
            step(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    busy = sum(b.elapsed_time(e) for b, e in events) / 1000 if events else wall
    return {"wall_s": wall, "busy_s": busy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny preset, 128 px, a few steps, any device")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--decoders", type=int, default=12, help="decode processes (CPU cores given to decoding)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--output", help="JSON to write (default on a GPU: bench/results/train-input-gpu.json)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU: run with --dry-run to check the paths on a CPU", file=sys.stderr)
        return 2
    report = {"provenance": provenance(), **run(args)}
    print(json.dumps(report, indent=1), flush=True)
    output = args.output or (None if args.dry_run else "bench/results/train-input-gpu.json")
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
