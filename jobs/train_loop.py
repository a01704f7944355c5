"""The per-worker training loop of `jobs.train`, run by Ray Train on every worker.

Synchronized SGD (DDP through `ray.train.torch.prepare_model`) on RetinaNet, the paper's
schedule (SGD momentum 0.9, weight decay 1e-4, linear warm-up, lr x0.1 at 2/3 and 8/9 of the
run), checkpoints through `ray.train.report` (rank 0 writes them; every rank reports the same
number of times, as Ray requires), resume from `ray.train.get_checkpoint()`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch

import retinanet
from retinanet.weights import load_checkpoint
from pipelines.evaluation import scoring as evaluation
from pipelines.formats import shards
from pipelines import storage
from pipelines.training.datasets import DetectionCollate

STATE_FILE = "train_state.pt"


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 0.001) -> float:
    """Linear warm-up from `warmup_factor`, then x0.1 at 2/3 and again at 8/9 of the run."""
    decay = 0.1 ** ((step >= total_steps * 2 // 3) + (step >= total_steps * 8 // 9))
    if step < warmup_steps:
        alpha = step / warmup_steps
        return decay * (warmup_factor * (1 - alpha) + alpha)
    return decay


def build_model(cfg: dict) -> retinanet.RetinaNet:
    model = retinanet.RetinaNet(retinanet.RetinaNetConfig.from_dict(cfg["model"]), categories=cfg["categories"])
    if cfg.get("init"):
        init = cfg["init"]
        source = init.removeprefix("torchvision:") if init.startswith("torchvision:") else storage.read_bytes(init)
        donor = retinanet.from_torchvision(source) if isinstance(source, str) else load_checkpoint(source)[0]
        # Backbone and FPN always transfer; the heads only when the class count matches.
        state = {k: v for k, v in donor.state_dict().items()
                 if k in model.state_dict() and model.state_dict()[k].shape == v.shape}
        model.load_state_dict(state, strict=False)
    return model


def ground_truth(uri: str, manifest_categories: list[dict]) -> dict:
    """COCO ground truth of a validation set: its annotations.json, or rebuilt from its shards."""
    root = storage.resolve(uri)
    coco_json = root.join("annotations.json").uri()
    if storage.exists(coco_json):
        return evaluation.load_ground_truth(coco_json)
    manifest = shards.read_manifest(uri)
    fs, _ = storage.arrow_filesystem(uri)
    columns = ["image_id", "width", "height", "boxes", "category_id", "iscrowd", "area"]
    images, annotations = [], []
    for shard_uri in shards.shard_uris(uri, manifest):
        table = pq.read_table(storage.resolve(shard_uri).path, filesystem=fs, columns=columns).to_pylist()
        for row in table:
            images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
            for box, cat, crowd, area in zip(row["boxes"], row["category_id"], row["iscrowd"], row["area"]):
                annotations.append({"id": len(annotations) + 1, "image_id": row["image_id"], "category_id": cat,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": area, "iscrowd": int(crowd)})
    return {"images": images, "annotations": annotations, "categories": manifest_categories}


def detections_array(detections: list[dict], batch: dict, category_ids: torch.Tensor) -> np.ndarray:
    """Detections of a collated batch -> COCO results rows (image_id, x, y, w, h, score, category_id)
    in original pixels."""
    counts = [len(d["scores"]) for d in detections]
    if not sum(counts):
        return np.zeros((0, 7))
    boxes = torch.cat([d["boxes"] for d in detections]).cpu().double()
    scale = batch["scale"].double().repeat_interleave(torch.tensor(counts))
    boxes = boxes / scale[:, None]
    image_ids = batch["image_id"].cpu().repeat_interleave(torch.tensor(counts)).double()
    labels = torch.cat([d["labels"] for d in detections]).cpu()
    return torch.stack([image_ids, boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                        torch.cat([d["scores"] for d in detections]).cpu().double(),
                        category_ids[labels].double()], dim=1).numpy()


def validate(model, cfg: dict, device) -> dict[str, float]:
    """COCO AP on the whole validation set (rank 0 only; the set is small and not split)."""
    model.eval()
    category_ids = torch.tensor([c["id"] for c in cfg["categories"]])
    rows = []
    with torch.inference_mode():
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=cfg["batch_size"], collate_fn=DetectionCollate(cfg["model"]["size_divisible"])):
            detections = model(batch["images"].to(device), batch["image_sizes"])
            rows.append(detections_array(detections, batch, category_ids))
    model.train()
    results = np.concatenate(rows) if rows else np.zeros((0, 7))
    return evaluation.coco_stats(ground_truth(cfg["val_data"], cfg["categories"]), results)


class MetricsLog:
    """metrics.jsonl under the output: rank 0 appends a line per logging step; a resumed run
    first writes a `resumed` line so the file shows where it picked up."""

    def __init__(self, output: str, resumed_from: int | None):
        self.uri = storage.resolve(output).join("metrics.jsonl").uri()
        self.lines = storage.read_bytes(self.uri).decode().splitlines() if storage.exists(self.uri) else []
        if resumed_from is not None:
            self.append({"event": "resumed", "step": resumed_from})

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        storage.write_bytes_atomic(self.uri, ("\n".join(self.lines) + "\n").encode())


def _report(metrics: dict, rank: int, state: dict | None) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint when there is one."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop(cfg: dict) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg["seed"])
    if not cfg["use_gpu"]:
        torch.set_num_threads(max(1, cfg["threads_per_worker"]))
    device = ray.train.torch.get_device()
    model = build_model(cfg)
    if cfg["model"]["norm"] == "sync_bn" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg["use_gpu"]:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    model = getattr(ddp_model, "module", ddp_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    total, warmup = cfg["max_steps"], cfg["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))

    step, resumed = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = resumed = state["step"]
    optimizer_checksum = momentum_checksum(optimizer) if checkpoint else None
    log = MetricsLog(cfg["output"], resumed) if rank == 0 else None

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"]) if cfg["use_gpu"] else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    steps_per_epoch = cfg["steps_per_epoch"]
    shard = ray.train.get_dataset_shard("train")
    collate = DetectionCollate(cfg["model"]["size_divisible"])
    window, seen = Window(), []
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        window.fetch_started()
        for index, batch in enumerate(shard.iter_torch_batches(batch_size=cfg["batch_size"], collate_fn=collate,
                                                               drop_last=True, prefetch_batches=2)):
            # Resuming mid-epoch skips the batches already trained on; a worker's uneven tail
            # is read but not trained on: ranks stay in step (Ray requires every split consumed).
            if step >= total:  # every rank reaches the last step at the same batch
                break
            if index < skip or index >= steps_per_epoch:
                window.fetch_started()
                continue
            window.fetched()
            images = batch["images"].to(device, non_blocking=True)
            if cfg["use_gpu"]:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = {k: batch[k].to(device) for k in ("boxes", "labels", "num_boxes", "image_id")}
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                try:
                    losses = ddp_model(images, batch["image_sizes"], targets)
                except FloatingPointError as exc:
                    raise FloatingPointError(f"step {step + 1}: {exc}") from None
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if cfg.get("debug_dir"):
                seen.extend(batch["image_id"].tolist())
            if cfg.get("fail_at_step") == step and rank == world - 1 and not storage.exists(failure_marker(cfg)):
                storage.write_bytes_atomic(failure_marker(cfg), b"injected")
                os._exit(1)  # a worker dies mid-run: Ray restarts the group from the last checkpoint
            window.add(len(images) * world, {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}})

            end_of_epoch = index + 1 == steps_per_epoch
            checkpoint_now = step % cfg["checkpoint_every"] == 0 or step == total
            if step % cfg["log_every"] == 0 or checkpoint_now or end_of_epoch:
                metrics = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **window.summary()}
                if end_of_epoch and cfg.get("val_data") and rank == 0:
                    metrics.update({f"val_{k}": v for k, v in validate(model, cfg, device).items()})
                state = None
                if checkpoint_now:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch}
                if rank == 0:
                    log.append(metrics)
                    # straight to the stream: Ray Train's patched print() would show the line twice
                    sys.stdout.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in metrics.items()) + "\n")
                    sys.stdout.flush()
                _report(metrics, rank, state)
                if rank == 0 and step == total:
                    final = retinanet.checkpoint_bytes(model, step=step, metrics=metrics,
                                                       extra={"preset": cfg["preset"], "image_size": cfg["image_size"]})
                    storage.write_bytes_atomic(storage.resolve(cfg["output"]).join("model.pt").uri(), final)
                window.reset()
            window.fetch_started()
    if cfg.get("debug_dir"):
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "image_ids": seen,
                  "param_checksum": checksum, "resumed_from": resumed,
                  "resumed_momentum_checksum": optimizer_checksum}
        storage.write_bytes_atomic(storage.resolve(cfg["debug_dir"]).join(f"rank-{rank}.json").uri(),
                                   json.dumps(record).encode())


def momentum_checksum(optimizer_or_state) -> float:
    """Sum of SGD momentum buffers: tells a resumed optimizer from a fresh one."""
    state = optimizer_or_state.state_dict() if hasattr(optimizer_or_state, "state_dict") else optimizer_or_state
    return float(sum(float(s["momentum_buffer"].double().sum()) for s in state["state"].values()
                     if s.get("momentum_buffer") is not None))


def failure_marker(cfg: dict) -> str:
    return storage.resolve(cfg["output"]).join("injected-failure").uri()


class Window:
    """Loss averages, images/s and the fraction of time spent waiting for data since the last log."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps, self.images, self.wait = {}, 0, 0, 0.0
        self.started = self.last_fetch = time.perf_counter()

    def fetch_started(self) -> None:
        self.last_fetch = time.perf_counter()

    def fetched(self) -> None:
        self.wait += time.perf_counter() - self.last_fetch

    def add(self, images: int, losses: dict[str, float]) -> None:
        self.steps += 1
        self.images += images
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {**{k: v / max(1, self.steps) for k, v in self.sums.items()},
                "images_per_s": self.images / elapsed, "data_wait_fraction": self.wait / elapsed}
