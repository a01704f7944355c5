"""Detect objects in every input image with Ray Data; one Parquet row per image, exactly once.

    python -m jobs.infer --model URI|torchvision:NAME (--input URI | --input-list URI) --output URI
        [--batch-size B] [--num-actors N|MIN:MAX] [--use-gpu] [--score-threshold T] [--max-detections 100]
        [--image-size S] [--max-pixels P] [--runtime R] [--precision P] [--coco-json URI] [--unit-size N]
        [--max-error-fraction F]

--input: shards from jobs.prepare, a COCO layout (images/ + annotations.json) or a folder/bucket
prefix of .jpg/.jpeg/.png files (recursive); --input-list: a text, CSV or Parquet file of URIs.
--output gets part-NNNNNN.parquet files written by the workers (the predictions schema of
docs/design.md; undecodable files are rows with `error`), _infer_plan.json and _infer_units-*.pq (the units,
listed once). Exit 1 when units failed for a storage reason: rerun the same command after any
failure; finished parts are kept, the rest is done once, and the input is not listed again.

--model may also be a file from jobs.export (.onnx), which carries its own config and categories.
Where the network runs (README "Deploy"): --runtime torch | onnxruntime | openvino, --precision
fp32 | bf16 (CPUs with bf16 instructions, and GPUs) | fp16 (GPUs). With neither flag: torch on a
GPU; on a CPU ONNX Runtime for fp32 and OpenVINO for bf16 (torch where they are not installed);
fp32 unless --precision says otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys

from jobs.cli import run
from pipelines import storage
from pipelines.errors import UserError
from pipelines.images.pixel_limit import DEFAULT_MAX_PIXELS
from pipelines.inference import bulk as inference
from pipelines.inference import plan as plans
from pipelines.inference import predictions, runtimes
from pipelines.inference.bulk import PROGRESS_SECONDS

TORCHVISION_PREFIX = "torchvision:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="URI",
                   help="jobs.train's model.pt (any URI), a torchvision RetinaNet state dict file, or "
                        "torchvision:retinanet_resnet50_fpn[_v2] (downloads COCO weights)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="URI", help="shards folder, COCO layout, or folder/prefix of images")
    source.add_argument("--input-list", metavar="URI",
                        help="a file of image URIs instead of a listing: .parquet or .csv (column 'uri', else the "
                             "first), or text (one per line)")
    p.add_argument("--output", required=True, metavar="URI", help="folder/prefix for the Parquet parts")
    p.add_argument("--batch-size", type=int, default=16, help="images per detector call (default 16)")
    p.add_argument("--num-actors", metavar="N|MIN:MAX",
                   help="detector pool: a fixed size or a range the pool grows in as the cluster does ('MIN:' = no "
                        "upper bound); default 1, with --use-gpu 1: (one per GPU the cluster gives)")
    p.add_argument("--min-actors", type=int, help="the same as --num-actors MIN:MAX, in two flags")
    p.add_argument("--max-actors", type=int, help="the same as --num-actors MIN:MAX, in two flags")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per detector actor")
    p.add_argument("--cpus-per-actor", type=int, default=1,
                   help="CPUs each detector reserves (torch threads on CPU) (default 1)")
    p.add_argument("--decode-threads", type=int,
                   help="read+decode threads per detector, ahead of its model (default: --cpus-per-actor; "
                        f"with --use-gpu {inference.GPU_DECODE_THREADS}: reserve them with --cpus-per-actor "
                        "on shared nodes)")
    p.add_argument("--score-threshold", type=float,
                   help="keep detections scoring above this (default: the model's, 0.05)")
    p.add_argument("--max-detections", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--image-size", type=int, help="shorter side after resize (default: the model's, 800 for R50); "
                                                  "longer side at most S x 1333/800")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixel limit of one decode (default {DEFAULT_MAX_PIXELS}, fits the memory a decode declares): "
                        "larger JPEGs decode reduced, other larger images become error rows")
    p.add_argument("--runtime", choices=runtimes.RUNTIMES,
                   help="where the network runs (default: torch with --use-gpu; on CPUs onnxruntime for fp32, openvino "
                        "for bf16, where installed); onnxruntime and openvino take a checkpoint (exported on the "
                        "driver) or a .onnx file")
    p.add_argument("--precision", choices=runtimes.PRECISIONS,
                   help="fp32 (default), bf16 (GPUs, and CPUs with AVX512_BF16/AMX: ~2-3x faster there, detections "
                        "within rounding), fp16 (GPUs)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"],
                   help="the same as --precision bf16 (or fp16)")
    p.add_argument("--coco-json", metavar="URI", help="also write COCO results json (xywh, top 100 per image)")
    p.add_argument("--unit-size", type=int, default=256,
                   help="images per unit of work = per output file (default 256); a rerun must use the same")
    p.add_argument("--max-error-fraction", type=float, metavar="F",
                   help="exit 1 when more than this fraction of this run's images are error rows")
    p.add_argument("--shared-mount", action="store_true",
                   help="local paths are a mount every node of the cluster sees "
                        "(otherwise refused on a multi-node cluster)")
    p.add_argument("--progress-every", type=float, default=PROGRESS_SECONDS, metavar="SECONDS",
                   help=f"seconds between progress lines (default {PROGRESS_SECONDS:.0f})")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: max(4, cores))")
    p.add_argument("--debug-sleep", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow each unit
    return p


def _check_args(args) -> None:
    """Exit-2 checks that need no I/O, before anything slow starts."""
    for name in ("batch_size", "unit_size", "max_detections", "cpus_per_actor", "decode_threads", "image_size",
                 "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        raise UserError(f"--score-threshold {args.score_threshold}: give a score in [0, 1)")
    if args.max_error_fraction is not None and not 0 <= args.max_error_fraction <= 1:
        raise UserError(f"--max-error-fraction {args.max_error_fraction}: give a fraction in [0, 1]")
    _pool_size(args)
    if args.amp and args.precision and args.amp != args.precision:
        raise UserError(f"--amp {args.amp} and --precision {args.precision}: give one of them")
    _runtime(args)


def _runtime(args) -> tuple[str, str]:
    """(runtime, precision) of the flags and their defaults; exit 2 for what this machine cannot run."""
    precision = args.precision or args.amp
    runtime = args.runtime or runtimes.default_runtime(args.use_gpu, precision)[0]
    precision = precision or "fp32"
    try:
        runtimes.check_precision(runtime, precision, args.use_gpu, cpu_local=not os.environ.get("RAY_ADDRESS"))
    except runtimes.RuntimeUnavailable as exc:
        flag = "--runtime" if str(exc).startswith("runtime") else "--precision"
        raise UserError(f"{flag}: {exc}") from None
    return runtime, precision


def _pool_size(args) -> tuple[int, int | None]:
    """The detector pool's (min, max) size, max None = unbounded (--use-gpu default: grow with the GPUs)."""
    if args.num_actors and (args.min_actors or args.max_actors):
        raise UserError("--num-actors and --min-actors/--max-actors: give one of them")
    if args.min_actors or args.max_actors:
        spec = f"{args.min_actors or 1}:{args.max_actors or ''}"
    elif args.num_actors:
        spec = args.num_actors
    else:
        return (1, None) if args.use_gpu else (1, 1)
    low, sep, high = spec.partition(":")
    try:
        low_n = int(low) if low else 1
        high_n = (int(high) if high else None) if sep else low_n
    except ValueError:
        raise UserError(f"--num-actors {spec}: give N or MIN:MAX (e.g. 1:8, or 2: for no upper bound)") from None
    if low_n < 1 or (high_n is not None and high_n < low_n):
        raise UserError(f"--num-actors {spec}: give 1 <= MIN <= MAX")
    return low_n, high_n


def load_model(spec: str, runtime: str = "torch") -> tuple[object, list[dict], bytes, str]:
    """(config, categories, the bytes the actors load, identity for the `model` column) of --model.

    A checkpoint that is to run under ONNX Runtime or OpenVINO is exported here, once, so that
    the actors receive the graph; its identity stays the checkpoint's. An exported file's
    identity names the file and the checkpoint it came from.
    """
    import retinanet
    from retinanet import export

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
        data, identity = retinanet.checkpoint_bytes(model), spec
    else:
        data = storage.read_bytes(spec)
        identity = f"{spec}@sha256:{hashlib.sha256(data).hexdigest()[:16]}"
        if export.is_onnx(data):
            if runtime == "torch":
                raise UserError(f"--model {spec}: an exported ONNX file runs under --runtime onnxruntime or "
                                "openvino; for torch give the checkpoint it was exported from")
            try:
                meta = export.read_metadata(data)
            except ValueError as exc:
                raise UserError(f"--model {spec}: {exc}; export checkpoints with python -m jobs.export") from None
            source = f" (exported from {meta['source']})" if meta.get("source") else ""
            return (retinanet.RetinaNetConfig.from_dict(meta["config"]), meta["categories"], data,
                    identity + source)
        try:
            model, _ = retinanet.load_checkpoint(data)
        except Exception as exc:  # noqa: BLE001 - pickle/zip/key errors all mean "not a checkpoint"
            raise UserError(f"--model {spec}: not a retinanet-ray checkpoint, a torchvision RetinaNet state dict "
                            f"nor a jobs.export file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); give jobs.train's model.pt, "
                            "torch.save(model.state_dict()) of a torchvision RetinaNet, "
                            "or jobs.export's .onnx") from None
    if runtime != "torch":
        data = export.export_onnx(model, source=identity)
    return model.config, model.categories, data, identity


def _start_ray(args) -> None:
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray(args.num_cpus)
    if args.use_gpu and not os.environ.get("RAY_ADDRESS") and not ray.cluster_resources().get("GPU"):
        raise UserError("--use-gpu: this machine has no GPU Ray can see; drop --use-gpu or run on a GPU node")


def _refuse_local_paths(args, plan) -> None:
    """On a multi-node cluster, workers cannot see a local path of the driver's machine: refuse up
    front instead of writing all-error output (or failing every unit)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2 or args.shared_mount:
        return
    first = plans.read_units(plan.units_uri, [0]).slice(0, 1).to_pylist()[0]
    refuse_local_paths({"--output": args.output, "--input": args.input,
                        "--input-list entry": (first["uris"] or [first["shard"]])[0]},
                       nodes=nodes, shared_mount=args.shared_mount)


def refuse_local_paths(uris: dict[str, str | None], nodes: int, shared_mount: bool) -> None:
    """UserError naming the first local path among `uris` (flag -> URI) when `nodes` > 1."""
    if nodes < 2 or shared_mount:
        return
    for flag, uri in uris.items():
        if uri and storage.resolve(uri).protocol == "file":
            raise UserError(f"{flag} {uri}: a local path on a {nodes}-node Ray cluster, which workers on other "
                            "nodes cannot see; use object storage (s3://, gs://), or a mount every node shares "
                            "and pass --shared-mount")


def main(argv: list[str] | None = None) -> int:
    return run_job(build_parser().parse_args(argv)).exit_code


def run_job(args: argparse.Namespace) -> inference.RunStats:
    """The whole job (what `main` runs); returns this run's figures (and `exit_code`) for benchmarks."""
    _check_args(args)
    runtime, precision = _runtime(args)
    config, categories, checkpoint, identity = load_model(args.model, runtime)
    min_size = args.image_size or config.min_size
    max_size = int(round(min_size * 1333 / 800)) if args.image_size else config.max_size
    kind, units = plans.input_units(args.input, args.input_list, args.unit_size)
    if args.coco_json and kind not in ("coco", "shards"):
        raise UserError(f"--coco-json: {args.input or args.input_list} has no COCO image ids; give shards "
                        "or a COCO layout, or drop --coco-json")
    low, high = _pool_size(args)
    options = inference.InferenceOptions(
        batch_size=args.batch_size, min_actors=low, max_actors=high, use_gpu=args.use_gpu,
        cpus_per_actor=args.cpus_per_actor, decode_threads=args.decode_threads, score_thresh=args.score_threshold,
        max_detections=args.max_detections,
        min_size=min_size, max_size=max_size, max_pixels=args.max_pixels, runtime=runtime,
        precision=precision, debug_sleep=args.debug_sleep, progress_seconds=args.progress_every)
    settings = {"input": args.input, "input_list": args.input_list, "kind": kind, "unit_size": args.unit_size,
                "model": identity, "categories": categories, **options.results_key()}
    plan, made = plans.claim_plan(args.output, settings, units, source=args.input or args.input_list)
    _start_ray(args)
    _refuse_local_paths(args, plan)
    done = plans.finished_units(args.output, plan.num_units)
    pool = f"{low}" if low == high else f"{low}-{high or 'any'}"
    print(f"infer: {plan.num_images} images ({plan.kind}) in {plan.num_units} units, plan "
          f"{'listed now' if made else 'reused'}; {int(done.sum())} done before, {int((~done).sum())} to run on "
          f"{pool} detector(s), {runtime} {precision}", flush=True)
    stats = inference.run_inference(plan, done, args.output, checkpoint, identity, options)
    out = storage.resolve(args.output)
    out.fs.invalidate_cache()  # the workers wrote the parts: forget listings cached before they did
    rate = stats.images / stats.seconds if stats.seconds > 0 else 0.0
    warmup = f", first unit after {stats.first_row_seconds:.1f} s" if stats.first_row_seconds is not None else ""
    print(f"done: {stats.images} images ({stats.errors} errors) in {stats.seconds:.1f} s{warmup}, {rate:.1f} images/s; "
          f"{stats.parts} parts written, {int(done.sum())} kept -> {out.uri()}", flush=True)
    stats.exit_code = 0
    if stats.failed:
        print(f"error: {stats.failed} unit(s) not written: their reads or writes failed for a storage reason "
              f"(first: {stats.first_failure}); rerun the same command to complete them", file=sys.stderr, flush=True)
        stats.exit_code = 1
    elif args.coco_json:
        parts = [out.join(predictions.part_name(u)).uri() for u in range(plan.num_units)]
        count = predictions.write_coco_json(parts, args.coco_json)
        print(f"coco results: {count} detections -> {args.coco_json}", flush=True)
    if args.max_error_fraction is not None and stats.images and stats.errors / stats.images > args.max_error_fraction:
        print(f"error: {stats.errors} of {stats.images} images ({stats.errors / stats.images:.1%}) are error rows, "
              f"above --max-error-fraction {args.max_error_fraction}", file=sys.stderr, flush=True)
        stats.exit_code = 1
    return stats


if __name__ == "__main__":
    run(main)
