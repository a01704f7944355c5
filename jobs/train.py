"""Train RetinaNet with synchronized SGD (DDP) on Ray Train, streaming data with Ray Data.

    python -m jobs.train --data URI --output URI [--preset tiny|r50|r101] [--num-workers N|MIN:MAX] ...

Each worker reads its own `streaming_split` of the shards (decode/resize/flip on CPU tasks).
Checkpoints go to --output on any storage, the last --keep of them kept; rerunning the same
command resumes from the last one, and a failed worker group restarts from it
(--max-failures). With --num-workers MIN:MAX the group is elastic (Ray Train V2): it starts
once MIN workers are available and restarts from the last checkpoint with fewer or more, each
step still training --global-batch images (gradient accumulation). Results: --output/model.pt
(loads with `retinanet.load_checkpoint` and `jobs.infer`), metrics.jsonl (one line per logging
step), loss_curve.png.
"""
from __future__ import annotations

import argparse
import json
import sys

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.cli import run
from pipelines import storage
from pipelines.formats.coverage import anchor_coverage, coverage_warning
from pipelines.formats.shards import check_shards
from pipelines.ray_runtime import ensure_ray
from pipelines.training import config
from pipelines.training.config import TrainConfig
from pipelines.training.datasets import detection_dataset, training_input_kind, training_manifest
from pipelines.training.engine import train_loop
from pipelines.training.epochs import plan_epochs, steps_per_epoch
from pipelines.training.init import model_setup
from pipelines.training.records import check_logger, join_metrics, plot_loss_curve, save_config
from retinanet.config import RetinaNetConfig

COVERAGE_SHARDS, COVERAGE_SAMPLE = 8, 20_000  # the look before training (jobs.inspect reads everything)


def build_parser() -> argparse.ArgumentParser:
    return config.build_parser("python -m jobs.train", __doc__)


def resolve_options(argv: list[str] | None) -> TrainConfig:
    """Defaults < --config YAML < flags (`pipelines.training.config`)."""
    return config.resolve_options(argv, build_parser())


def prepare_run(options: TrainConfig) -> tuple[TrainConfig, int]:
    """(the config the workers run, images in the training set): everything a user can get
    wrong is checked here, before Ray starts."""
    kinds = {data: training_input_kind(data) for data in filter(None, (options.data, options.val_data))}
    check_logger(options.logger)
    manifest = training_manifest(options.data)
    if kinds[options.data] == "shards":
        check_shards(options.data, manifest)
    model, backbone_weights = model_setup(options, manifest.categories)
    if kinds[options.data] == "shards":
        warn_anchor_coverage(options.data, model)
    epoch_sizes, max_steps = plan_epochs(options, manifest.num_images)
    cfg = options.resolved(model=model, categories=manifest.categories, backbone_weights=backbone_weights,
                           epoch_sizes=epoch_sizes, max_steps=max_steps)
    storage.ensure_dir(cfg.output)
    return cfg, manifest.num_images


def warn_anchor_coverage(data: str, model: dict) -> None:
    """One line when many boxes have no anchor at IoU >= 0.5 at this image size (jobs.inspect
    says more). A look at a few shards: seconds, whatever the dataset's size."""
    coverage = anchor_coverage(data, RetinaNetConfig.from_dict(model), sample=COVERAGE_SAMPLE,
                               max_shards=COVERAGE_SHARDS)
    warning = coverage_warning(coverage)
    if warning:
        print(f"warning: {warning} (python -m jobs.inspect {data} for the details)", file=sys.stderr, flush=True)


def validation_datasets(cfg: TrainConfig) -> dict:
    """The validation set for Ray Train to hand to rank 0 (not split: `DataConfig` below)."""
    if not cfg.val_data:
        return {}
    ds, _ = detection_dataset(cfg.val_data, image_size=cfg.model["min_size"], max_size=cfg.model["max_size"],
                              train=False, max_pixels=cfg.max_pixels)
    return {"val": ds}


def fit(cfg: TrainConfig, datasets: dict):
    """Run `train_loop` on the workers; Ray Train's result."""
    arrow_fs, arrow_path = storage.arrow_filesystem(cfg.output)
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg.to_dict(), datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(num_workers=cfg.scaling_workers(), use_gpu=cfg.use_gpu,
                                     resources_per_worker=cfg.worker_resources(), placement_strategy=cfg.placement,
                                     elastic_resize_monitor_interval_s=cfg.elastic_check_s),
        run_config=RunConfig(name=cfg.name, storage_path=arrow_path, storage_filesystem=arrow_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    return trainer.fit()


def report(cfg: TrainConfig, result) -> None:
    """metrics.jsonl, loss_curve.png and the summary line."""
    output = storage.resolve(cfg.output)
    metrics_uri = join_metrics(output.uri())
    plot_loss_curve(metrics_uri, output.join("loss_curve.png").uri())
    lines = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line]
    last = [r for r in lines if "loss" in r][-1] if any("loss" in r for r in lines) else {}
    val = [r for r in lines if "val_AP" in r][-1:]
    print(f"done: step {max(r.get('step', 0) for r in lines)}, loss {last.get('loss', float('nan')):.4f}"
          + (f", val AP {val[0]['val_AP']:.3f} AP50 {val[0]['val_AP50']:.3f}" if val else "")
          + f"; model {output.join('model.pt').uri()}, checkpoints {result.path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg, num_images = prepare_run(resolve_options(argv))
    config_uri = save_config(cfg)
    ensure_ray(cfg.num_cpus)
    datasets = validation_datasets(cfg)
    workers, batch, accumulation = cfg.num_workers, cfg.batch_size, cfg.accumulation(cfg.num_workers)
    group = f"{workers} workers" if cfg.min_workers is None else f"{cfg.min_workers}-{workers} workers (elastic)"
    per_step = f" x {accumulation} micro-batches" if accumulation > 1 else ""
    print(f"training {cfg.preset if not cfg.init else cfg.init} on {num_images} images "
          f"({len(cfg.categories)} classes): {group} x {batch} images{per_step}, {cfg.max_steps} steps "
          f"({steps_per_epoch(cfg.epoch_sizes[0], workers, batch, accumulation)}/epoch), lr {cfg.lr:.4g}; "
          f"config {config_uri}", flush=True)
    try:
        result = fit(cfg, datasets)
    except Exception as exc:  # noqa: BLE001 - report the worker's own error in one line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        last_line = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        print(f"error: training failed: {type(cause).__name__}: {last_line}", file=sys.stderr)
        return 1
    report(cfg, result)
    return 0


if __name__ == "__main__":
    run(main)
