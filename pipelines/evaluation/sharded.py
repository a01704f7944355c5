"""Scoring prediction shards in parallel, merged into pycocotools' / lvis-api's exact numbers.

Map: each task reads a few prediction files column-wise, checks them against the ground truth,
keeps the top `max_dets` per image and matches them (`matching.match`): what it returns is a few
small numpy arrays per detection, split by category bucket. Reduce: one task per bucket merges its
categories' matches from every map task and runs the accumulation (`accumulate.accumulate`), whose
ordering (score, then image, then rank) is the one pycocotools' stable sort produces on a single
results json. The driver sees only the per-row image ids (to reject an image predicted twice
across files), small counts, and the per-category curves.

Executors: local processes (`concurrent.futures`, spawn) on one machine, map outputs spilled to a
temporary folder for the reduce tasks; Ray tasks when the job runs on a Ray cluster (RAY_ADDRESS
set, as under `ray job submit`) or when asked, with the ground truth columns put in the object
store once and map outputs left there for the reduce tasks. Either way the driver holds no
detection. Inputs smaller than one task are scored in the driver's process.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from pipelines import storage
from pipelines.errors import UserError
from pipelines.evaluation import inputs
from pipelines.evaluation.accumulate import accumulate, merge
from pipelines.evaluation.matching import GroundTruthColumns, Matches, ground_truth_columns, match
from pipelines.evaluation.progress import Progress
from pipelines.evaluation.scoring import canonical_order, check_rows, check_unique_rows

EXECUTORS = ("auto", "local", "ray")
TASK_BYTES = 16 * 1024 ** 2  # Parquet per map task: ~5 files of jobs.infer (1k images x 100 detections each)
MAX_FILES_PER_TASK = 16  # with TASK_BYTES: ~1.6M detections at most, a map task stays well under its 2 GiB
MAP_TASK_MEMORY = 1024 ** 3  # declared to Ray: bounded by TASK_BYTES and MAX_FILES_PER_TASK
REDUCE_BASE_MEMORY, REDUCE_BYTES_PER_MATCH = 256 * 1024 ** 2, 200  # a bucket's arrays (~24 B each), sort, curves


@dataclass
class ShardScore:
    """What one map task returns: per-bucket matches plus what the report counts."""

    buckets: list[Matches]
    files: list[int]  # global indexes of the files read
    row_image_id: np.ndarray  # int64, one per Parquet row
    row_file: np.ndarray  # int32 global file index per row
    detections_read: int
    detections_per_category: np.ndarray  # int64 (K,), after the top-k per image
    bucket_sizes: list[int] = field(default_factory=list)  # matches per bucket (all area ranges)
    errors: list[dict] = field(default_factory=list)
    models: set = field(default_factory=set)


def score_files(gt: GroundTruthColumns, files: list[str], file_index: list[int], max_dets: int,
                num_buckets: int) -> ShardScore:
    """Map task: read `files` column-wise, then `score_predictions`."""
    parts = [inputs._read_file(f) for f in files]
    columns = inputs._concat(parts)
    rows_per_file = [len(p["image_id"]) for p in parts]
    predictions = inputs.Predictions(
        files=files, row_image_id=columns["image_id"],
        row_file=np.repeat(np.arange(len(files), dtype=np.int32), rows_per_file), det_row=columns["det_row"],
        boxes=columns["boxes"], scores=columns["scores"], category_ids=columns["category_ids"],
        errors=columns["errors"], models=sorted(columns["models"]))
    return score_predictions(gt, predictions, np.asarray(file_index, np.int32), max_dets, num_buckets)


def score_predictions(gt: GroundTruthColumns, predictions: inputs.Predictions, file_index: np.ndarray,
                      max_dets: int, num_buckets: int) -> ShardScore:
    """Check against the ground truth, keep the top `max_dets` per image, match, split by bucket."""
    check_rows(predictions, gt.image_ids, gt.category_ids)
    image_id, order = canonical_order(predictions, max_dets)
    image = np.searchsorted(gt.image_ids, image_id)
    category = np.searchsorted(gt.category_ids, predictions.category_ids[order])
    per_pair = max_dets if gt.protocol == "lvis" else 100  # COCOeval matches each (image, category)'s top 100
    matches = match(gt, image, category, predictions.boxes[order], predictions.scores[order], per_pair)
    buckets = split_buckets(matches, num_buckets)
    return ShardScore(buckets=buckets, bucket_sizes=[sum(len(c) for c in b.category) for b in buckets],
                      files=file_index.tolist(),
                      row_image_id=predictions.row_image_id, row_file=file_index[predictions.row_file],
                      detections_read=len(predictions.scores),
                      detections_per_category=np.bincount(category, minlength=gt.num_categories),
                      errors=predictions.errors, models=set(predictions.models))


def split_buckets(matches: Matches, num_buckets: int) -> list[Matches]:
    """Category index k goes to bucket k % num_buckets (buckets of interleaved categories balance
    a long tail better than ranges)."""
    out = []
    for b in range(num_buckets):
        keep = [c % num_buckets == b for c in matches.category]
        out.append(Matches(*([getattr(matches, f)[a][keep[a]] for a in range(len(keep))]
                             for f in ("category", "image", "rank", "score", "matched", "ignored"))))
    return out


def reduce_bucket(parts: list[Matches], positives: np.ndarray, max_dets: list[int], bucket: int,
                  num_buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce task: (category indexes, precision[:, :, those], recall[:, those]) of one bucket."""
    categories = np.arange(bucket, len(positives), num_buckets)
    only = np.zeros_like(positives)
    only[categories] = positives[categories]
    precision, recall = accumulate(merge(parts), only, max_dets)
    return categories, precision[:, :, categories], recall[:, categories]


def plan_tasks(sizes: list[int], task_bytes: int = TASK_BYTES) -> list[list[int]]:
    """Contiguous groups of file indexes of about `task_bytes` (at most MAX_FILES_PER_TASK files)."""
    tasks, current, total = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        total += size
        if total >= task_bytes or len(current) >= MAX_FILES_PER_TASK:
            tasks.append(current)
            current, total = [], 0
    return tasks + ([current] if current else [])


def file_sizes(files: list[str]) -> list[int]:
    """Sizes in bytes (served from the listing's cache on object stores)."""
    locations = [storage.resolve(f) for f in files]
    try:
        return [int(loc.fs.size(loc.path) or 0) for loc in locations]
    except OSError as exc:
        raise storage.describe_error(files[0], exc) from None


def choose_executor(executor: str) -> str:
    if executor == "auto":
        return "ray" if os.environ.get("RAY_ADDRESS") else "local"
    return executor


def run(gt: GroundTruthColumns, files: list[str], max_dets: int, coco_max_dets: list[int], workers: int | None,
        executor: str = "auto", progress: Progress | None = None,
        task_bytes: int = TASK_BYTES) -> tuple[np.ndarray, np.ndarray, list[ShardScore]]:
    """Score every file; precision [T, R, K, A, M], recall [T, K, A, M] and the map tasks' summaries
    (their `buckets` emptied once reduced). Inputs smaller than one task are scored in this process.
    `workers` (default: this machine's cores; on Ray the cluster's CPUs) sets the reduce buckets."""
    progress = progress or Progress(every_s=None)
    tasks = plan_tasks(file_sizes(files), task_bytes)
    chosen = choose_executor(executor)
    if not workers:
        workers = _cluster_cpus() if chosen == "ray" else os.cpu_count() or 1
    buckets = max(1, min(gt.num_categories, 2 * workers))
    positives = gt.positives()
    if chosen == "local" and (workers == 1 or len(tasks) == 1):
        chosen = "in-process"  # nothing to overlap: no worker processes to start
    runner = {"ray": _run_ray, "local": _run_local, "in-process": _run_in_process}[chosen]
    return runner(gt, files, tasks, max_dets, coco_max_dets, workers, buckets, positives, progress)


def _cluster_cpus() -> int:
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _assemble(gt: GroundTruthColumns, coco_max_dets: list[int], reduced) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.evaluation.accumulate import RECALL_THRESHOLDS
    from pipelines.evaluation.matching import AREA_RANGES, IOU_THRESHOLDS

    t, r, k, a, m = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), gt.num_categories, len(AREA_RANGES), \
        len(coco_max_dets)
    precision, recall = -np.ones((t, r, k, a, m)), -np.ones((t, k, a, m))
    for categories, p, rc in reduced:
        precision[:, :, categories], recall[:, categories] = p, rc
    return precision, recall


def _run_local(gt, files, tasks, max_dets, coco_max_dets, workers, buckets, positives, progress):
    """Worker processes; map outputs go to a temporary folder (one .npz per task and bucket), so this
    process holds no detection, like the driver on Ray."""
    summaries = []
    with tempfile.TemporaryDirectory(prefix="evaluate-") as spill, ProcessPoolExecutor(
            max_workers=max(1, min(workers, len(tasks))), mp_context=get_context("spawn"),
            initializer=_keep_ground_truth, initargs=(gt,)) as pool:  # the ground truth is sent once per process
        futures = [pool.submit(_score_files_here, [files[i] for i in task], task, max_dets, buckets, spill)
                   for task in tasks]
        for future in as_completed(futures):
            summaries.append(future.result())
            _report(progress, summaries, len(files))
        reduced = [pool.submit(_reduce_spilled, [_spill_path(spill, s.files[0], b) for s in summaries], positives,
                               coco_max_dets, b, buckets) for b in range(buckets)]
        reduced = [f.result() for f in reduced]
    return (*_assemble(gt, coco_max_dets, reduced), summaries)


_WORKER_GROUND_TRUTH: GroundTruthColumns | None = None
_FIELDS = ("category", "image", "rank", "score", "matched", "ignored")


def _keep_ground_truth(gt: GroundTruthColumns) -> None:
    global _WORKER_GROUND_TRUTH
    _WORKER_GROUND_TRUTH = gt


def _spill_path(folder: str, first_file: int, bucket: int) -> str:
    return os.path.join(folder, f"task-{first_file:08d}-bucket-{bucket:05d}.npz")


def _score_files_here(files: list[str], task: list[int], max_dets: int, buckets: int, spill: str) -> ShardScore:
    """Map in a worker process: the matches of each bucket saved to `spill`, the summary returned."""
    score = score_files(_WORKER_GROUND_TRUTH, files, task, max_dets, buckets)
    for b, part in enumerate(score.buckets):
        np.savez(_spill_path(spill, task[0], b), **{f"{f}{a}": getattr(part, f)[a] for f in _FIELDS
                                                  for a in range(len(part.category))})
    score.buckets = []
    return score


def _reduce_spilled(paths: list[str], positives, coco_max_dets, bucket, buckets):
    parts = []
    for path in paths:
        with np.load(path) as data:
            areas = sum(1 for name in data.files if name.startswith("category"))
            parts.append(Matches(*([data[f"{f}{a}"] for a in range(areas)] for f in _FIELDS)))
    return reduce_bucket(parts, positives, coco_max_dets, bucket, buckets)


def _run_in_process(gt, files, tasks, max_dets, coco_max_dets, workers, buckets, positives, progress):
    summaries = []
    for task in tasks:
        summaries.append(score_files(gt, [files[i] for i in task], task, max_dets, buckets))
        _report(progress, summaries, len(files))
    reduced = [reduce_bucket([s.buckets[b] for s in summaries], positives, coco_max_dets, b, buckets)
               for b in range(buckets)]
    for s in summaries:
        s.buckets = []
    return (*_assemble(gt, coco_max_dets, reduced), summaries)


def _run_ray(gt, files, tasks, max_dets, coco_max_dets, workers, buckets, positives, progress):
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    gt_ref = ray.put(gt)
    map_task = ray.remote(num_cpus=1, memory=MAP_TASK_MEMORY, num_returns=buckets + 1)(_ray_map)
    reduce_task = ray.remote(num_cpus=1)(_ray_reduce)
    refs = [map_task.remote(gt_ref, [files[i] for i in task], task, max_dets, buckets) for task in tasks]
    summaries, pending = [], {r[0]: r for r in refs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        summaries.append(ray.get(done[0]))
        pending.pop(done[0])
        _report(progress, summaries, len(files))
    reduced = ray.get([reduce_task.options(memory=_reduce_memory(summaries, b)).remote(
        positives, coco_max_dets, b, buckets, *[r[b + 1] for r in refs]) for b in range(buckets)])
    return (*_assemble(gt, coco_max_dets, reduced), summaries)


def _reduce_memory(summaries: list[ShardScore], bucket: int) -> int:
    """Memory declared for one reduce task, from the sizes its map tasks reported."""
    return REDUCE_BASE_MEMORY + REDUCE_BYTES_PER_MATCH * sum(s.bucket_sizes[bucket] for s in summaries)


def _ray_map(gt, files, task, max_dets, buckets):
    """Map as a Ray task: the summary first (small, for the driver), then one object per bucket."""
    score = score_files(gt, files, task, max_dets, buckets)
    parts, score.buckets = score.buckets, []
    return (score, *parts)


def _ray_reduce(positives, coco_max_dets, bucket, buckets, *parts):
    return reduce_bucket(list(parts), positives, coco_max_dets, bucket, buckets)


def _report(progress: Progress, summaries: list[ShardScore], num_files: int) -> None:
    images = sum(len(s.row_image_id) for s in summaries)
    detections = sum(s.detections_read for s in summaries)
    files = sum(len(s.files) for s in summaries)
    progress.update("scored", files, num_files, "files", f"{images} images, {detections} detections")


def check_no_duplicates(summaries: list[ShardScore], files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every image predicted once across all files (a stale or doubled file is a user error)."""
    row_image_id = np.concatenate([s.row_image_id for s in summaries]) if summaries else np.zeros(0, np.int64)
    row_file = np.concatenate([s.row_file for s in summaries]) if summaries else np.zeros(0, np.int32)
    check_unique_rows(row_image_id, row_file, files)
    return row_image_id, row_file


def list_prediction_files(uri: str) -> list[str]:
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise UserError(f"{uri}: no .parquet files found; give the --output of jobs.infer or a COCO results json")
    return files


@dataclass
class Outcome:
    """An evaluation plus what the report counts about its input."""

    evaluation: object  # scoring.Evaluation
    kind: str  # "parquet" or "json"
    files: list[str]
    row_image_id: np.ndarray
    errors: list[dict]
    models: list[str]
    detections_read: int
    detections_per_category: dict[int, int]


def score(uri: str, ground_truth: dict, protocol: str, max_dets: int, workers: int | None = None,
          executor: str = "auto", progress: Progress | None = None, task_bytes: int = TASK_BYTES) -> Outcome:
    """Score the predictions at `uri` (Parquet shards, or a COCO results json) exactly, in parallel."""
    from pipelines.evaluation.scoring import curves_to_evaluation

    gt = ground_truth_columns(ground_truth, protocol)
    coco_max_dets = [1, 10, 100] if protocol == "coco" else [max_dets]
    if uri.rstrip("/").endswith(".json"):  # one list in memory by nature: scored in this process
        predictions = inputs.read_results_json(uri)
        files, kind = predictions.files, "json"
        summaries = [score_predictions(gt, predictions, np.zeros(1, np.int32), max_dets, 1)]
        precision, recall = _assemble(gt, coco_max_dets, [
            reduce_bucket([summaries[0].buckets[0]], gt.positives(), coco_max_dets, 0, 1)])
    else:
        files, kind = list_prediction_files(uri), "parquet"
        precision, recall, summaries = run(gt, files, max_dets, coco_max_dets, workers, executor, progress,
                                           task_bytes)
    summaries.sort(key=lambda s: s.files[0] if s.files else 0)  # reports do not depend on completion order
    row_image_id, _ = check_no_duplicates(summaries, files)
    per_category = np.sum([s.detections_per_category for s in summaries], axis=0)
    return Outcome(
        evaluation=curves_to_evaluation(precision, recall, ground_truth, gt.category_ids, protocol, coco_max_dets),
        kind=kind, files=files, row_image_id=row_image_id, errors=[e for s in summaries for e in s.errors],
        models=sorted(set().union(*(s.models for s in summaries))),
        detections_read=sum(s.detections_read for s in summaries),
        detections_per_category=dict(zip(gt.category_ids.tolist(), per_category.tolist())))
