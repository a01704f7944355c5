"""Benchmark: jobs.evaluate on sharded Parquet vs pycocotools on one merged results json.

    python bench/evaluate.py [--images 5000] [--detections 100] [--files 10] [--workdir DIR]
        [--only NAME ...] [--no-json] [--save bench/results/evaluate-cpu.json]

Generates ground truth (80 non-contiguous categories, ~7 boxes per image, 1% crowd, COCO-style
`area` smaller than the box) and N detections per image (jittered ground truth plus random false
positives), written both as predictions Parquet in shuffled shards and as one results json.
Each contender runs in its own process, so its peak RSS is its own: pycocotools (the reference),
faster-coco-eval on the same json (where the speed comes from), and `python -m jobs.evaluate`
end to end (read shards, check, score, write report, tables and PR curves). Stats must match.
Peak memory is that of the whole process tree (the contender and every worker process it
starts), sampled every 0.2 s. `--no-json` skips the merged json (20M result dicts do not fit
pycocotools' memory anyway) and runs jobs.evaluate alone, for the large sizes. --save appends
each run with its provenance (bench/provenance.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import provenance  # noqa: E402 - bench/provenance.py

DETECTION = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64()),
                       ("score", pa.float32()), ("category_id", pa.int32()), ("category", pa.string())])
CONTENDERS = {
    "pycocotools": "pycocotools, merged json",
    "faster-coco-eval": "faster-coco-eval, merged json",
    "jobs.evaluate": "jobs.evaluate, Parquet shards",
}


def generate(workdir: Path, num_images: int, per_image: int, num_files: int, seed: int = 0,
             with_json: bool = True) -> None:
    """gt.json, results.json and predictions/part-*.parquet describing the same detections."""
    rng = np.random.default_rng(seed)
    category_ids = np.sort(rng.choice(np.arange(1, 91), 80, replace=False))
    gt_counts = rng.poisson(7, num_images)
    gt_image = np.repeat(np.arange(num_images), gt_counts)
    wh = rng.uniform(4, 300, (len(gt_image), 2))
    xy = rng.uniform(0, 1, (len(gt_image), 2)) * (np.array([640, 480]) - wh)
    gt_cat = category_ids[np.minimum(rng.zipf(1.3, len(gt_image)) - 1, 79)]  # long-tailed, like COCO
    ground_truth = {
        "images": [{"id": int(i) + 1, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(num_images)],
        "categories": [{"id": int(c), "name": f"class-{c}"} for c in category_ids],
        "annotations": [
            {"id": k + 1, "image_id": int(i) + 1, "category_id": int(c), "bbox": [x, y, w, h], "area": a,
             "iscrowd": int(crowd)}
            for k, (i, c, (x, y), (w, h), a, crowd) in enumerate(zip(
                gt_image, gt_cat, xy.tolist(), wh.tolist(), (wh.prod(1) * rng.uniform(0.4, 1, len(wh))).tolist(),
                rng.random(len(gt_image)) < 0.01))
        ],
    }
    # Detections: slot j of image i copies (with noise) ground-truth box j % n_i when j < 2 n_i, else random.
    image = np.repeat(np.arange(num_images), per_image)
    slot = np.tile(np.arange(per_image), num_images)
    starts = np.concatenate([[0], np.cumsum(gt_counts)[:-1]])
    matched = slot < 2 * gt_counts[image]
    source = starts[image] + slot % np.maximum(gt_counts[image], 1)
    x1y1 = rng.uniform(0, 400, (len(image), 2))
    x2y2 = x1y1 + rng.uniform(4, 240, (len(image), 2))
    jitter = rng.normal(0, 4, (matched.sum(), 4))
    x1y1[matched] = xy[source[matched]] + jitter[:, :2]
    x2y2[matched] = xy[source[matched]] + wh[source[matched]] + jitter[:, 2:]
    category = category_ids[rng.integers(0, 80, len(image))]
    keep_class = matched & (rng.random(len(image)) < 0.8)
    category[keep_class] = gt_cat[source[keep_class]]
    score = rng.random(len(image)).astype(np.float32)
    score[matched] = np.maximum(score[matched], rng.random(matched.sum()).astype(np.float32))

    (workdir / "gt.json").write_text(json.dumps(ground_truth))
    boxes = np.concatenate([x1y1, x2y2 - x1y1], axis=1)  # xywh exactly as the evaluator derives it
    if with_json:
        (workdir / "results.json").write_text(json.dumps([
            {"image_id": int(i) + 1, "category_id": int(c), "bbox": b, "score": s}
            for i, c, b, s in zip(image, category, boxes.tolist(), score.astype(np.float64).tolist())]))

    names = pa.array([f"class-{c}" for c in range(91)])
    detections = pa.StructArray.from_arrays(
        [pa.array(x1y1[:, 0]), pa.array(x1y1[:, 1]), pa.array(x2y2[:, 0]), pa.array(x2y2[:, 1]),
         pa.array(score), pa.array(category.astype(np.int32)), pc.take(names, pa.array(category))],
        fields=list(DETECTION))
    offsets = pa.array(np.arange(0, len(image) + 1, per_image, dtype=np.int32))
    table = pa.table({
        "image_id": pa.array(np.arange(1, num_images + 1, dtype=np.int64)),
        "uri": pa.array([f"s3://bench/{i}.jpg" for i in range(num_images)]),
        "width": pa.array(np.full(num_images, 640, np.int32)), "height": pa.array(np.full(num_images, 480, np.int32)),
        "detections": pa.ListArray.from_arrays(offsets, detections),
        "error": pa.nulls(num_images, pa.string()), "model": pa.array(["bench"] * num_images),
    }).take(pa.array(rng.permutation(num_images)))  # shards in shuffled image order
    (workdir / "predictions").mkdir(exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(num_images), num_files)):
        pq.write_table(table.slice(rows[0], len(rows)), workdir / "predictions" / f"part-{k:05d}.parquet")


def run_contender(name: str, workdir: Path) -> dict:
    """Run inside the child process; returns seconds after imports, peak RSS and the 12 stats."""
    if name == "jobs.evaluate":
        from jobs import evaluate as job

        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            job.main(["--predictions", str(workdir / "predictions"), "--annotations", str(workdir / "gt.json"),
                      "--output", str(workdir / "report")])
        seconds = time.perf_counter() - start
        stats = list(json.loads((workdir / "report" / "report.json").read_text())["stats"].values())
    else:
        if name == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(workdir / "gt.json"))
            evaluator = COCOeval(gt, gt.loadRes(str(workdir / "results.json")), "bbox")
            evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
        seconds = time.perf_counter() - start
        stats = [float(s) for s in evaluator.stats[:12]]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include this benchmark's
    # parent at fork time (its generated data), not only the contender
    status = Path("/proc/self/status").read_text()
    peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024 if "VmHWM:" in status else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "stats": stats}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--files", type=int, default=10, help="Parquet shards")
    parser.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--only", choices=list(CONTENDERS), action="append", help="run only these contenders")
    parser.add_argument("--no-json", action="store_true", help="Parquet only: jobs.evaluate alone")
    parser.add_argument("--save", metavar="FILE", help="append this run's figures to a JSON list in FILE")
    parser.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_contender(args.child, Path(args.workdir))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not (workdir / "gt.json").exists() or (not args.no_json and not (workdir / "results.json").exists()):
            generate(workdir, args.images, args.detections, args.files, with_json=not args.no_json)
        load_before, origin = os.getloadavg(), provenance()
        print(f"data: {args.images} images x {args.detections} detections in {args.files} shards "
              f"({time.perf_counter() - start:.1f} s); {os.cpu_count()} CPUs, load average {load_before[0]:.1f}")
        figures = {}
        for name in args.only or (["jobs.evaluate"] if args.no_json else CONTENDERS):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            start = time.perf_counter()
            child = subprocess.Popen([sys.executable, __file__, "--child", name, "--workdir", str(workdir)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            tree_peak = _peak_tree_rss(child)
            out, err = child.communicate()
            if child.returncode:
                raise SystemExit(f"{name} failed ({child.returncode}): {err[-2000:]}")
            figures[name] = dict(json.loads(out.splitlines()[-1]), process=time.perf_counter() - start,
                                 peak_tree_rss_mb=tree_peak / 2 ** 20)
        report(figures)
        load_after = os.getloadavg()
        print("load average (1, 5, 15 min) at the end: {:.1f} {:.1f} {:.1f}".format(*load_after))
        if args.save:
            _save(Path(args.save), {"provenance": origin, "images": args.images,
                                    "detections_per_image": args.detections,
                                    "files": args.files, "cpus": os.cpu_count(),
                                    "date": time.strftime("%Y-%m-%d %H:%M"),
                                    "load_average_before": load_before, "load_average_after": load_after,
                                    "contenders": figures})


def _peak_tree_rss(process: subprocess.Popen, every_s: float = 0.2) -> int:
    """Largest sum of RSS over a process and all its descendants (from /proc), sampled until it exits."""
    page, peak = os.sysconf("SC_PAGE_SIZE"), 0
    while process.poll() is None:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
                except (OSError, ValueError):
                    pass
        tree, frontier = {process.pid}, [process.pid]
        while frontier:
            children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
            tree.update(children)
            frontier = children
        total = 0
        for pid in tree:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                pass
        peak = max(peak, total)
        time.sleep(every_s)
    return peak


def _save(path: Path, record: dict) -> None:
    runs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(runs + [record], indent=1) + "\n")


def report(figures: dict) -> None:
    print(f"{'':32} {'seconds':>8} {'process s':>9} {'peak RSS':>9} {'tree peak':>10}  AP")
    for name, f in figures.items():
        print(f"{CONTENDERS[name]:32} {f['seconds']:8.1f} {f['process']:9.1f} {f['peak_rss_mb']:6.0f} MB "
              f"{f['peak_tree_rss_mb']:7.0f} MB  {f['stats'][0]:.6f}")
    if "pycocotools" in figures:
        base = figures["pycocotools"]
        for name, f in figures.items():
            if name == "pycocotools":
                continue
            diff = max(abs(a - b) for a, b in zip(f["stats"], base["stats"]))
            print(f"{CONTENDERS[name]}: {base['seconds'] / f['seconds']:.1f}x faster than pycocotools "
                  f"({base['process'] / f['process']:.1f}x whole process); 12 stats "
                  f"{'bit-identical' if f['stats'] == base['stats'] else f'max |diff| {diff:.1e}'}")


if __name__ == "__main__":
    main()
