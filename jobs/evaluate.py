"""`python -m jobs.evaluate`: score sharded predictions (jobs.infer's Parquet) against COCO json.

    python -m jobs.evaluate --predictions URI --annotations URI [--output URI] [--max-dets 100]
        [--train-manifest URI]

Prints pycocotools' 12-line summary; with --output also writes report.json, per-category AP
(CSV and Markdown) and precision-recall curves at IoU 0.5 and 0.75. Every ground-truth image is
scored: an image without a prediction row, or whose row carries an `error`, counts as misses, and
both are counted in the report rather than dropped silently.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jobs.cli import run
from pipelines.evaluation import scoring as ev
from pipelines.evaluation import report
from pipelines.errors import UserError

_ERRORS_IN_REPORT = 1000  # error rows listed in report.json (all are counted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description="Score sharded predictions (jobs.infer's Parquet) against COCO "
        "ground truth with pycocotools' numbers.")
    parser.add_argument("--predictions", required=True, metavar="URI",
                        help="a Parquet file, or a folder/prefix of them (jobs.infer --output)")
    parser.add_argument("--annotations", required=True, metavar="URI", help="COCO instances json (ground truth)")
    parser.add_argument("--output", metavar="URI",
                        help="folder/prefix for report.json, per-category AP tables and PR curves")
    parser.add_argument("--max-dets", type=int, default=100, metavar="N",
                        help="keep the top N detections per image (default 100; the stats are COCO's 1/10/100)")
    parser.add_argument("--train-manifest", metavar="URI",
                        help="training set (jobs.prepare folder or manifest.json, or COCO json): adds AP for rare / "
                             "common / frequent categories (LVIS: 1-10, 11-100, >100 training images)")
    parser.add_argument("--engine", choices=ev.ENGINES, default=ev.ENGINES[0],
                        help="COCOeval implementation (same numbers; faster-coco-eval is faster)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_dets < 1:
        raise UserError(f"--max-dets {args.max_dets}: give a positive number of detections per image")
    start = time.perf_counter()
    ground_truth = ev.load_ground_truth(args.annotations)
    train_counts = None
    if args.train_manifest:
        train_counts = report.train_image_counts(args.train_manifest)
    predictions = ev.read_predictions(args.predictions)
    results = ev.to_coco_results(predictions, ground_truth, max_dets=args.max_dets)
    gt_images = np.array([img["id"] for img in ground_truth["images"]], dtype=np.int64)
    summary = {
        "predictions": args.predictions, "annotations": args.annotations, "engine": args.engine,
        "files": len(predictions.files), "models": predictions.models,
        "images": {"ground_truth": len(gt_images), "rows": predictions.num_rows,
                   "rows_with_error": len(predictions.errors),
                   "without_row": int(np.isin(gt_images, predictions.row_image_id, invert=True).sum())},
        "detections": {"read": len(predictions.scores), "evaluated": len(results), "max_dets": args.max_dets},
    }
    errors = predictions.errors
    del predictions  # COCOeval needs the memory more than we need the raw columns
    evaluation = ev.evaluate(ground_truth, results, engine=args.engine)
    summary["stats"] = evaluation.stats
    frequency = report.frequency_ap(evaluation, train_counts) if train_counts is not None else None
    _print_summary(summary, errors, frequency)
    if args.output:
        rows = report.per_category(evaluation, ground_truth, results, train_counts)
        full = dict(summary, frequency=frequency, per_category=rows,
                    errors=errors[:_ERRORS_IN_REPORT], seconds=round(time.perf_counter() - start, 3))
        uris = report.write_report(args.output, full, rows, evaluation)
        print(f"report: {', '.join(uris)}")
    return 0


def _print_summary(summary: dict, errors: list[dict], frequency: dict | None) -> None:
    images, dets = summary["images"], summary["detections"]
    print(f"{images['rows']} prediction rows in {summary['files']} file(s) for {images['ground_truth']} "
          f"ground-truth images; {dets['evaluated']} of {dets['read']} detections scored "
          f"(top {dets['max_dets']} per image)")
    if errors:
        first = errors[0]
        print(f"warning: {len(errors)} row(s) with error, scored as misses; e.g. image {first.get('image_id')} "
              f"({first.get('uri')}): {first['error']} [{first['file']}]")
    if images["without_row"]:
        print(f"warning: {images['without_row']} ground-truth image(s) have no prediction row, scored as misses")
    print("\n".join(report.summary_lines(summary["stats"])))
    if frequency is not None:
        parts = [f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in frequency.items() if k.startswith("AP_")]
        counts = ", ".join(f"{n} {name}" for name, n in frequency["categories"].items())
        print(f"by training frequency: {' '.join(parts)} ({counts} categories)")


if __name__ == "__main__":
    run(main)
