"""`python -m jobs.evaluate`: score sharded predictions (jobs.infer's Parquet, or a COCO results
json) against COCO or LVIS ground truth.

    python -m jobs.evaluate --predictions URI --annotations URI [--output URI] [--protocol auto|coco|lvis]
        [--max-dets N] [--train-manifest URI] [--progress SECONDS] [--workers N] [--executor auto|local|ray]

Prints pycocotools' 12-line summary (LVIS: lvis-api's 13 lines); with --output also writes
report.json, per-category AP (CSV and Markdown) and precision-recall curves at IoU 0.5 and 0.75.
Every ground-truth image is scored: an image without a prediction row, or whose row carries an
`error`, counts as misses, and both are counted in the report rather than dropped silently.
LVIS ground truth (categories with `frequency`, images with `neg_category_ids`) is scored by
LVIS's federated protocol unless --protocol coco says otherwise.

Scoring (pipelines.evaluation.sharded) runs in parallel over the prediction files, as numpy arrays,
in local processes or, on a Ray cluster, Ray tasks (map: 1 CPU, 1 GiB; reduce: 1 CPU, sized from
its matches). As a Ray job the driver needs 1 CPU and memory for the ground truth (~1 KiB per
annotation) plus 12 bytes per prediction row: `ray job submit --entrypoint-num-cpus 1
--entrypoint-memory ...`; it holds no detection.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jobs.cli import run
from pipelines.errors import UserError
from pipelines.evaluation import report, sharded
from pipelines.evaluation import scoring as ev
from pipelines.evaluation.progress import Progress

_ERRORS_IN_REPORT = 1000  # error rows listed in report.json (all are counted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description="Score sharded predictions (jobs.infer's Parquet, or a COCO "
        "results json) against COCO or LVIS ground truth with pycocotools' / lvis-api's numbers.")
    parser.add_argument("--predictions", required=True, metavar="URI",
                        help="a Parquet file, or a folder/prefix of them (jobs.infer --output), or a COCO results "
                             "json ([{image_id, category_id, bbox, score}, ...])")
    parser.add_argument("--annotations", required=True, metavar="URI",
                        help="COCO instances json or LVIS json (ground truth)")
    parser.add_argument("--protocol", choices=("auto", *ev.PROTOCOLS), default="auto",
                        help="coco, or lvis (federated: 300 detections, negative / not-exhaustive categories, "
                             "APr/APc/APf); auto (default) picks lvis for LVIS ground truth")
    parser.add_argument("--output", metavar="URI",
                        help="folder/prefix for report.json, per-category AP tables and PR curves")
    parser.add_argument("--max-dets", type=int, metavar="N",
                        help="keep the top N detections per image (default: COCO 100, its stats at 1/10/100; "
                             "LVIS 300)")
    parser.add_argument("--train-manifest", metavar="URI",
                        help="training set (jobs.prepare folder or manifest.json, or COCO json): adds AP for rare / "
                             "common / frequent categories (LVIS: 1-10, 11-100, >100 training images)")
    parser.add_argument("--engine", choices=("sharded", *ev.ENGINES), default="sharded",
                        help="sharded (default): files scored in parallel as numpy arrays, merged into pycocotools' / "
                             "lvis-api's exact numbers, memory bounded per task; faster-coco-eval or pycocotools: "
                             "the COCO API in this process, one Python dict per detection (to cross-check)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="parallel scoring tasks for --engine sharded (default: this machine's cores)")
    parser.add_argument("--executor", choices=sharded.EXECUTORS, default="auto",
                        help="where sharded tasks run: local processes, or Ray tasks (auto: Ray when RAY_ADDRESS "
                             "names a cluster, as under `ray job submit`)")
    parser.add_argument("--progress", type=float, default=10.0, metavar="SECONDS",
                        help="print progress (files read, images scored) to stderr at most every SECONDS "
                             "(default 10; 0: every step)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_dets is not None and args.max_dets < 1:
        raise UserError(f"--max-dets {args.max_dets}: give a positive number of detections per image")
    if args.progress < 0:
        raise UserError(f"--progress {args.progress}: give seconds >= 0")
    start = time.perf_counter()
    progress = Progress(every_s=args.progress)
    ground_truth = ev.load_ground_truth(args.annotations)
    protocol = ev.detect_protocol(ground_truth) if args.protocol == "auto" else args.protocol
    max_dets = args.max_dets or ev.DEFAULT_MAX_DETS[protocol]
    train_counts = None
    if args.train_manifest:
        train_counts = report.train_image_counts(args.train_manifest)
    if protocol == "lvis":
        ev.check_lvis(ground_truth, args.engine)
    if args.engine == "sharded":
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers {args.workers}: give a positive number of tasks")
        scored = sharded.score(args.predictions, ground_truth, protocol, max_dets, args.workers, args.executor,
                               progress)
    else:
        scored = _score_with_coco_api(args, ground_truth, protocol, max_dets, progress)
    evaluation = scored.evaluation
    gt_images = np.array([img["id"] for img in ground_truth["images"]], dtype=np.int64)
    without_row = int(np.isin(gt_images, scored.row_image_id, invert=True).sum())
    summary = {
        "predictions": args.predictions, "annotations": args.annotations, "protocol": protocol,
        "engine": args.engine, "input": scored.kind, "files": len(scored.files), "models": scored.models,
        "images": {"ground_truth": len(gt_images), "rows": len(scored.row_image_id),
                   "rows_with_error": len(scored.errors),
                   "without_row" if scored.kind == "parquet" else "without_detections": without_row},
        "detections": {"read": scored.detections_read, "evaluated": sum(scored.detections_per_category.values()),
                       "max_dets": max_dets},
    }
    errors = scored.errors
    summary["stats"] = evaluation.stats
    frequency = None
    if train_counts is not None:
        frequency = dict(report.frequency_ap(evaluation, train_counts), source="training images")
    elif protocol == "lvis":
        frequency = dict(report.group_ap(evaluation, report.lvis_frequencies(ground_truth)), source="LVIS frequency")
    _print_summary(summary, errors, frequency)
    if args.output:
        rows = report.per_category(evaluation, ground_truth, scored.detections_per_category, train_counts)
        full = dict(summary, frequency=frequency, per_category=rows,
                    errors=errors[:_ERRORS_IN_REPORT], seconds=round(time.perf_counter() - start, 3))
        uris = report.write_report(args.output, full, rows, evaluation)
        print(f"report: {', '.join(uris)}")
    return 0


def _score_with_coco_api(args, ground_truth: dict, protocol: str, max_dets: int, progress: Progress) -> sharded.Outcome:
    """The single-process path: the COCO API's dicts in this process (faster-coco-eval or pycocotools)."""
    predictions = ev.read_predictions(args.predictions, progress)
    results = ev.to_coco_results(predictions, ground_truth, max_dets=max_dets)
    outcome = sharded.Outcome(
        evaluation=None, kind=predictions.kind, files=predictions.files, row_image_id=predictions.row_image_id,
        errors=predictions.errors, models=predictions.models, detections_read=len(predictions.scores),
        detections_per_category=dict(zip(*(a.tolist() for a in np.unique(results[:, 6].astype(np.int64),
                                                                          return_counts=True)))))
    del predictions  # COCOeval needs the memory more than we need the raw columns
    progress.update("scoring", 0, len(ground_truth["images"]), "images", f"{len(results)} detections")
    outcome.evaluation = ev.evaluate(ground_truth, results, engine=args.engine, protocol=protocol, max_dets=max_dets)
    progress.update("scoring", len(ground_truth["images"]), len(ground_truth["images"]), "images")
    return outcome


def _print_summary(summary: dict, errors: list[dict], frequency: dict | None) -> None:
    images, dets = summary["images"], summary["detections"]
    print(f"{images['rows']} prediction rows in {summary['files']} file(s) for {images['ground_truth']} "
          f"ground-truth images; {dets['evaluated']} of {dets['read']} detections scored "
          f"(top {dets['max_dets']} per image)")
    if errors:
        first = errors[0]
        print(f"warning: {len(errors)} row(s) with error, scored as misses; e.g. image {first.get('image_id')} "
              f"({first.get('uri')}): {first['error']} [{first['file']}]")
    if images.get("without_row"):
        print(f"warning: {images['without_row']} ground-truth image(s) have no prediction row, scored as misses")
    if summary["protocol"] == "lvis":
        print("\n".join(report.lvis_summary_lines(summary["stats"], dets["max_dets"])))
    else:
        print("\n".join(report.summary_lines(summary["stats"])))
    if frequency is not None:
        parts = [f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in frequency.items() if k.startswith("AP_")]
        counts = ", ".join(f"{n} {name}" for name, n in frequency["categories"].items())
        source = "training frequency" if frequency["source"] == "training images" else frequency["source"]
        print(f"by {source}: {' '.join(parts)} ({counts} categories)")


if __name__ == "__main__":
    run(main)
