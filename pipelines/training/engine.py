"""The per-worker training loop, run by Ray Train on every worker (`train_loop`).

Synchronized SGD (DDP through `ray.train.torch.prepare_model`) on RetinaNet, the paper's
schedule (SGD momentum 0.9, weight decay 1e-4, linear warm-up, lr x0.1 at 2/3 and 8/9 of the
run), checkpoints through `ray.train.report` (rank 0 writes them; every rank reports the same
number of times, as Ray requires), resume from `ray.train.get_checkpoint()`: the step, the
optimizer, the loss scale and the keys of the images the interrupted epoch already trained; and
a checkpoint as soon as a node is marked for preemption (`ray.train.get_preemption_info`).

A step trains --global-batch images at any world size: each rank sums its gradients over
`accumulation` micro-batches (DDP's all-reduce only on the last, `no_sync()` before), so an
elastic group (--num-workers MIN:MAX) that restarts smaller or larger keeps the schedule's
meaning. The focal-loss normalizer is the positives of the whole global batch: each micro-batch's
loss is divided by its own all-worker positives (`retinanet.losses`) and multiplied back by
them relative to the first micro-batch's, and the summed gradients are scaled by the first
one's over the step's total once all are in (`Trainer.train_step`): exact, since the gradient
is linear in the normalizer, with the loss scale of an ordinary step.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch

import retinanet
from pipelines import storage
from pipelines.images.collate import normalize_images
from pipelines.training.config import TrainConfig
from pipelines.training.distributed import sum_over_ranks
from pipelines.training.epochs import NO_KEYS, EpochFeed, EpochTally
from pipelines.training.init import initial_model
from pipelines.training.records import RunRecords, Window, log
from pipelines.training.test_hooks import Hooks
from pipelines.training.validation import validate
from retinanet.losses import last_normalizer

STATE_FILE = "train_state.pt"


def train_loop(config: dict) -> None:
    """The whole run of one rank, from its last checkpoint when there is one."""
    cfg = TrainConfig.from_dict(config)
    trainer = Trainer(cfg)
    feed = EpochFeed(cfg, trainer.rank, trainer.world)
    hooks = Hooks(cfg, trainer.rank, trainer.world, trainer.resumed, trainer.optimizer)
    while trainer.step < cfg.max_steps:
        tally, micro = EpochTally(), []
        trainer.window.fetch_started()
        for batch in feed.begin(trainer.epoch, trainer.done, trainer.step):
            # Ranks hold equal rows, so they step in lockstep and leave this loop at the same batch.
            tally.rows_read += len(batch["image_id"])
            if len(batch["image_id"]) < cfg.batch_size:
                continue  # a rank's short last batch is read, not trained (every rank has one or none)
            if trainer.step >= cfg.max_steps:
                tally.exhausted = False
                break
            micro.append(batch)
            if len(micro) < trainer.accumulation:
                continue  # an epoch's last micro-batches short of a step are read, not trained
            trainer.window.fetched()
            losses = trainer.train_step(micro)
            keys = tally.trained_batch(micro, skipped=losses is None)
            micro = []
            feed.stepped(tally.steps)
            hooks.after_step(trainer.step, trainer.epoch, keys)
            trainer.end_step(losses, tally)
            trainer.window.fetch_started()
        if not tally.exhausted:
            feed.close()
            break  # the run ended inside this epoch
        trainer.end_epoch(tally)
    trainer.finish()
    hooks.finish(trainer.model)


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 0.001) -> float:
    """Linear warm-up from `warmup_factor`, then x0.1 at 2/3 and again at 8/9 of the run."""
    decay = 0.1 ** ((step >= total_steps * 2 // 3) + (step >= total_steps * 8 // 9))
    if step < warmup_steps:
        alpha = step / warmup_steps
        return decay * (warmup_factor * (1 - alpha) + alpha)
    return decay


class Trainer:
    """One rank's model, optimizer, schedule and loss scale, and where the run stands: step,
    epoch, and the keys the current epoch trained before the checkpoint it resumed from."""

    def __init__(self, cfg: TrainConfig):
        context = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, context.get_world_rank(), context.get_world_size()
        self.accumulation = cfg.accumulation(self.world)
        torch.manual_seed(cfg.seed)
        if not cfg.use_gpu:
            torch.set_num_threads(max(1, cfg.threads_per_worker))
        self.device = ray.train.torch.get_device()
        checkpoint = ray.train.get_checkpoint()
        state = _load_state(checkpoint) if checkpoint else None
        if state is None:
            model = initial_model(cfg)
        else:  # the checkpoint holds every weight: no download, no init transfer
            model = retinanet.RetinaNet(retinanet.RetinaNetConfig.from_dict(cfg.model), categories=cfg.categories)
        if cfg.model["norm"] == "sync_bn" and self.world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.use_gpu:
            model = model.to(memory_format=torch.channels_last)
        self.ddp_model = ray.train.torch.prepare_model(model)
        self.model = getattr(self.ddp_model, "module", self.ddp_model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        total, warmup = cfg.max_steps, cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warmup))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cfg.use_gpu else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.resumed, self.done, self.resizes = 0, 0, None, NO_KEYS, 0
        if state is not None:
            self._resume(state)
        self.records = RunRecords(cfg.output, cfg.logger, cfg.name) if self.rank == 0 else None
        if self.records and self.resumed is not None:
            self.records.append({"event": "resumed", "step": self.resumed, "epoch": self.epoch,
                                 "epoch_images_done": len(self.done)})
            if self.resizes > state.get("resizes", 0):
                # From the checkpoint to here: the steps redone, the loss or growth, the restart.
                since = round(time.time() - state["saved_at"], 1) if "saved_at" in state else None
                log(self.records, {"event": "resized", "step": self.resumed, "workers_before": state["world"],
                                   "workers_after": self.world, "accumulation": self.accumulation,
                                   "seconds_since_checkpoint": since}, None)
        self.window, self.preemption_saved = Window(), False

    def _resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = self.resumed = state["step"]
        self.epoch = state.get("epoch", 0)
        before = state.get("world")  # checkpoints of older runs lack it
        self.resizes = state.get("resizes", 0) + (before is not None and before != self.world)
        self.done = state["epoch_keys"].numpy() if "epoch_keys" in state else NO_KEYS

    def train_step(self, micro: list[dict]) -> dict | None:
        """One synchronized SGD step on the micro-batches `micro`: the losses ("loss" first), or
        None where fp16 overflowed on some rank and the step was skipped like GradScaler skips it.

        Micro-batch m's loss (divided by n_m = max(p_m, 1), p_m its positives per worker) is
        back-propagated times n_m / n_1; the summed gradients are then scaled by
        n_1 / max(sum p_m, 1), the step's normalizer (module docstring). One micro-batch: the
        plain step, untouched.
        """
        self.optimizer.zero_grad(set_to_none=True)
        sums, first, total = {}, None, 0.0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            syncs = last or not hasattr(self.ddp_model, "no_sync")
            sync = contextlib.nullcontext() if syncs else self.ddp_model.no_sync()
            with sync:
                losses = self._forward(batch)
                if losses is None:  # every rank agrees (forward_losses): all skip the step here
                    break
                positives, normalizer = last_normalizer()
                first = normalizer if first is None else first
                total += positives
                loss = sum(losses.values())
                self.scaler.scale(loss if len(micro) == 1 else loss * (normalizer / first)).backward()
            for key, value in {"loss": loss, **losses}.items():
                sums[key] = sums.get(key, 0.0) + value.detach() * normalizer
        if losses is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            step_normalizer = max(total, 1.0)
            if len(micro) > 1:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(first / step_normalizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses = {"loss": loss, **losses} if len(micro) == 1 else {k: v / step_normalizer for k, v in sums.items()}
        self.scheduler.step()
        self.step += 1
        return losses

    def _forward(self, batch: dict) -> dict | None:
        cfg = self.cfg
        images = normalize_images(batch["pixels"].to(self.device, non_blocking=True), batch["image_sizes"],
                                  cfg.model["image_mean"], cfg.model["image_std"], channels_last=cfg.use_gpu)
        targets = {k: batch[k].to(self.device) for k in ("boxes", "labels", "num_boxes", "image_id")}
        return forward_losses(self.ddp_model, images, batch["image_sizes"], targets, self.amp_dtype, self.step)

    def end_step(self, losses: dict | None, tally: EpochTally) -> None:
        """The step's losses into the window; a metrics line when due; at a checkpoint step the
        checkpoint (every rank joins the gather, rank 0 saves), and model.pt at the last step."""
        cfg, step = self.cfg, self.step
        if losses is not None:
            self.window.add(cfg.global_batch, {k: v.item() for k, v in losses.items()})
        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 and self._preemption_notice():
            checkpoint_now = True
        if not (step % cfg.log_every == 0 or checkpoint_now):
            return
        metrics = {"step": step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], **self.window.summary(),
                   "time": round(time.time(), 3)}
        if tally.skipped:
            metrics["skipped_steps"] = tally.skipped
        saved = None
        if checkpoint_now:
            saved = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": step,
                     "world": self.world, "resizes": self.resizes, "saved_at": time.time(), "epoch": self.epoch,
                     "epoch_keys": torch.from_numpy(tally.keys(self.done))}
        log(self.records, metrics, step if checkpoint_now else None)
        _report(metrics, self.rank, saved)
        if self.rank == 0 and step == cfg.max_steps:
            extra = {"preset": cfg.preset, "image_size": cfg.image_size, "workers": self.world, "resizes": self.resizes}
            final = retinanet.checkpoint_bytes(self.model, step=step, metrics=metrics, extra=extra)
            storage.write_bytes_atomic(storage.resolve(cfg.output).join("model.pt").uri(), final)
        self.window.reset()

    def _preemption_notice(self) -> bool:
        """True once, at the first logging step after Ray Core marks a node of this group as
        draining for preemption (a spot reclaim with its deadline): a checkpoint then, so the
        restart that follows the loss redoes almost nothing. Every rank asks at the same steps
        (the call is a barrier and the ranks agree on its answer)."""
        if self.preemption_saved:
            return False
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        self.preemption_saved = True
        log(self.records, {"event": "preemption", "step": self.step, "nodes": sorted(info.preempted_node_to_ranks),
                           "deadline_ms": info.deadline_ms}, None)
        return True

    def end_epoch(self, tally: EpochTally) -> None:
        """The epoch_end line (counts summed over ranks, val AP by rank 0), reported by every rank."""
        summary = tally.summary(self.cfg, self.epoch, self.step, self.done)
        if self.cfg.val_data and self.rank == 0:
            summary.update({f"val_{k}": v for k, v in validate(self.model, self.cfg, self.device).items()})
        log(self.records, summary, self.step)
        _report({k: v for k, v in summary.items() if k != "event"}, self.rank, None)
        self.epoch, self.done = self.epoch + 1, NO_KEYS

    def finish(self) -> None:
        if self.records:
            self.records.close(self.step)


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
