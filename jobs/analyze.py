"""`python -m jobs.analyze`: what went wrong, after jobs.evaluate said how much.

    python -m jobs.analyze --predictions URI --annotations URI --output DIR [--iou 0.5] [--score 0.3]
        [--images URI --best-worst N]

Reads the same predictions as jobs.evaluate (jobs.infer's Parquet folder, or a COCO results json)
against a COCO instances json, and writes under --output:
  per_category_ap.csv/.md, pr_curve_iou50/75.png   COCO AP per category (area all, 100 detections),
                                                   the tables jobs.evaluate --output writes
  confusion_matrix.csv/.png   ground truth x predicted at --iou and --score, with a background row
                              (false positives) and column (misses); matched greedily by score
  error_analysis.csv/.png     COCO analyze()'s breakdown: AP at C75, C50, Loc (IoU 0.1), Sim
                              (same-supercategory confusions forgiven), Oth (all confusions
                              forgiven), BG (false positives forgiven), FN (= 1), overall and per class
  image_ap.csv                each image's AP alone (IoU 0.50:0.95; images with ground truth)
  best/, worst/               the N best and worst images drawn (with --images and --best-worst N):
                              detections >= --score in colour, ground truth in white
  report.json                 the numbers above in one document

Without `supercategory` in the categories, Sim equals Loc (report.json says so).
Scale: one process, the prediction files read a few at a time and matched as numpy arrays; memory
grows ~20 bytes per detection scored (top 100 per image) plus ~1 KiB per ground-truth box, so
10M images with 100 detections each need ~20 GB: analyse a subset of the files (or a sample of
images in the json) beyond that.
"""
from __future__ import annotations

import argparse
import csv
import io
import time

import numpy as np
from PIL import ImageDraw

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError
from pipelines.evaluation import analysis, confusion, errors, report
from pipelines.evaluation.progress import Progress
from pipelines.evaluation.scoring import load_ground_truth
from pipelines.formats import shards
from pipelines.images.transforms import ImageDecodeError, decode_image


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, metavar="URI",
                   help="jobs.infer --output (Parquet files) or a COCO results json, as for jobs.evaluate")
    p.add_argument("--annotations", required=True, metavar="URI", help="COCO instances json (ground truth)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder/prefix for the tables, figures and images")
    p.add_argument("--iou", type=float, default=0.5, help="IoU of a match in the confusion matrix (default 0.5)")
    p.add_argument("--score", type=float, default=0.3,
                   help="detections scoring at least this enter the confusion matrix and drawings (default 0.3)")
    p.add_argument("--images", metavar="URI", help="the images: a jobs.prepare shards folder, or the folder the "
                   "annotations' file_name values are relative to (needed for --best-worst)")
    p.add_argument("--best-worst", type=int, default=0, metavar="N",
                   help="draw the N images of highest and of lowest AP into DIR/best/ and DIR/worst/")
    p.add_argument("--progress", type=float, default=10.0, metavar="SECONDS",
                   help="progress lines on stderr at most every SECONDS (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.best_worst < 0:
        raise UserError(f"--best-worst {args.best_worst}: give a number of images >= 0")
    if args.best_worst and not args.images:
        raise UserError("--best-worst needs --images: the shards folder or image folder the predictions came from")
    start = time.perf_counter()
    ground_truth = load_ground_truth(args.annotations)
    result = analysis.analyze(args.predictions, ground_truth, args.iou, args.score, args.best_worst,
                              Progress(every_s=args.progress))
    categories = _categories(ground_truth, result.gt.category_ids)
    names = [c["name"] for c in categories]
    rows = report.per_category(result.evaluation, ground_truth, result.detections_per_category)
    overall, _ = errors.stage_ap(result.stages)
    summary = {
        "predictions": args.predictions, "annotations": args.annotations, "files": len(result.files),
        "images": {"ground_truth": len(result.gt.image_ids), "with_row": int(result.has_row.sum()),
                   "rows_with_error": len(result.errors)},
        "stats": {k: v for k, v in result.evaluation.stats.items() if k in ("AP", "AP50", "AP75")},
        "error_analysis": {"stages": overall, "iou_loc": errors.LOC_IOU, "max_dets": errors.MAX_DETS,
                           "note": None if result.supercategories else
                           "no category has a supercategory: Sim equals Loc"},
        "confusion": {"iou": args.iou, "score": args.score, "on_crowd_regions": result.on_crowd,
                      "true_positives": int(np.trace(result.confusion[:-1, :-1])),
                      "false_positives": int(result.confusion[-1].sum()),
                      "missed": int(result.confusion[:, -1].sum()),
                      "confused": int(result.confusion[:-1, :-1].sum() - np.trace(result.confusion[:-1, :-1]))},
    }
    storage.ensure_dir(args.output)
    out = storage.resolve(args.output)
    files = {
        "confusion_matrix.csv": confusion.confusion_csv(result.confusion, names).encode(),
        "confusion_matrix.png": confusion.confusion_png(result.confusion, names, args.iou, args.score),
        "error_analysis.csv": errors.breakdown_csv(result.stages, categories).encode(),
        "error_analysis.png": errors.breakdown_png(result.stages, "overall, area all (COCO analyze)"),
        "image_ap.csv": _image_ap_csv(result).encode(),
    }
    if args.best_worst:
        best, worst = analysis.best_and_worst(result.gt, result.image_ap, args.best_worst)
        summary["best"], summary["worst"] = _draw(args, ground_truth, result, {"best": best, "worst": worst}, out)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    uris = report.write_report(args.output, summary, rows, result.evaluation)
    for name, data in files.items():
        storage.write_bytes_atomic(out.join(name).uri(), data)
        uris.append(out.join(name).uri())
    _print_summary(summary)
    print(f"analysis: {len(uris)} files under {out.uri()}")
    return 0


def _categories(ground_truth: dict, category_ids: np.ndarray) -> list[dict]:
    by_id = {c["id"]: c for c in ground_truth["categories"]}
    return [{"id": int(c), "name": str(by_id[int(c)].get("name", c)), "supercategory": by_id[int(c)].get(
        "supercategory")} for c in category_ids]


def _image_ap_csv(result: analysis.Analysis) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "AP", "has_prediction_row"])
    scored = np.flatnonzero(~np.isnan(result.image_ap))
    writer.writerows(zip(result.gt.image_ids[scored].tolist(), result.image_ap[scored].tolist(),
                         result.has_row[scored].astype(int).tolist()))
    return buffer.getvalue()


def _draw(args, ground_truth: dict, result: analysis.Analysis, groups: dict[str, list[int]],
          out: storage.Location) -> dict[str, list[dict]]:
    """PNG files of the chosen images (jobs.visualize's drawing; ground truth added in white)."""
    from jobs import visualize

    by_id = {img["id"]: img for img in ground_truth["images"]}
    boxes: dict[int, list] = {}
    for a in ground_truth["annotations"]:
        if a["image_id"] in result.kept:
            boxes.setdefault(a["image_id"], []).append(a["bbox"])
    wanted = list(dict.fromkeys(i for ids in groups.values() for i in ids))
    if shards.input_kind(args.images) == "shards":
        rows = [{"image_id": i} for i in wanted]
    else:
        rows = [{"image_id": i, "uri": storage.resolve(args.images).join(by_id[i]["file_name"]).uri()} for i in wanted]
    data = dict(zip(wanted, visualize.fetch_images(args.images, rows)))
    ap_of = dict(zip(result.gt.image_ids.tolist(), result.image_ap.tolist()))
    listed: dict[str, list[dict]] = {}
    for group, ids in groups.items():
        storage.ensure_dir(out.join(group).uri())
        listed[group] = []
        for rank, image_id in enumerate(ids):
            entry = {"image_id": image_id, "AP": ap_of[image_id], "file": by_id[image_id].get("file_name")}
            try:
                if isinstance(data[image_id], Exception):
                    raise ImageDecodeError(f"cannot read: {data[image_id]}")
                pixels = decode_image(data[image_id])
            except ImageDecodeError as exc:
                entry["skipped"] = str(exc)
                print(f"warning: image {image_id} not drawn: {exc}")
                listed[group].append(entry)
                continue
            image = visualize.draw(pixels, result.kept.get(image_id, []), args.score)
            scale = image.width / pixels.shape[1]
            canvas = ImageDraw.Draw(image)
            for x, y, w, h in boxes.get(image_id, []):
                canvas.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(255, 255, 255))
            png = io.BytesIO()
            image.save(png, format="PNG")
            name = f"{rank:03d}-ap{ap_of[image_id]:.3f}-{image_id}.png"
            storage.write_bytes_atomic(out.join(group, name).uri(), png.getvalue())
            listed[group].append(dict(entry, png=name))
    return listed


def _print_summary(summary: dict) -> None:
    stats, stages, c = summary["stats"], summary["error_analysis"]["stages"], summary["confusion"]
    print(" ".join(f"{k}={v:.3f}" for k, v in stats.items()))
    print("error analysis (AP): " + " ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in stages.items()))
    if summary["error_analysis"]["note"]:
        print(f"note: {summary['error_analysis']['note']}")
    print(f"confusion at IoU {c['iou']:g}, score >= {c['score']:g}: {c['true_positives']} correct, "
          f"{c['confused']} confused, {c['false_positives']} false positives, {c['missed']} missed")


if __name__ == "__main__":
    run(main)
