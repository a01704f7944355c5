"""Detect objects in every input image with Ray Data; one Parquet row per image, exactly once.

    python -m jobs.infer --model URI|torchvision:NAME --input URI --output URI [--batch-size B]
        [--num-actors N | --min-actors A --max-actors B] [--use-gpu] [--score-threshold T]
        [--max-detections 100] [--image-size S] [--amp] [--coco-json URI] [--unit-size N]

--input: shards from jobs.prepare, a COCO layout (images/ + annotations.json) or a folder/bucket
prefix of .jpg/.jpeg/.png files (recursive). --output gets part-NNNNNN.parquet files (the
predictions schema of DESIGN.md; bad files are rows with `error`) and _infer_plan.json. Rerun
the same command after any failure: finished parts are kept, the rest is done once.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

from jobs.cli import run
from pipelines.inference import bulk as inference
from pipelines.inference import predictions
from pipelines import storage
from pipelines.errors import UserError

TORCHVISION_PREFIX = "torchvision:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="URI",
                   help="jobs.train's model.pt (any URI), a torchvision RetinaNet state dict file, or "
                        "torchvision:retinanet_resnet50_fpn[_v2] (downloads COCO weights)")
    p.add_argument("--input", required=True, metavar="URI", help="shards folder, COCO layout, or folder/prefix of images")
    p.add_argument("--output", required=True, metavar="URI", help="folder/prefix for the Parquet parts")
    p.add_argument("--batch-size", type=int, default=16, help="images per detector call (default 16)")
    p.add_argument("--num-actors", type=int, help="fixed detector pool size (default 1; with --use-gpu: every GPU)")
    p.add_argument("--min-actors", type=int, help="autoscaling pool: at least this many detectors")
    p.add_argument("--max-actors", type=int, help="autoscaling pool: at most this many detectors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per detector actor")
    p.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs (torch threads on CPU) per detector (default 1)")
    p.add_argument("--score-threshold", type=float, help="keep detections scoring above this (default: the model's, 0.05)")
    p.add_argument("--max-detections", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--image-size", type=int, help="shorter side after resize (default: the model's, 800 for R50); "
                                                  "longer side at most S x 1333/800")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], help="mixed precision on GPU (bf16)")
    p.add_argument("--coco-json", metavar="URI", help="also write COCO results json (xywh, top 100 per image)")
    p.add_argument("--unit-size", type=int, default=256,
                   help="images per unit of work = per output file (default 256); a rerun must use the same")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--debug-sleep", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow each batch
    return p


def _check_args(args) -> None:
    """Exit-2 checks that need no I/O, before anything slow starts."""
    for name in ("batch_size", "unit_size", "max_detections", "cpus_per_actor", "num_actors", "min_actors",
                 "max_actors", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        raise UserError(f"--score-threshold {args.score_threshold}: give a score in [0, 1)")
    if args.num_actors and (args.min_actors or args.max_actors):
        raise UserError("--num-actors and --min-actors/--max-actors: give a fixed size or a range, not both")
    if args.amp and not args.use_gpu:
        print("warning: --amp applies on GPU only; running in float32", file=sys.stderr)


def _pool_size(args) -> tuple[int, int]:
    """The detector pool's (min, max) size; with --use-gpu and no sizes, every GPU of the cluster."""
    if args.num_actors:
        return args.num_actors, args.num_actors
    low = args.min_actors or 1
    high = args.max_actors or max(low, _cluster_gpus() if args.use_gpu and args.min_actors is None else low)
    if low > high:
        raise UserError(f"--min-actors {low} > --max-actors {high}: the range is empty")
    return low, high


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 1


def load_model(spec: str):
    """(model, checkpoint bytes for the actors, identity for the `model` column) of --model."""
    import retinanet

    if spec.startswith(TORCHVISION_PREFIX):
        name = spec[len(TORCHVISION_PREFIX):]
        if name not in retinanet.weights.TORCHVISION_MODELS:
            raise UserError(f"--model {spec}: unknown; use torchvision:" + " or torchvision:".join(
                retinanet.weights.TORCHVISION_MODELS))
        try:
            model = retinanet.from_torchvision(name)
        except Exception as exc:  # noqa: BLE001 - a failed download surfaces as many types
            raise UserError(f"--model {spec}: cannot download torchvision's COCO weights ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); without internet, save them "
                            "elsewhere (torch.save(model.state_dict(), path)) and give --model PATH") from None
        return model, retinanet.checkpoint_bytes(model), spec
    data = storage.read_bytes(spec)
    try:
        model, _ = retinanet.load_checkpoint(data)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/key errors all mean "not a checkpoint"
        raise UserError(f"--model {spec}: not a retinanet-ray checkpoint nor a torchvision RetinaNet state dict "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give jobs.train's "
                        "model.pt or torch.save(model.state_dict()) of a torchvision RetinaNet") from None
    return model, data, f"{spec}@sha256:{hashlib.sha256(data).hexdigest()[:16]}"


def _start_ray(args) -> None:
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray(args.num_cpus)
    if args.use_gpu and not os.environ.get("RAY_ADDRESS") and not ray.cluster_resources().get("GPU"):
        raise UserError("--use-gpu: this machine has no GPU Ray can see; drop --use-gpu or run on a GPU node")


def main(argv: list[str] | None = None) -> int:
    run_job(build_parser().parse_args(argv))
    return 0


def run_job(args: argparse.Namespace) -> inference.RunStats:
    """The whole job (what `main` runs); returns this run's figures for benchmarks."""
    _check_args(args)
    model, checkpoint, identity = load_model(args.model)
    min_size = args.image_size or model.config.min_size
    max_size = int(round(min_size * 1333 / 800)) if args.image_size else model.config.max_size
    categories = model.categories
    del model
    plan = inference.plan_input(args.input, args.unit_size)
    if args.coco_json and not plan.has_image_ids:
        raise UserError(f"--coco-json: {args.input} is a folder of images without COCO image ids; give shards "
                        "or a COCO layout, or drop --coco-json")
    storage.ensure_dir(args.output)
    _start_ray(args)
    low, high = _pool_size(args)
    options = inference.InferenceOptions(
        batch_size=args.batch_size, min_actors=low, max_actors=high, use_gpu=args.use_gpu,
        cpus_per_actor=args.cpus_per_actor, score_thresh=args.score_threshold, max_detections=args.max_detections,
        min_size=min_size, max_size=max_size, amp=args.amp if args.use_gpu else None, debug_sleep=args.debug_sleep)
    inference.check_plan(args.output, {
        "input": args.input, "kind": plan.kind, "num_images": plan.num_images, "fingerprint": plan.fingerprint,
        "unit_size": args.unit_size, "model": identity, "categories": categories, **options.results_key()})
    pending, done = inference.pending_units(plan, args.output)
    print(f"infer: {plan.num_images} images ({plan.kind}) in {len(plan.units)} units; {done} done before, "
          f"{len(pending)} to run on {low}{'' if low == high else f'-{high}'} detector(s)", flush=True)
    stats = inference.run_inference(pending, args.output, checkpoint, identity, options)
    out = storage.resolve(args.output)
    if args.coco_json:
        parts = [out.join(predictions.part_name(u["unit"])).uri() for u in plan.units]
        count = predictions.write_coco_json(parts, args.coco_json)
        print(f"coco results: {count} detections -> {args.coco_json}", flush=True)
    rate = stats.images / stats.seconds if stats.seconds > 0 else 0.0
    warmup = f", first rows after {stats.first_row_seconds:.1f} s" if stats.first_row_seconds is not None else ""
    print(f"done: {stats.images} images ({stats.errors} errors) in {stats.seconds:.1f} s{warmup}, {rate:.1f} images/s; "
          f"{stats.parts} parts written, {done} kept -> {out.uri()}", flush=True)
    return stats


if __name__ == "__main__":
    run(main)
