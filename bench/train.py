"""Benchmark: training throughput of `jobs.train` (tiny preset, CPU) side by side with
(1) the same model stepping on batches already collated in memory (pipeline efficiency: how
much the Ray Data -> Ray Train path costs), (2) torchvision's RetinaNet at identical
architecture trained with a torch DataLoader loop in the style of torchvision's detection
references (PIL decode in DataLoader workers, the model's own transform, per-image targets),
and (3) the in-memory loop run by Ray Train on jobs.train's Ray instance: Ray Train and an
idle Ray's own cost, which (1) counts against the input path and the input path cannot remove.

    PYTHONPATH=. .venv/bin/python bench/train.py [--images 320] [--steps 40] [--size 128] [--save FILE]

All use the same images, batch size, image size, threads and number of steps; images/s
excludes the first logging window / warm-up steps. The first line printed is the run's
provenance (bench/provenance.py), also saved in --save's JSON.
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
import retinanet  # noqa: E402
from jobs import prepare, train  # noqa: E402
from pipelines.formats.synth import write_synth  # noqa: E402
from pipelines.images.collate import collate_detection_batch  # noqa: E402
from pipelines.images.transforms import preprocess_batch  # noqa: E402

from model import torchvision_twin  # noqa: E402
from proctree import CpuSampler, cpu_seconds  # noqa: E402
from provenance import provenance  # noqa: E402


def run_job(shards: str, out: str, args) -> tuple[float, dict[str, float]]:
    """(images/s after the warm-up steps, CPU ms per image by process role over those steps)."""
    # Once a second: the sampler runs in this (the driver's) process, beside the job only, and
    # at its default 0.2 s it took ~20 ms of CPU per second (5 ms at 1 s; measured, idle Ray).
    with CpuSampler([os.getpid()], interval=1.0) as sampler:
        started = time.time()
        assert train.main(["--data", shards, "--output", out, "--num-workers", str(args.workers),
                           "--batch-size", str(args.batch),
                           "--max-steps", str(args.steps), "--image-size", str(args.size),
                           "--log-every", str(args.warmup), "--checkpoint-every", str(10 * args.steps)]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    first, last = rows[0], rows[-1]  # the first line is the warm-up window (start-up)
    images = (last["step"] - first["step"]) * args.batch * args.workers
    cpu = sampler.by_role(first["time"], last["time"])
    whole = sampler.by_role(started, time.time())
    print("\njobs.train CPU seconds by process, whole run (start-up, all steps, shutdown):")
    for name, seconds in whole.items():
        print(f"  {name:50s} {seconds:7.2f}")
    return images / (last["time"] - first["time"]), {k: 1000 * v / images for k, v in cpu.items()}


def in_memory_batches(shards: str, args) -> tuple[list[dict], int]:
    """Collated batches exactly as the job's pipeline produces them, decoded beforehand."""
    import pyarrow.parquet as pq

    from pipelines.formats.shards import read_manifest

    manifest = read_manifest(shards)
    table = pq.read_table(os.path.join(shards, manifest.shards[0]["file"]))
    rows = preprocess_batch(table.slice(0, args.batch * 4), category_ids=manifest.category_ids, min_size=args.size,
                            max_size=int(round(args.size * 1333 / 800)), train=True, seed=0, epoch=0)
    return [collate_detection_batch({k: v[i * args.batch:(i + 1) * args.batch] for k, v in rows.items()})
            for i in range(4)], manifest.num_classes


def ddp_run(fn, world: int, *args) -> tuple[float, float]:
    """Run `fn(rank, world, *args)` in `world` spawned processes joined by a gloo process group
    (DDP, as Ray Train sets it up), each with cores / world torch threads, as jobs.train gives
    its workers. Each rank returns (images, seconds, CPU seconds of its process tree) for its
    steps after the warm-up: (images/s of all ranks, CPU ms per image) comes back."""
    import torch.multiprocessing as mp

    from pipelines.ray_runtime import free_port

    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_main, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
    images = sum(r[0] for r in results.values())
    return images / max(r[1] for r in results.values()), 1000 * sum(r[2] for r in results.values()) / images


def _rank_main(rank: int, world: int, port: int, fn, args, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model) if torch.distributed.get_world_size() > 1 else model


class _Measure:
    """Wall and CPU time (this process and its children) from the first step after the warm-up."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds([os.getpid()])

    def result(self, images: int) -> tuple[int, float, float]:
        cpu = cpu_seconds([os.getpid()])
        return images, time.perf_counter() - self.wall, sum(t - self.cpu.get(pid, 0.0) for pid, t in cpu.items())


def in_memory_rank(rank: int, world: int, batches, num_classes: int, args, wrap=_ddp):
    torch.manual_seed(0)
    model = retinanet.build("tiny", num_classes=num_classes, min_size=args.size,
                            max_size=int(round(args.size * 1333 / 800))).train()
    ddp_model = wrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    measure = _Measure()
    for step in range(args.steps):
        if step == args.warmup:
            measure.start()
        batch = batches[(step * world + rank) % len(batches)]
        losses = ddp_model(batch["images"], batch["image_sizes"],
                           {k: batch[k] for k in ("boxes", "labels", "num_boxes")})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return measure.result((args.steps - args.warmup) * args.batch)


def ray_train_in_memory(batches, num_classes: int, args) -> tuple[float, dict[str, float]]:
    """The in-memory loop run by Ray Train (TorchTrainer, `prepare_model`) on the Ray instance
    jobs.train left running, with its CPUs per worker and threads: what Ray Train and an idle
    Ray cost the step without any input path. (images/s, CPU ms per image by process role)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tempfile.mktemp(suffix=".json")  # Ray Train 2.60 keeps metrics only with checkpoints
    config = {"batches": batches, "num_classes": num_classes, "args": vars(args), "out": out}
    with CpuSampler([os.getpid()], interval=1.0) as sampler:
        TorchTrainer(_ray_train_rank, train_loop_config=config, scaling_config=ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": 1})).fit()
    m = json.load(open(out))
    cpu = sampler.by_role(m["start"], m["end"])
    return m["images"] / (m["end"] - m["start"]), {k: 1000 * v / m["images"] for k, v in cpu.items()}


def _ray_train_rank(config: dict) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    world = context.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as jobs.train sets it
    images, seconds, _ = in_memory_rank(context.get_world_rank(), world, config["batches"], config["num_classes"],
                                        argparse.Namespace(**config["args"]), wrap=ray.train.torch.prepare_model)
    end = time.time()
    if context.get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"images": images * world, "start": end - seconds, "end": end}, f)


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
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels}


def torchvision_rank(rank: int, world: int, root: str, num_classes: int, args):
    torch.manual_seed(0)
    ours = retinanet.build("tiny", num_classes=num_classes, min_size=args.size,
                           max_size=int(round(args.size * 1333 / 800)))
    model = torchvision_twin(ours).train()
    ddp_model = _ddp(model)
    dataset = CocoImages(root, num_classes)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=1,
                                         collate_fn=_tuples, drop_last=True, persistent_workers=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    step, epoch, measure = 0, 0, _Measure()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, targets in loader:
            if step == args.warmup:
                measure.start()
            losses = ddp_model(list(images), list(targets))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            step += 1
            if step >= args.steps:
                break
        epoch += 1
    return measure.result((args.steps - args.warmup) * args.batch)


def _tuples(batch):
    return tuple(zip(*batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--steps", type=int, default=100, help="a multiple of --warmup")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per worker per step")
    parser.add_argument("--workers", type=int, default=1, help="DDP workers, in jobs.train and in both baselines")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three runs, one after the other")
    parser.add_argument("--save", help="also write the figures as JSON here (e.g. bench/results/train-cpu.json)")
    args = parser.parse_args()
    origin = provenance()
    print("provenance: " + json.dumps(origin), flush=True)
    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-train-")
    root, shards = os.path.join(work, "synth"), os.path.join(work, "shards")
    write_synth(root, num_images=args.images, image_size=args.size, num_classes=3, seed=0, progress=lambda line: None)
    assert prepare.main(["--images", os.path.join(root, "images"), "--annotations",
                         os.path.join(root, "annotations.json"), "--output", shards]) == 0
    batches, num_classes = in_memory_batches(shards, args)
    rounds = []
    for r in range(args.rounds):  # A-B-C, A-B-C: the machine's speed drifts, so ratios come per round
        job, job_cpu = run_job(shards, os.path.join(work, f"run-{r}"), args)
        in_ray_train, in_ray_train_cpu = ray_train_in_memory(batches, num_classes, args)
        import ray

        ray.shutdown()  # the job's local Ray instance must not compete with the two baselines
        memory, memory_cpu = ddp_run(in_memory_rank, args.workers, batches, num_classes, args)
        tv, tv_cpu = ddp_run(torchvision_rank, args.workers, root, num_classes, args)
        rounds.append({"jobs_train_images_per_s": job, "in_memory_images_per_s": memory, "torchvision_images_per_s": tv,
                       "in_memory_ray_train_images_per_s": in_ray_train,
                       "pipeline_efficiency": job / memory, "vs_torchvision": job / tv,
                       "ray_train_efficiency": in_ray_train / memory, "input_path_efficiency": job / in_ray_train,
                       "cpu_ms_per_image": {"jobs_train": job_cpu, "in_memory": memory_cpu, "torchvision": tv_cpu,
                                            "in_memory_ray_train": in_ray_train_cpu}})
    load_after = os.getloadavg()
    print(f"\ncores {os.cpu_count()}, {args.workers} workers (DDP) x {max(1, os.cpu_count() // args.workers)} torch "
          f"threads, batch {args.batch} per worker, {args.size} px, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds")
    print(f"{'':52s} {'images/s':>9} {'CPU ms/image':>13}")
    for r, f in enumerate(rounds):
        cpu = f["cpu_ms_per_image"]
        print(f"round {r + 1}")
        print(f"{f'jobs.train (Ray Data -> Ray Train, {args.workers} workers)':52s} "
              f"{f['jobs_train_images_per_s']:9.2f} {sum(cpu['jobs_train'].values()):13.1f}")
        print(f"{'same model on in-memory batches':52s} {f['in_memory_images_per_s']:9.2f} {cpu['in_memory']:13.1f}"
              f"   efficiency {f['pipeline_efficiency']:.2f}")
        print(f"{'torchvision RetinaNet + DataLoader (references style)':52s} {f['torchvision_images_per_s']:9.2f} "
              f"{cpu['torchvision']:13.1f}   jobs.train / torchvision {f['vs_torchvision']:.2f}x")
        print(f"{'in-memory batches in Ray Train (no Ray Data)':52s} {f['in_memory_ray_train_images_per_s']:9.2f} "
              f"{sum(cpu['in_memory_ray_train'].values()):13.1f}   vs in-memory {f['ray_train_efficiency']:.2f}, "
              f"jobs.train vs it {f['input_path_efficiency']:.2f}")
    efficiency = float(np.mean([f["pipeline_efficiency"] for f in rounds]))
    vs_tv = float(np.mean([f["vs_torchvision"] for f in rounds]))
    print(f"mean over rounds: efficiency {efficiency:.2f}, jobs.train / torchvision {vs_tv:.2f}x, in-memory in Ray "
          f"Train {np.mean([f['ray_train_efficiency'] for f in rounds]):.2f}, jobs.train vs that "
          f"{np.mean([f['input_path_efficiency'] for f in rounds]):.2f}")
    job_cpu, ray_train_cpu = (rounds[-1]["cpu_ms_per_image"][k] for k in ("jobs_train", "in_memory_ray_train"))
    print("\nCPU ms per image by process (steps after the warm-up, last round):")
    print(f"  {'':50s} {'jobs.train':>10s} {'in-memory in Ray Train':>23s}")
    for name in sorted(set(job_cpu) | set(ray_train_cpu), key=lambda n: -job_cpu.get(n, 0.0)):
        print(f"  {name:50s} {job_cpu.get(name, 0.0):10.2f} {ray_train_cpu.get(name, 0.0):23.2f}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after} on {os.cpu_count()} cores")
    if args.save:
        figures = {"provenance": origin,
                   "pipeline_efficiency_mean": efficiency, "vs_torchvision_mean": vs_tv, "rounds": rounds,
                   "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
                   **{k: getattr(args, k) for k in ("images", "steps", "warmup", "batch", "size", "workers")}}
        with open(args.save, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
