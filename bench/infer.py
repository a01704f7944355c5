"""Batch inference: jobs.infer against a bare predict loop, its memory at 1k vs 10k images, and a GPU.

    .venv/bin/python bench/infer.py [--num-images 1000] [--memory-images 1000 10000]
    python bench/infer.py --device cuda [--preset r50 --image-size 800 --amp bf16]   # GPU box, no Ray

Figures (targets in brackets); results go to bench/results/infer-cpu.json (1, 2)
and infer-<device>-device.json (3), or to --output, with the run's provenance:
1. pipeline efficiency (CPU, tiny preset): images/s of `jobs.infer` on a local Ray (1 detector
   actor with every core's torch threads, decode tasks beside it) over a folder of JPEGs, end to
   end and in steady state (the difference between runs over N and N/5 images, so start-up
   cancels out), against `model.predict` over the same images already decoded in memory (median
   of three passes around the job runs) [>= 0.85]. CPU ms per image over the whole process tree
   is printed beside. On a shared 2-core machine both move by 2x or more with other load.
2. memory of `jobs.infer` at 1k vs 10k images, each in a fresh process: the driver's peak RSS
   and the peak PSS of the largest Ray worker [ratio <= 1.2].
3. --device cuda: the job's own read + decode (`units.read_uris`, `preprocess_images_batch`, 14
   threads) feeding its `Detector` on
   one GPU, R50-FPN at 800 px with AMP: images/s and GPU utilization (nvidia-smi, steady state)
   [>= 200 images/s, >= 80 %]. Needs no Ray, pycocotools or s3fs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from pipelines.inference.bulk import CALLS_PER_GPU  # noqa: E402 - after the path set-up

from provenance import provenance  # noqa: E402


def write_images(folder: Path, count: int, height: int, width: int) -> list[Path]:
    """Smooth random JPEGs (real decode cost, no two alike)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(path, quality=85)
        paths.append(path)
    return paths


def write_checkpoint(path: Path, preset: str, num_classes: int = 80) -> Path:
    import torch

    import retinanet

    torch.manual_seed(0)
    path.write_bytes(retinanet.checkpoint_bytes(retinanet.build(preset, num_classes=num_classes)))
    return path


def predict_loop(checkpoint: Path, paths: list[Path], batch: int, size: int) -> tuple[float, float]:
    """Baseline: model.predict over images decoded beforehand; (images/s, CPU ms per image)."""
    import torch

    import retinanet
    from pipelines.images.transforms import decode_image

    model, _ = retinanet.load_checkpoint(str(checkpoint))
    images = [torch.from_numpy(decode_image(p.read_bytes()).copy()).permute(2, 0, 1) for p in paths]
    max_size = round(size * 1333 / 800)
    model.predict(images[:batch], min_size=size, max_size=max_size)  # warm-up
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(0, len(images), batch):
        model.predict(images[i:i + batch], min_size=size, max_size=max_size)
    wall = time.perf_counter() - start
    return len(images) / wall, 1000 * (time.process_time() - cpu) / len(images)


def job_argv(checkpoint: Path, images: Path, output: Path, args) -> list[str]:
    return ["--model", str(checkpoint), "--input", str(images), "--output", str(output), "--num-actors", "1",
            "--cpus-per-actor", str(os.cpu_count() or 1), "--batch-size", str(args.batch_size),
            "--image-size", str(args.image_size), "--unit-size", "64"]


def pipeline_run(checkpoint: Path, images: Path, output: Path, args) -> tuple[float, float, int]:
    """jobs.infer in this process on a local Ray: (wall s, CPU s of the whole process tree, images)."""
    from jobs import infer
    from pipelines.ray_runtime import ensure_ray

    ensure_ray(max(4, 2 * (os.cpu_count() or 1)))
    before, start = tree_cpu_seconds(), time.perf_counter()
    stats = infer.run_job(infer.build_parser().parse_args(job_argv(checkpoint, images, output, args)))
    return time.perf_counter() - start, tree_cpu_seconds() - before, stats.images


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants, those that exited included: Ray stops the
    detector actors when a run ends, and their time then moves to the raylet's cutime/cstime."""
    from proctree import _stat_fields, process_tree  # bench/proctree.py: /proc readers

    ticks = 0
    for pid in process_tree([os.getpid()]):
        fields = _stat_fields(pid)
        ticks += sum(int(v) for v in fields[11:15]) if fields else 0  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def efficiency(workdir: Path, checkpoint: Path, args) -> dict:
    """The job at N/5 and N images; the difference is its steady-state cost per image (start-up,
    planning and the last partial batch cancel out), compared with the predict loop's."""
    small, large = workdir / "small", workdir / "images"
    small.mkdir()
    for path in sorted(large.iterdir())[: args.num_images // 5]:
        (small / path.name).symlink_to(path)
    paths = sorted(large.iterdir())
    baseline, runs = [predict_loop(checkpoint, paths, args.batch_size, args.image_size)], []
    for folder in (small, large):  # predict passes before, between and after: other load drifts
        runs.append(pipeline_run(checkpoint, folder, workdir / f"out-{folder.name}", args))
        baseline.append(predict_loop(checkpoint, paths, args.batch_size, args.image_size))
    (w1, c1, n1), (w2, c2, n2) = runs
    return {"predict_rate": [b[0] for b in baseline], "predict_cpu_ms": [b[1] for b in baseline],
            "job_end_to_end_rate": n2 / w2, "job_cpu_ms": 1000 * c2 / n2,
            "job_steady_rate": (n2 - n1) / (w2 - w1), "job_steady_cpu_ms": 1000 * (c2 - c1) / (n2 - n1)}


def memory_child(count: int, workdir: Path, args) -> None:
    """Run jobs.infer on `count` images and print peak memory as JSON (run in a fresh process)."""
    from jobs import infer
    from pipelines.ray_runtime import ensure_ray

    from proctree import memory_bytes, process_tree

    images = workdir / f"images-{count}"
    write_images(images, count, 120, 160)
    ensure_ray(4)
    peak, done = {"worker_pss": 0, "tree_pss": 0}, threading.Event()

    def sample():
        while not done.wait(0.25):
            pss = {pid: memory_bytes(pid, "Pss") for pid in process_tree([os.getpid()]) if pid != os.getpid()}
            peak["worker_pss"] = max(peak["worker_pss"], max(pss.values(), default=0))
            peak["tree_pss"] = max(peak["tree_pss"], sum(pss.values()) + memory_bytes(os.getpid(), "Pss"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    argv = job_argv(workdir / "model.pt", images, workdir / f"out-{count}", args)
    stats = infer.run_job(infer.build_parser().parse_args(argv))
    done.set()
    sampler.join()
    print(json.dumps({"images": stats.images, "seconds": stats.seconds,
                      "driver_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **peak}))


def memory_runs(workdir: Path, args) -> dict:
    out = {}
    for count in args.memory_images:
        cmd = [sys.executable, __file__, "--memory-child", str(count), "--workdir", str(workdir),
               "--image-size", "64", "--batch-size", str(args.batch_size)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=""))
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            raise RuntimeError(f"memory run of {count} images failed:\n{result.stderr[-3000:]}")
        out[count] = json.loads(lines[-1])
    return out


def device_run(args) -> dict:
    """The job's decode + Detector on one device, no Ray: images/s and GPU utilization."""
    import torch

    from pipelines.images.transforms import preprocess_images_batch
    from pipelines.inference.detector import Detector
    from pipelines.inference.units import read_uris

    workdir = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    paths = write_images(workdir / "images", min(args.num_images, 512), 480, 640)
    uris = [str(p) for p in paths] * -(-args.num_images // len(paths))
    uris = uris[:args.num_images]
    checkpoint = write_checkpoint(workdir / "model.pt", args.preset).read_bytes()
    detector = Detector(checkpoint, model_name="bench", use_gpu=args.device == "cuda", precision=args.amp or "fp32",
                        threads=None if args.device == "cuda" else os.cpu_count())
    size = dict(min_size=args.image_size, max_size=round(args.image_size * 1333 / 800))
    specs = [{"unit": k, "uris": uris[i:i + args.batch_size], "image_ids": None}
             for k, i in enumerate(range(0, len(uris), args.batch_size))]
    batches: queue.Queue = queue.Queue(maxsize=8)
    pool = ThreadPoolExecutor(args.decode_threads)

    def feed():  # decode ahead, a bounded window of batches in flight
        window: deque = deque()
        for spec in specs:
            window.append(pool.submit(lambda s: preprocess_images_batch(read_uris(s, 0, len(s["uris"])), **size), spec))
            if len(window) >= 2 * args.decode_threads:
                batches.put(window.popleft().result())
        while window:
            batches.put(window.popleft().result())
        for _ in range(CALLS_PER_GPU):
            batches.put(None)

    threading.Thread(target=feed, daemon=True).start()
    smi = None
    if args.device == "cuda":
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "200"], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # warm-up: cuDNN picks its kernels
        detector(batches.get())
    if args.device == "cuda":
        torch.cuda.synchronize()
    start, counts = time.perf_counter(), []

    def consume():  # as the actor does with --use-gpu: two calls in flight, CPU work of one under GPU work of the other
        while (batch := batches.get()) is not None:
            detector(batch)
            counts.append(batch.num_rows)

    consumers = [threading.Thread(target=consume) for _ in range(CALLS_PER_GPU if args.device == "cuda" else 1)]
    for t in consumers:
        t.start()
    for t in consumers:
        t.join()
    wall = time.perf_counter() - start
    done_images = sum(counts)
    util = None
    if smi is not None:
        smi.terminate()
        samples = [float(v) for v in smi.communicate()[0].split() if v.replace(".", "").isdigit()]
        util = float(np.mean(samples[len(samples) // 5:])) if samples else None  # skip the warm-up fifth
    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"{platform.processor() or 'cpu'} x{os.cpu_count()}")
    return {"device": name, "preset": args.preset, "image_size": args.image_size, "amp": args.amp,
            "batch_size": args.batch_size, "images_per_s": done_images / wall, "gpu_util_pct": util,
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--memory-images", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--image-size", type=int, default=None, help="default: 128 on CPU, 800 with --device cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=["cpu-job", "cpu", "cuda"], default="cpu-job",
                   help="cpu-job: figures 1-2 (Ray); cpu/cuda: figure 3 on that device")
    p.add_argument("--preset", default=None, help="figure 3's model (default r50)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="figure 3 on cuda (default bf16)")
    p.add_argument("--decode-threads", type=int, default=14)
    p.add_argument("--output", help="the JSON to write (default: bench/results/infer-cpu.json, with --device "
                   "cpu/cuda bench/results/infer-<device>-device.json)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.image_size = args.image_size or (128 if args.device == "cpu-job" else 800)
    if args.memory_child:
        return memory_child(args.memory_child, Path(args.workdir), args)
    origin = provenance()
    output = Path(args.output or ROOT / "bench" / "results" / (
        "infer-cpu.json" if args.device == "cpu-job" else f"infer-{args.device}-device.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.device != "cpu-job":
        args.preset = args.preset or "r50"
        args.amp = args.amp or ("bf16" if args.device == "cuda" else None)
        fig = device_run(args)
        print(f"3. {fig['device']}: {fig['preset']} at {fig['image_size']} px, amp {fig['amp']}, batch "
              f"{fig['batch_size']}: {fig['images_per_s']:.1f} images/s [>= 200], GPU busy "
              f"{fig['gpu_util_pct'] if fig['gpu_util_pct'] is not None else '-'} % [>= 80]")
        output.write_text(json.dumps({"provenance": origin, **fig}, indent=1) + "\n")
        return None

    workdir = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    write_images(workdir / "images", args.num_images, 240, 320)
    checkpoint = write_checkpoint(workdir / "model.pt", "tiny", 3)
    load = os.getloadavg()[0]
    fig = efficiency(workdir, checkpoint, args)
    base_rate, base_cpu = np.median(fig["predict_rate"]), np.median(fig["predict_cpu_ms"])
    print(f"1. {args.num_images} JPEGs 320x240, tiny at {args.image_size} px, batch {args.batch_size}, "
          f"{os.cpu_count()} cores (load {load:.1f}):\n"
          f"   predict loop, decoded in memory  {base_rate:7.1f} images/s  {base_cpu:6.1f} CPU ms/image"
          f"  (median of passes at {' / '.join(f'{r:.1f}' for r in fig['predict_rate'])})\n"
          f"   jobs.infer end to end            {fig['job_end_to_end_rate']:7.1f} images/s  "
          f"{fig['job_cpu_ms']:6.1f} CPU ms/image\n"
          f"   jobs.infer steady (N - N/5)      {fig['job_steady_rate']:7.1f} images/s  "
          f"{fig['job_steady_cpu_ms']:6.1f} CPU ms/image\n"
          f"   efficiency, images/s: steady {fig['job_steady_rate'] / base_rate:.2f}, end to end "
          f"{fig['job_end_to_end_rate'] / base_rate:.2f}; CPU per image: steady "
          f"{base_cpu / fig['job_steady_cpu_ms']:.2f}, end to end {base_cpu / fig['job_cpu_ms']:.2f} [>= 0.85]")
    memory = memory_runs(workdir, args) if args.memory_images else {}
    lo, hi = (memory[min(memory)], memory[max(memory)]) if memory else (None, None)
    if memory:
        mib = lambda v: v / 2**20  # noqa: E731
        print(f"2. memory at {min(memory)} vs {max(memory)} images (tiny at 64 px):\n"
              f"   driver peak RSS         {mib(lo['driver_rss']):7.0f} vs {mib(hi['driver_rss']):7.0f} MiB  "
              f"ratio {hi['driver_rss'] / lo['driver_rss']:.2f} [<= 1.2]\n"
              f"   largest worker peak PSS {mib(lo['worker_pss']):7.0f} vs {mib(hi['worker_pss']):7.0f} MiB  "
              f"ratio {hi['worker_pss'] / lo['worker_pss']:.2f} [<= 1.2]\n"
              f"   whole tree peak PSS     {mib(lo['tree_pss']):7.0f} vs {mib(hi['tree_pss']):7.0f} MiB  "
              f"ratio {hi['tree_pss'] / lo['tree_pss']:.2f}")
    output.write_text(json.dumps({
        "provenance": origin,
        "device": f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}, load {load:.1f}",
        "num_images": args.num_images, "image_size": args.image_size, "efficiency": fig, "memory": memory},
        indent=1) + "\n")
    return None


if __name__ == "__main__":
    main()
