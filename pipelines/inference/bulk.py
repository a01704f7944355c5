"""Batch inference on Ray Data, exactly once, with no per-image data through the driver.

The driver reads the plan's counts and which parts exist (`plan.finished_units`), then runs a
streaming dataset over the plan's row groups: tasks read the units of a group, skip finished
ones and hand each unit alone to a pool of `UnitDetector` actors (model loaded once, a GPU each
with --use-gpu), which read, decode, detect and write the unit's part themselves
(`pipelines.inference.units`). What reaches the driver is one small record per unit, which it
counts for progress and the exit status. The pool is a range (`min_actors`..`max_actors`, None =
unbounded), so an autoscaling cluster that starts small grows under the job; decode threads
live in the actors and grow with them.

Ray Data's streaming executor bounds what is in flight, so memory on the driver and on the
workers does not grow with the number of images.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from pipelines.inference import plan as plans
from pipelines.inference.units import RECORD_SCHEMA, UnitDetector

# Detector calls in flight per GPU actor: while one waits on the GPU, the next one's CPU work
# (canvas fill, host-to-device copy, building rows) runs, instead of leaving the GPU idle.
CALLS_PER_GPU = 2
PROGRESS_SECONDS = 30.0
# Read+decode threads of a GPU actor: a GPU detecting ~200 images/s at 800 px needs ~8 cores of
# JPEG decode+resize (bench/infer.py --device cuda fed it with 14).
GPU_DECODE_THREADS = 8


@dataclass
class InferenceOptions:
    """How to run the detector; the model-facing values also go into the plan record."""

    batch_size: int = 16
    min_actors: int = 1
    max_actors: int | None = 1  # None: as many as the cluster gives
    use_gpu: bool = False
    cpus_per_actor: int = 1
    decode_threads: int | None = None  # per actor; None: cpus_per_actor, or GPU_DECODE_THREADS with a GPU
    score_thresh: float | None = None
    max_detections: int | None = None
    min_size: int = 800
    max_size: int = 1333
    max_pixels: int = DEFAULT_MAX_PIXELS
    runtime: str = "torch"  # torch | onnxruntime | openvino (pipelines.inference.runtimes)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU)
    debug_sleep: float = 0.0  # per unit; lets tests kill a run mid-way
    progress_seconds: float = PROGRESS_SECONDS

    def results_key(self) -> dict:
        """The options that change the rows (a rerun must match them to resume)."""
        return {k: v for k, v in asdict(self).items()
                if k in ("score_thresh", "max_detections", "min_size", "max_size", "runtime", "precision",
                         "max_pixels")}


@dataclass
class RunStats:
    images: int
    errors: int
    parts: int
    failed: int  # units not written (storage faults): a rerun completes them
    seconds: float  # pipeline start to the last record
    first_row_seconds: float | None  # pipeline start to the first finished unit (actor start-up, warm-up)
    first_failure: str | None = None
    exit_code: int = 0  # what jobs.infer exits with (1: failed units or too many error rows)


def _pending_units(batch: pa.Table, units_uri: str, done: np.ndarray) -> pa.Table:
    """Task: plan row groups -> their units that have no part yet."""
    units = plans.read_units(units_uri, batch["id"].to_pylist())
    return units.filter(pa.array(~done[units["unit"].to_numpy()]))


class Progress:
    """A line every `every` seconds: units done/total, images/s, ETA."""

    def __init__(self, total: int, every: float):
        self.total, self.every, self.start = total, every, time.monotonic()
        self.units = self.images = 0
        self.last = self.start

    def add(self, images: int) -> None:
        self.units += 1
        self.images += images
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        left = (self.total - self.units) * elapsed / self.units if self.units else float("nan")
        eta = f"{int(left // 60)}m{int(left % 60):02d}s" if left == left else "?"
        return (f"progress: {self.units}/{self.total} units, {self.images} images, "
                f"{self.images / elapsed:.1f} images/s, ETA {eta}")


def run_inference(plan: plans.Plan, done: np.ndarray, output: str, checkpoint, model_name: str,
                  options: InferenceOptions) -> RunStats:
    """Run every unit of `plan` without a part through the actor pool; the actors write the parts."""
    import ray

    start = time.perf_counter()
    first, images, errors, parts, failed, first_failure = None, 0, 0, 0, 0, None
    pending = int((~done).sum())
    if pending:
        o = options
        ref = checkpoint if isinstance(checkpoint, ray.ObjectRef) else ray.put(checkpoint)
        calls = CALLS_PER_GPU if o.use_gpu else 1  # on CPU torch's threads already use every core
        pool = ray.data.ActorPoolStrategy(min_size=o.min_actors, max_size=o.max_actors,
                                          max_concurrent_calls_per_actor=calls,
                                          enable_true_multi_threading=calls > 1)
        groups = plans.units_row_groups(plan.units_uri)
        ds = ray.data.range(groups, override_num_blocks=groups).map_batches(
            _pending_units, batch_format="pyarrow", batch_size=1, fn_kwargs={"units_uri": plan.units_uri, "done": done})
        ds = ds.repartition(target_num_rows_per_block=1)  # one unit per actor call
        ds = ds.map_batches(
            UnitDetector, batch_size=1, batch_format="pyarrow", compute=pool,
            num_gpus=1 if o.use_gpu else 0, num_cpus=o.cpus_per_actor,
            fn_constructor_kwargs={
                "checkpoint": ref, "output": output, "chunk": o.batch_size,
                "threads": o.decode_threads or (GPU_DECODE_THREADS if o.use_gpu else o.cpus_per_actor),
                "decode": {"min_size": o.min_size, "max_size": o.max_size, "max_pixels": o.max_pixels},
                "detector": {"model_name": model_name, "score_thresh": o.score_thresh,
                             "max_detections": o.max_detections, "use_gpu": o.use_gpu, "runtime": o.runtime,
                             "precision": o.precision, "threads": o.cpus_per_actor},
                "debug_sleep": o.debug_sleep})
        progress, seen = Progress(pending, o.progress_seconds), set()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for record in batch.cast(RECORD_SCHEMA).to_pylist():
                if record["unit"] in seen:
                    continue  # a retried call reported twice
                seen.add(record["unit"])
                first = first if first is not None else time.perf_counter() - start
                if record["failure"] is not None:
                    failed += 1
                    first_failure = first_failure or f"unit {record['unit']}: {record['failure']}"
                else:
                    images, errors, parts = images + record["images"], errors + record["errors"], parts + 1
                progress.add(record["images"])
    return RunStats(images, errors, parts, failed, time.perf_counter() - start, first, first_failure)
