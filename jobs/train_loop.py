"""The per-worker training loop of `jobs.train`, run by Ray Train on every worker.

Synchronized SGD (DDP through `ray.train.torch.prepare_model`) on RetinaNet, the paper's
schedule (SGD momentum 0.9, weight decay 1e-4, linear warm-up, lr x0.1 at 2/3 and 8/9 of the
run), checkpoints through `ray.train.report` (rank 0 writes them; every rank reports the same
number of times, as Ray requires), resume from `ray.train.get_checkpoint()`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

import retinanet
from jobs.train_data import (StartedEpoch, batch_keys, epoch_shard, gather_keys, max_over_ranks,
                             next_epoch_start_step, sum_over_ranks)
from jobs.train_init import initial_model
from jobs.train_records import RunRecords
from jobs.train_validation import validate
from pipelines import storage
from pipelines.images.collate import normalize_images
from pipelines.training.datasets import PixelCollate
from pipelines.training.sampling import MAX_COPIES

STATE_FILE = "train_state.pt"
TIMING_STEPS = 4  # steps of each epoch timed to decide when to start the next epoch's input


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 0.001) -> float:
    """Linear warm-up from `warmup_factor`, then x0.1 at 2/3 and again at 8/9 of the run."""
    decay = 0.1 ** ((step >= total_steps * 2 // 3) + (step >= total_steps * 8 // 9))
    if step < warmup_steps:
        alpha = step / warmup_steps
        return decay * (warmup_factor * (1 - alpha) + alpha)
    return decay


def _report(metrics: dict, rank: int, state: dict | None) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint when there is one."""
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, os.path.join(directory, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(cfg: dict) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg["seed"])
    if not cfg["use_gpu"]:
        torch.set_num_threads(max(1, cfg["threads_per_worker"]))
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    state = _load_state(checkpoint) if checkpoint else None
    if state is None:
        model = initial_model(cfg)
    else:  # the checkpoint holds every weight: no download, no init transfer
        model = retinanet.RetinaNet(retinanet.RetinaNetConfig.from_dict(cfg["model"]), categories=cfg["categories"])
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
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"]) if cfg["use_gpu"] else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step, epoch, resumed, done = 0, 0, None, np.zeros(0, np.int64)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = resumed = state["step"]
        epoch = state.get("epoch", 0)
        done = state["epoch_keys"].numpy() if "epoch_keys" in state else np.zeros(0, np.int64)
    optimizer_checksum = momentum_checksum(optimizer) if state is not None else None
    records = RunRecords(cfg["output"], cfg["logger"], cfg["name"]) if rank == 0 else None
    if records and resumed is not None:
        records.append({"event": "resumed", "step": resumed, "epoch": epoch, "epoch_images_done": len(done)})
    collate = PixelCollate(cfg["model"]["size_divisible"])  # uint8 batches: normalized below, on the device
    mean, std = cfg["model"]["image_mean"], cfg["model"]["image_std"]
    debug = DebugRecord(cfg, rank) if cfg.get("debug_dir") else None
    window = Window()
    iter_args = dict(batch_size=cfg["batch_size"], collate_fn=collate, prefetch_batches=2, pin_memory=cfg["use_gpu"])
    upcoming = StartedEpoch(epoch_shard(cfg, epoch, done, rank, world), **iter_args) if step < total else None
    while step < total:
        trained, rows_read, epoch_steps, skipped, exhausted = [], 0, 0, 0, True
        current, upcoming = upcoming, None
        left = planned_steps(cfg, epoch, world) - len(done) // (world * cfg["batch_size"])
        # When to start the next epoch's input: decided at the same step on every rank, from the
        # ranks' slowest figures, so that the collectives inside `epoch_shard` match.
        next_needed, start_next_at = step + left < total, 0 if left <= TIMING_STEPS + 1 else None
        if next_needed and start_next_at == 0:
            upcoming = StartedEpoch(epoch_shard(cfg, epoch + 1, np.zeros(0, np.int64), rank, world), **iter_args)
        window.fetch_started()
        for batch in current:
            # Ranks hold equal rows, so they step in lockstep and leave this loop at the same batch.
            rows_read += len(batch["image_id"])
            if len(batch["image_id"]) < cfg["batch_size"]:
                continue  # a rank's short last batch is read, not trained (every rank has one or none)
            if step >= total:
                exhausted = False
                break
            window.fetched()
            images = normalize_images(batch["pixels"].to(device, non_blocking=True), batch["image_sizes"], mean, std,
                                      channels_last=cfg["use_gpu"])
            targets = {k: batch[k].to(device) for k in ("boxes", "labels", "num_boxes", "image_id")}
            losses = forward_losses(ddp_model, images, batch["image_sizes"], targets, amp_dtype, step)
            optimizer.zero_grad(set_to_none=True)
            if losses is None:  # fp16 overflow in the forward pass on some rank: skip like the scaler does
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                skipped += 1
            else:
                loss = sum(losses.values())
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            step += 1
            epoch_steps += 1
            if epoch_steps == 1:
                first_step_end = time.perf_counter()
            if next_needed and upcoming is None:
                if epoch_steps == TIMING_STEPS + 1:
                    ready, step_seconds = max_over_ranks(current.ready_seconds or 0.0,
                                                         (time.perf_counter() - first_step_end) / TIMING_STEPS)
                    start_next_at = max(epoch_steps, next_epoch_start_step(left, ready, step_seconds))
                if epoch_steps == start_next_at:
                    upcoming = StartedEpoch(epoch_shard(cfg, epoch + 1, np.zeros(0, np.int64), rank, world), **iter_args)
            keys = batch_keys(batch)
            trained.append(keys)
            if debug:
                debug.batch(step, epoch, keys)
            if cfg.get("fail_at_step") == step and rank == world - 1 and not storage.exists(failure_marker(cfg)):
                storage.write_bytes_atomic(failure_marker(cfg), b"injected")
                os.kill(os.getpid(), signal.SIGKILL)  # a worker dies: Ray restarts the group from the last checkpoint
            if losses is not None:
                window.add(len(images) * world, {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}})
            checkpoint_now = step % cfg["checkpoint_every"] == 0 or step == total
            if step % cfg["log_every"] == 0 or checkpoint_now:
                metrics = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **window.summary(),
                           "time": round(time.time(), 3)}
                if skipped:
                    metrics["skipped_steps"] = skipped
                saved = None
                if checkpoint_now:  # every rank joins the gather; rank 0 saves
                    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                             "epoch": epoch, "epoch_keys": torch.from_numpy(np.concatenate([done, gather_keys(trained)]))}
                _log(records, metrics, step if checkpoint_now else None)
                _report(metrics, rank, saved)
                if rank == 0 and step == total:
                    final = retinanet.checkpoint_bytes(model, step=step, metrics=metrics,
                                                       extra={"preset": cfg["preset"], "image_size": cfg["image_size"]})
                    storage.write_bytes_atomic(storage.resolve(cfg["output"]).join("model.pt").uri(), final)
                window.reset()
            window.fetch_started()
        if not exhausted:
            if upcoming is not None:
                upcoming.close()
            break  # the run ended inside this epoch
        read, trained_rows = sum_over_ranks(rows_read, epoch_steps * cfg["batch_size"])
        if not trained_rows and not len(done):
            raise RuntimeError(f"epoch {epoch}: not one full batch of readable images ({read} read); check --data")
        planned = cfg["epoch_sizes"][epoch] if epoch < len(cfg["epoch_sizes"]) else cfg["epoch_sizes"][-1]
        summary = {"event": "epoch_end", "epoch": epoch, "step": step, "planned_images": int(planned),
                   "read": read + len(done), "trained": trained_rows + len(done),
                   "missing_or_undecodable": max(0, int(planned) - read - len(done)), "rank_tails": read - trained_rows}
        if cfg.get("val_data") and rank == 0:
            summary.update({f"val_{k}": v for k, v in validate(model, cfg, device).items()})
        _log(records, summary, step)
        _report({k: v for k, v in summary.items() if k != "event"}, rank, None)
        epoch, done = epoch + 1, np.zeros(0, np.int64)
        if upcoming is None and step < total:  # the plan did not foresee this epoch (images were missing)
            upcoming = StartedEpoch(epoch_shard(cfg, epoch, done, rank, world), **iter_args)
    if records:
        records.close(step)
    if debug:
        debug.finish(model, ray.get_runtime_context().get_node_id(), resumed, optimizer_checksum)


def planned_steps(cfg: dict, epoch: int, world: int) -> int:
    """Steps epoch `epoch` holds by the plan (`jobs.train.plan_epochs`): (images // ranks) // batch."""
    sizes = cfg["epoch_sizes"]
    return (int(sizes[min(epoch, len(sizes) - 1)]) // world) // cfg["batch_size"]


def forward_losses(ddp_model, images, image_sizes, targets, amp_dtype, step: int) -> dict | None:
    """The losses of one step, or None on every rank when fp16 overflowed on any of them
    (the step is then skipped and the loss scale lowered, as GradScaler does for gradients)."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        try:
            losses = ddp_model(images, image_sizes, targets)
        except FloatingPointError as exc:
            if amp_dtype != torch.float16:
                raise FloatingPointError(f"step {step + 1}: {exc}") from None
            losses = None
    if amp_dtype == torch.float16:  # the ranks agree, or DDP's all-reduce would wait forever
        overflow = sum_over_ranks(int(losses is None))[0]
        return None if overflow else losses
    return losses


def _log(records, metrics: dict, flush_step: int | None) -> None:
    """Rank 0: the metrics line (a chunk at checkpoints and epoch ends) and one console line."""
    if records is None:
        return
    records.append(metrics)
    if flush_step is not None:
        records.flush(flush_step, "b" if metrics.get("event") == "epoch_end" else "a")
    # straight to the stream: Ray Train's patched print() would show the line twice
    sys.stdout.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "time") + "\n")
    sys.stdout.flush()


class DebugRecord:
    """Test records (--debug-dir, a local folder): per rank and attempt, the keys of every
    trained batch as they are trained (a killed worker leaves its lines), and at the end the
    parameter checksum and where the run resumed."""

    def __init__(self, cfg: dict, rank: int):
        self.rank, self.dir = rank, cfg["debug_dir"]
        os.makedirs(self.dir, exist_ok=True)
        self.batches = open(os.path.join(self.dir, f"batches-rank{rank}-pid{os.getpid()}.jsonl"), "a")
        self.image_ids: list[int] = []

    def batch(self, step: int, epoch: int, keys: np.ndarray) -> None:
        self.image_ids.extend((keys // MAX_COPIES).tolist())
        self.batches.write(json.dumps({"step": step, "epoch": epoch, "keys": keys.tolist()}) + "\n")
        self.batches.flush()

    def finish(self, model, node_id: str, resumed: int | None, momentum: float | None) -> None:
        self.batches.close()
        record = {"rank": self.rank, "node_id": node_id, "image_ids": self.image_ids, "resumed_from": resumed,
                  "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
                  "resumed_momentum_checksum": momentum}
        with open(os.path.join(self.dir, f"rank-{self.rank}.json"), "w") as f:
            json.dump(record, f)


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
