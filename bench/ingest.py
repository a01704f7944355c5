"""Training-input throughput: Ray Data over Parquet shards vs a torch DataLoader, and prepare's memory.

    .venv/bin/python bench/ingest.py [--num-images 512] [--image-size 640] [--resize 512] [--cpus 2]
    .venv/bin/python bench/ingest.py --coco ../shared/data/coco128   # real photos instead of shapes

Figures, side by side (targets in brackets):
1. images/s of shards on S3 -> decode -> resize -> flip -> uint8 batches ready for the device
   (`collate_pixels`; normalizing is the trainer's, on its device), through
   `pipelines.training.datasets.detection_dataset` on `--cpus` Ray CPUs and read the way
   jobs.train reads it (each next epoch started as the previous one starts), against a torch
   `DataLoader` with `--cpus` workers that GETs each image from the same S3 (one object per
   request) and decodes it with PIL, then resizes/flips/collates with the same functions [>= 1.5x].
2. the same figure against what the `tiny` preset consumes in training here (images/s of
   forward+backward+SGD steps at its own input size, all cores) [>= 3x].
3. peak memory of `jobs.prepare` at 1k vs 10k synthetic images: the driver's peak RSS and the
   peak summed PSS of its whole process tree (driver + Ray) [ratio <= 1.2].

S3 is a moto server in its own process, so it does not share a GIL with either pipeline. Each
pipeline runs `--epochs` epochs back to back per round, the first not counted; rounds alternate
the pipelines and the best counts, so that other load on a shared machine disturbs both alike
(the load average is printed with the figures). The first line printed is the run's provenance
(bench/provenance.py), so that a saved copy of the output says where its figures come from.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from proctree import cpu_seconds, memory_bytes, process_tree  # noqa: E402
from provenance import provenance  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def measured(fn, roots) -> tuple[float, float]:
    """Run `fn(mark)` (returns the images counted after it called `mark()`): (images/s, CPU ms per
    image over the process trees), both from `mark()` on. (CPU per image is the fair comparison
    on a shared box; see `proctree`.)"""
    state = {}

    def mark():
        state["cpu"], state["start"] = cpu_seconds(roots), time.perf_counter()

    count = fn(mark)
    wall, after = time.perf_counter() - state["start"], cpu_seconds(roots)
    cpu = sum(t - state["cpu"].get(pid, 0.0) for pid, t in after.items())
    return count / wall, 1000 * cpu / count


def make_dataset(args, bucket: str) -> str:
    """Source images + json on S3 (synthetic shapes, or a local COCO folder uploaded)."""
    from pipelines import storage
    from pipelines.formats.synth import write_synth

    src = f"s3://{bucket}/source"
    if args.coco:
        coco_dir = Path(args.coco)
        ann = next(coco_dir.glob("annotations/*.json"))
        images_dir = next(p for p in coco_dir.iterdir() if p.is_dir() and p.name != "annotations")
        storage.write_bytes_atomic(f"{src}/annotations.json", ann.read_bytes())
        for f in images_dir.iterdir():
            storage.write_bytes_atomic(f"{src}/images/{f.name}", f.read_bytes())
    else:
        write_synth(src, num_images=args.num_images, image_size=args.image_size, num_classes=5, seed=0,
                    progress=lambda _: None)
    return src


def ray_stream(shards_uri: str, epochs: int, args, mark) -> int:
    """`epochs` epochs back to back as the training engine reads them: detection_dataset (a new
    per-image shuffle each epoch) -> iter_torch_batches(PixelCollate), uint8 batches ready for the
    device, each next epoch started as the previous one starts (`StartedBatches`). Counts the
    images after the first epoch; the epoch after the last is started and then stopped, so the
    counted epochs do the work of one head start in, as they do out (steady state)."""
    from pipelines.training.datasets import PixelCollate, detection_dataset
    from pipelines.training.epochs import StartedBatches

    def start(epoch: int) -> StartedBatches:
        ds, _ = detection_dataset(shards_uri, image_size=args.resize, max_size=args.max_size, train=True,
                                  epoch=epoch, batch_size=args.batch_size)
        return StartedBatches(ds.iterator(), batch_size=args.batch_size, collate_fn=PixelCollate(), prefetch_batches=2)

    count, upcoming = 0, start(0)
    for epoch in range(epochs):
        current, upcoming = upcoming, start(epoch + 1)  # the last one too, as in a longer run
        if epoch == 1:
            mark()
        for batch in current:
            count += len(batch["image_id"]) if epoch else 0
    upcoming.close()  # so that the counted epochs pay for the next one's head start, as in steady state
    return count


class S3Images:
    """torch Dataset baseline: one GET per image (boto3), PIL decode, same resize/flip as Ray."""

    def __init__(self, bucket: str, prefix: str, coco: dict, args):
        self.bucket, self.prefix, self.args, self.client = bucket, prefix, args, None
        self.images = coco["images"]
        self.targets = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            if not a.get("iscrowd"):
                x, y, w, h = a["bbox"]
                self.targets[a["image_id"]].append([x, y, x + w, y + h])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import boto3
        from PIL import Image

        from pipelines.images.transforms import hflip, resize_boxes, resize_image

        if self.client is None:  # one client per DataLoader worker, made after the fork
            self.client = boto3.client("s3")
        im = self.images[i]
        data = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{im['file_name']}")["Body"].read()
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        resized = resize_image(pixels, self.args.resize, self.args.max_size)
        boxes = resize_boxes(np.array(self.targets[im["id"]], np.float32), pixels.shape[:2], resized.shape[:2])
        if np.random.random() < 0.5:
            resized, boxes = hflip(resized, boxes)
        return {"image_id": im["id"], "pixels": resized.tobytes(), "height": resized.shape[0],
                "width": resized.shape[1], "orig_height": pixels.shape[0], "orig_width": pixels.shape[1],
                "scale": resized.shape[0] / pixels.shape[0], "boxes": boxes.tobytes(),
                "labels": np.zeros(len(boxes), np.int64).tobytes(), "num_boxes": len(boxes)}


def collate_rows(rows):
    from pipelines.images.collate import collate_pixels

    batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        batch[key] = np.array(values, dtype=object) if isinstance(values[0], bytes) else np.array(values)
    return collate_pixels(batch)  # uint8 batches ready for the device, as the Ray side ends


def make_loader(bucket: str, src: str, args):
    """The baseline DataLoader; spawned workers, since forking a Ray driver is unsafe."""
    import torch

    from pipelines import storage

    coco = json.loads(storage.read_bytes(f"{src}/annotations.json"))
    dataset = S3Images(bucket, "source/images", coco, args)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.cpus,
                                       collate_fn=collate_rows, persistent_workers=True,
                                       multiprocessing_context="spawn")


def loader_stream(loader, epochs: int, mark) -> int:
    """`epochs` epochs back to back; counts the images after the first."""
    count = 0
    for epoch in range(epochs):
        if epoch == 1:
            mark()
        images = sum(len(batch["image_id"]) for batch in loader)
        count += images if epoch else 0
    return count


def tiny_training_rate(steps: int = 8, batch_size: int = 8) -> tuple[float, float, int]:
    """The tiny preset's training step (forward + backward + SGD) on all cores:
    (images/s of the fastest step, CPU ms per image, input size)."""
    import torch

    import retinanet

    model = retinanet.build("tiny", categories=[{"id": k, "name": str(k)} for k in range(1, 6)])
    size = model.config.min_size
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images = torch.randn(batch_size, 3, size, size)
    sizes = torch.tensor([[size, size]] * batch_size)
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]] * batch_size)
    targets = {"boxes": boxes, "labels": torch.tensor([[0, 3]] * batch_size),
               "num_boxes": torch.full((batch_size,), 2)}
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            cpu_start = time.process_time()
        start = time.perf_counter()
        losses = model(images, sizes, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    cpu_ms = 1000 * (time.process_time() - cpu_start) / (steps * batch_size)
    return batch_size / min(times[2:]), cpu_ms, size


def prepare_peak_memory(num_images: int, workdir: Path, images_per_shard: int) -> dict:
    """Run jobs.prepare in a fresh process (its own local Ray) and sample its memory."""
    from pipelines.formats.synth import write_synth

    src = workdir / f"synth-{num_images}"
    if not (src / "annotations.json").exists():
        write_synth(str(src), num_images=num_images, image_size=128, num_classes=5, seed=1, progress=lambda _: None)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    log = open(workdir / f"prepare-{num_images}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--images", str(src / "images"),
                             "--annotations", str(src / "annotations.json"),
                             "--output", str(workdir / f"out-{num_images}"),
                             "--images-per-shard", str(images_per_shard)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    peak = {"driver_rss": 0, "tree_pss": 0}
    start = time.perf_counter()
    while proc.poll() is None:
        peak["driver_rss"] = max(peak["driver_rss"], memory_bytes(proc.pid, "Rss"))
        peak["tree_pss"] = max(peak["tree_pss"], sum(memory_bytes(p, "Pss") for p in process_tree([proc.pid])))
        time.sleep(0.2)
    log.close()
    if proc.returncode != 0:
        tail = (workdir / f"prepare-{num_images}.log").read_text()[-2000:]
        raise RuntimeError(f"jobs.prepare failed with exit code {proc.returncode}: {tail}")
    return {**peak, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--image-size", type=int, default=640, help="side of the synthetic images")
    p.add_argument("--coco", help="a local COCO folder (annotations/*.json + one image folder) instead of shapes")
    p.add_argument("--resize", type=int, default=512, help="shorter side after resize")
    p.add_argument("--max-size", type=int, default=853, help="longer side cap (paper ratio 1333/800)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs and DataLoader workers")
    p.add_argument("--epochs", type=int, default=4, help="epochs per round and pipeline, back to back; the first "
                   "is not counted (start-up)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating the pipelines; the best counts")
    p.add_argument("--memory-sizes", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--memory-shard-sizes", type=int, nargs="*", default=[1000, 250],
                   help="--images-per-shard values for the memory runs (1000 = the default)")
    args = p.parse_args()
    print("provenance: " + json.dumps(provenance()), flush=True)

    import boto3
    import ray

    moto, endpoint = start_moto()
    try:
        bucket = "bench"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        src = make_dataset(args, bucket)
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        from pipelines.formats.prepare import prepare

        manifest = prepare(f"{src}/images", f"{src}/annotations.json", f"s3://{bucket}/shards",
                           images_per_shard=128, progress=lambda _: None)
        loader = make_loader(bucket, src, args)
        roots = [os.getpid(), moto.pid]  # Ray's and the DataLoader's workers are descendants
        runs = {"ray": [], "loader": []}
        shards = f"s3://{bucket}/shards"
        for _ in range(args.rounds):  # interleaved, so a busy moment hits both pipelines
            runs["ray"].append(measured(lambda mark: ray_stream(shards, args.epochs, args, mark), roots))
            runs["loader"].append(measured(lambda mark: loader_stream(loader, args.epochs, mark), roots))
        loader = None  # drops the DataLoader, so its persistent workers exit now, before Ray and moto stop
        ray.shutdown()
    finally:
        moto.terminate()
    train_rate, train_cpu_ms, train_size = tiny_training_rate()

    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        for per_shard in args.memory_shard_sizes:
            for n in args.memory_sizes:
                memory[n, per_shard] = prepare_peak_memory(n, Path(tmp), per_shard)
    report(args, manifest, runs, (train_rate, train_cpu_ms, train_size), memory)


def report(args, manifest, runs, train, memory) -> None:
    data = f"{args.coco} ({manifest.num_images} images)" if args.coco else \
        f"synthetic {args.image_size}px x {manifest.num_images}"
    print(f"\ningest: {data}, shards on moto S3, resize {args.resize}/{args.max_size}, batch {args.batch_size}, "
          f"{args.cpus} CPUs ({os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"{'pipeline':<40}{'best img/s':>11}{'CPU ms/img':>11}{'img/s on idle cores':>21}   rounds img/s")
    steady = {}
    for name, label in (("ray", "Ray Data shards (detection_dataset)"), ("loader", "DataLoader, 1 GET/image + PIL")):
        rates = [r for r, _ in runs[name]]
        cpu_ms = float(np.median([c for _, c in runs[name]]))
        steady[name] = (max(rates), cpu_ms)
        print(f"{label:<40}{steady[name][0]:>11.1f}{cpu_ms:>11.1f}"
              f"{1000 * os.cpu_count() / cpu_ms:>21.1f}   " + " ".join(f"{r:.1f}" for r in rates))
    train_rate, train_cpu_ms, train_size = train
    print(f"{'tiny preset training (' + str(train_size) + ' px)':<40}{train_rate:>11.1f}{train_cpu_ms:>11.1f}"
          f"{1000 * os.cpu_count() / train_cpu_ms:>21.1f}")
    (ray_rate, ray_cpu), (loader_rate, loader_cpu) = steady["ray"], steady["loader"]
    print(f"Ray vs DataLoader: {ray_rate / loader_rate:.2f}x measured, {loader_cpu / ray_cpu:.2f}x by CPU per image "
          f"(target >= 1.5x)")
    print(f"Ray vs tiny training: {ray_rate / train_rate:.1f}x measured, "
          f"{train_cpu_ms / ray_cpu:.1f}x by CPU per image (target >= 3x)")
    if memory:
        print(f"\n{'prepare, synthetic 128px':<32}{'shards':>7}{'driver peak RSS MB':>20}{'tree peak PSS MB':>18}"
              f"{'seconds':>9}")
        for (n, per_shard), m in memory.items():
            print(f"{n:>6} images, {per_shard:>4} per shard{'':<5}{-(-n // per_shard):>7}"
                  f"{m['driver_rss'] / 2**20:>20.0f}{m['tree_pss'] / 2**20:>18.0f}{m['seconds']:>9.1f}")
        for per_shard in args.memory_shard_sizes:
            small, big = (memory.get((n, per_shard)) for n in (min(args.memory_sizes), max(args.memory_sizes)))
            if small and big and small is not big:
                print(f"ratio {max(args.memory_sizes)}/{min(args.memory_sizes)} images at {per_shard} per shard: "
                      f"driver {big['driver_rss'] / small['driver_rss']:.2f}, "
                      f"tree {big['tree_pss'] / small['tree_pss']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
