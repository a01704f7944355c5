"""jobs.infer at ten million images, the parts that do not need GPUs: planning and output writing.

    .venv/bin/python bench/infer_scale.py [--list-sizes 1000000 10000000] [--listing-keys 1000000]
        [--writers 1 2 4] [--parts 400] [--output bench/results/infer-scale.json]

Figures (targets in brackets), saved to --output with the load average and the run's
provenance (the machine is shared: figures move with other load):
1. planning, each in a fresh process: an input list (Parquet, N URIs) and a listing of a local
   folder of K empty files, streamed into the plan (`plan.claim_plan`): wall time and the
   driver's peak RSS [RSS at 10M within 1.2x of 1M].
2. output: the worker-side write of a unit's part (256 prediction rows with 20 detections each:
   build the rows, encode Parquet, atomic write under its name) from 1, 2 and 4 Ray actors at
   once, to local disk, median of 3 interleaved rounds: parts/s [grows with writers, >= 1.7x at 4
   vs 1 where the cores allow].
   No row goes through the driver; it only counts records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from provenance import provenance  # noqa: E402 - bench/provenance.py, after the path set-up


def write_input_list(path: Path, count: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("uri", pa.string())])) as writer:
        for start in range(0, count, 1_000_000):
            ids = np.arange(start, min(start + 1_000_000, count))
            uris = np.char.add("s3://photos/2026/", np.char.add(ids.astype("U9"), ".jpg"))
            writer.write_table(pa.table({"uri": pa.array(uris.tolist(), pa.string())}))


def write_listing(folder: Path, count: int) -> None:
    for start in range(0, count, 1000):
        sub = folder / f"{start // 1000:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + 1000, count)):
            os.close(os.open(sub / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over fork and exec,
    so a child would report its parent's peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def plan_child(kind: str, source: str, output: str) -> None:
    """Plan `source` into `output` (fresh process) and print wall time and peak RSS as JSON."""
    from pipelines.inference import plan as plans

    rss_before = peak_rss()
    start = time.perf_counter()
    kind_found, units = plans.input_units(None if kind == "list" else source, source if kind == "list" else None, 256)
    plan, made = plans.claim_plan(output, {"kind": kind_found}, units, source=source)
    print(json.dumps({"kind": kind, "images": plan.num_images, "units": plan.num_units, "made": made,
                      "seconds": time.perf_counter() - start, "rss_before_plan": rss_before,
                      "peak_rss": peak_rss()}))


def plan_run(kind: str, source: Path, output: Path) -> dict:
    cmd = [sys.executable, __file__, "--plan-child", kind, str(source), str(output)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"planning {source} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def synthetic_part_rows(unit: int, rows: int = 256, per_image: int = 20):
    import pyarrow as pa

    from pipelines.inference import predictions

    rng = np.random.default_rng(unit)
    n = rows * per_image
    boxes = np.sort(rng.uniform(0, 640, (n, 4)), axis=1)
    dets = predictions.detections_array(np.full(rows, per_image), np.ones(rows, bool), boxes,
                                        rng.uniform(0.05, 1, n).astype(np.float32), rng.integers(0, 80, n),
                                        [{"id": i + 1, "name": f"class-{i}"} for i in range(80)])
    return pa.table({"image_id": pa.nulls(rows, pa.int64()),
                     "uri": [f"s3://photos/{unit}/{i}.jpg" for i in range(rows)],
                     "width": pa.array(np.full(rows, 640, np.int32)), "height": pa.array(np.full(rows, 480, np.int32)),
                     "detections": dets, "error": pa.nulls(rows, pa.string()), "model": ["bench"] * rows})


def write_parts(units: list[int], output: str) -> int:
    """One writer's work: build, encode and atomically write each unit's part (as a UnitDetector does)."""
    from pipelines import storage
    from pipelines.inference import predictions

    for unit in units:
        table = synthetic_part_rows(unit)
        storage.write_bytes_atomic(f"{output}/{predictions.part_name(unit)}", predictions.to_parquet_bytes(table))
    return len(units)


def warm_worker(seconds: float) -> int:
    from pipelines.inference import predictions  # noqa: F401 - imports paid before the timing

    time.sleep(seconds)
    return os.getpid()


def writers_run(workdir: Path, writers: list[int], parts: int, rounds: int = 3) -> tuple[dict, dict]:
    import ray

    ray.init(num_cpus=max(writers), include_dashboard=False, configure_logging=False)
    task = ray.remote(num_cpus=1)(write_parts)
    warm = ray.remote(num_cpus=1)(warm_worker)
    rates: dict[int, list[float]] = {n: [] for n in writers}
    try:
        ray.get([warm.remote(3.0) for _ in range(max(writers))])  # every worker started and imported
        for round_ in range(rounds):  # interleaved rounds: other load on the machine drifts
            for n in writers:
                output, start = str(workdir / f"parts-{n}-{round_}"), time.perf_counter()
                shares = [list(range(k, parts, n)) for k in range(n)]
                assert sum(ray.get([task.remote(s, output) for s in shares])) == parts
                rates[n].append(parts / (time.perf_counter() - start))
    finally:
        ray.shutdown()
    return {n: float(np.median(r)) for n, r in rates.items()}, rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    p.add_argument("--listing-keys", type=int, default=1_000_000)
    p.add_argument("--writers", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--parts", type=int, default=400)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "infer-scale.json"))
    p.add_argument("--plan-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plan_child:
        return plan_child(*args.plan_child)
    workdir = Path(tempfile.mkdtemp(prefix="bench-infer-scale-"))
    load_before, results = os.getloadavg(), {"provenance": provenance(), "cores": os.cpu_count()}
    mib = lambda v: v / 2**20  # noqa: E731
    for count in args.list_sizes:
        write_input_list(workdir / f"list-{count}.parquet", count)
        fig = plan_run("list", workdir / f"list-{count}.parquet", workdir / f"out-list-{count}")
        results[f"plan_list_{count}"] = fig
        print(f"1. input list of {count} URIs: {fig['seconds']:.1f} s, driver peak RSS {mib(fig['peak_rss']):.0f} MiB "
              f"({fig['units']} units)", flush=True)
    if len(args.list_sizes) >= 2:
        lo, hi = (results[f"plan_list_{n}"]["peak_rss"] for n in (min(args.list_sizes), max(args.list_sizes)))
        results["plan_rss_ratio"] = hi / lo
        print(f"   peak RSS ratio {max(args.list_sizes)} vs {min(args.list_sizes)}: {hi / lo:.2f} [<= 1.2]")
    if args.listing_keys:
        write_listing(workdir / "listing", args.listing_keys)
        fig = plan_run("images", workdir / "listing", workdir / "out-listing")
        results[f"plan_listing_{args.listing_keys}"] = fig
        print(f"1. listing of {args.listing_keys} local files: {fig['seconds']:.1f} s, driver peak RSS "
              f"{mib(fig['peak_rss']):.0f} MiB", flush=True)
    if args.writers:
        rates, every = writers_run(workdir, args.writers, args.parts)
        results["parts_per_s"], results["parts_per_s_rounds"] = rates, every
        base = rates[min(rates)]
        print("2. parts/s, median of 3 interleaved rounds (256 rows, 20 detections each, local disk): " +
              ", ".join(f"{n} writer(s) {r:.1f} ({r / base:.2f}x)" for n, r in rates.items()))
    results["load_average_before_after"] = [load_before, os.getloadavg()]
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    subprocess.run(["rm", "-rf", str(workdir)])
    return None


if __name__ == "__main__":
    main()
