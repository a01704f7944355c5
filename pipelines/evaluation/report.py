"""What a user reads after an evaluation: the COCO summary, per-category AP, AP by training
frequency (rare / common / frequent, as LVIS defines them) and precision-recall curves.

Everything here is derived from `Evaluation.precision`, COCOeval's own accumulated array, so the
per-category and per-group numbers are the same quantities as COCO AP, restricted to fewer
categories, and never a second implementation of matching.
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from pipelines import storage
from pipelines.evaluation.scoring import FREQUENCIES, STAT_NAMES, Evaluation
from pipelines.formats.annotations import category_image_pairs, train_image_counts  # noqa: F401 - the report's inputs

# LVIS (Gupta et al. 2019): rare 1-10 training images, common 11-100, frequent > 100.
FREQUENCY_GROUPS = (("rare", 1, 10), ("common", 11, 100), ("frequent", 101, None))
_SUMMARY_ROWS = [  # pycocotools' summarize(): (AP or AR, IoU, area, maxDets), in STAT_NAMES order
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100), ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1), ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100), ("AR", "0.50:0.95", "large", 100),
]


def summary_lines(stats: dict[str, float]) -> list[str]:
    """The 12 stats in exactly pycocotools' printed format, so logs compare line by line."""
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _SUMMARY_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
                     f"{stats[name]:0.3f}")
    return lines


def lvis_summary_lines(stats: dict[str, float], max_dets: int, iou_thresholds=(0.5, 0.95)) -> list[str]:
    """The LVIS stats in exactly lvis-api's printed format (LVISEval.print_results)."""
    lines = []
    for key, value in stats.items():
        kind = "AP" if "AP" in key else "AR"
        iou = (f"{float(key[2:]) / 100:0.2f}" if key[2:3].isdigit()
               else f"{iou_thresholds[0]:0.2f}:{iou_thresholds[-1]:0.2f}")
        group = key[2] if key[2:3] in ("r", "c", "f") else "all"
        area = key[2] if key[2:3] in ("s", "m", "l") else "all"
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} "
                     f"catIds={group:>3s}] = {value:0.3f}")
    return lines


def _masked_mean(values: np.ndarray) -> float | None:
    """COCOeval's averaging: the mean over entries > -1 (-1 marks categories without ground truth)."""
    values = values[values > -1]
    return float(np.mean(values)) if values.size else None


def per_category(evaluation: Evaluation, ground_truth: dict, results: np.ndarray | dict[int, int],
                 train_counts: dict[int, int] | None = None) -> list[dict]:
    """One row per category of the ground truth: instances, detections, AP, AP50, AP75.

    `results`: the scored detections as an (n, 7) COCO results array, or their count per category.

    AP is None for a category without (non-crowd) ground truth, as COCOeval marks it -1.
    LVIS: each row carries the category's `frequency` (rare, common, frequent) and rows are grouped
    by it, rare first, as lvis-api's APr/APc/APf group them.
    """
    names = {c["id"]: c.get("name", str(c["id"])) for c in ground_truth["categories"]}
    gt = np.array([(a["category_id"], bool(a.get("iscrowd", 0))) for a in ground_truth["annotations"]],
                  dtype=np.int64).reshape(-1, 2)
    instance_ids, instance_counts = np.unique(gt[gt[:, 1] == 0, 0], return_counts=True)
    instances = dict(zip(instance_ids.tolist(), instance_counts.tolist()))
    detections = results if isinstance(results, dict) else dict(zip(*(
        a.tolist() for a in np.unique(results[:, 6].astype(np.int64), return_counts=True))))
    precision = evaluation.precision[:, :, :, 0, -1]  # area "all", the most detections (100; LVIS 300)
    lvis_groups = lvis_frequencies(ground_truth) if evaluation.protocol == "lvis" else {}
    iou50, iou75 = (int(np.argmin(np.abs(evaluation.iou_thresholds - t))) for t in (0.5, 0.75))
    rows = []
    for k, cat in enumerate(evaluation.category_ids):
        row = {"category_id": cat, "name": names[cat], "instances": instances.get(cat, 0),
               "detections": detections.get(cat, 0), "AP": _masked_mean(precision[:, :, k]),
               "AP50": _masked_mean(precision[iou50, :, k]), "AP75": _masked_mean(precision[iou75, :, k])}
        if train_counts is not None:
            row["train_images"] = train_counts.get(cat, 0)
            row["frequency"] = frequency_group(row["train_images"])
        elif evaluation.protocol == "lvis":
            row["frequency"] = lvis_groups[cat]
        rows.append(row)
    if evaluation.protocol == "lvis" and train_counts is None:
        order = {name: k for k, (name, _, _) in enumerate(FREQUENCY_GROUPS)}
        rows.sort(key=lambda r: order[r["frequency"]])  # stable: category ids ascending within a group
    return rows


def lvis_frequencies(ground_truth: dict) -> dict[int, str]:
    """Category id -> 'rare' / 'common' / 'frequent', from LVIS categories' `frequency` (r, c, f)."""
    return {int(c["id"]): FREQUENCIES[c["frequency"]] for c in ground_truth["categories"]}


def frequency_group(train_images: int) -> str | None:
    """'rare', 'common' or 'frequent'; None for a category never seen in training."""
    for name, low, high in FREQUENCY_GROUPS:
        if train_images >= low and (high is None or train_images <= high):
            return name
    return None


def frequency_ap(evaluation: Evaluation, train_counts: dict[int, int]) -> dict:
    """AP_rare / AP_common / AP_frequent, averaged like COCO AP over the group's categories (LVIS)."""
    return group_ap(evaluation, {c: frequency_group(train_counts.get(c, 0)) for c in evaluation.category_ids})


def group_ap(evaluation: Evaluation, group_of: dict[int, str | None]) -> dict:
    """AP of each frequency group of categories (`group_of`: category id -> rare/common/frequent)."""
    groups = np.array([group_of.get(c) or "" for c in evaluation.category_ids])
    precision = evaluation.precision[:, :, :, 0, -1]
    out = {f"AP_{name}": _masked_mean(precision[:, :, groups == name]) for name, _, _ in FREQUENCY_GROUPS}
    out["categories"] = {name: int((groups == name).sum()) for name, _, _ in FREQUENCY_GROUPS}
    out["categories"]["unseen"] = int((groups == "").sum())
    return out


def category_csv(rows: list[dict]) -> str:
    """Full precision, empty cells where AP is undefined: for spreadsheets and pandas."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["category_id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    return buffer.getvalue()


def category_markdown(rows: list[dict]) -> str:
    """Three decimals, like COCO's printout; '-' where AP is undefined."""
    if not rows:
        return "(no categories)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = ["-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v).replace("|", "\\|")
                 for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pr_curve_png(evaluation: Evaluation, iou: float) -> bytes:
    """Interpolated precision vs recall at one IoU: each category faint, their mean bold."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread

    t = int(np.argmin(np.abs(evaluation.iou_thresholds - iou)))
    curves = evaluation.precision[t, :, :, 0, -1].T  # [category, recall]
    curves = curves[(curves > -1).all(axis=1)]
    recall = evaluation.recall_thresholds
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.subplots()
    for curve in curves:
        ax.plot(recall, curve, color="0.6", linewidth=0.6, alpha=0.5)
    if len(curves):
        mean = curves.mean(axis=0)
        ax.plot(recall, mean, color="C0", linewidth=2.5,
                label=f"mean of {len(curves)} categories (AP{round(iou * 100)} = {mean.mean():.3f})")
        ax.legend(loc="lower left")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Precision-recall at IoU {iou:.2f} (area all, {evaluation.max_dets} detections)")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(output: str, report: dict, rows: list[dict], evaluation: Evaluation) -> list[str]:
    """report.json, per_category_ap.{csv,md}, pr_curve_iou50.png and pr_curve_iou75.png under `output`."""
    storage.ensure_dir(output)
    base = storage.resolve(output)
    files = {
        "report.json": json.dumps(report, indent=2, allow_nan=False).encode(),
        "per_category_ap.csv": category_csv(rows).encode(),
        "per_category_ap.md": category_markdown(rows).encode(),
        "pr_curve_iou50.png": pr_curve_png(evaluation, 0.5),
        "pr_curve_iou75.png": pr_curve_png(evaluation, 0.75),
    }
    uris = []
    for name, data in files.items():
        uri = base.join(name).uri()
        storage.write_bytes_atomic(uri, data)
        uris.append(uri)
    return uris
