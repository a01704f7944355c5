"""Hooks for the fault-injection tests of training, and nothing else: no user needs them.

- `--fail-at-step N`: the last rank kills itself (SIGKILL, as a lost node would) right after
  step N, once per output (a marker file under --output says it happened), so that a test can
  check that Ray restarts the worker group from the last checkpoint and that the interrupted
  epoch trains every image exactly once.
- `--slow-steps S`: every rank sleeps S seconds after each step, so that a test can remove and
  add nodes while a short run is still in the middle of its steps.
- `--debug-dir DIR` (a local folder): per rank and attempt, the keys of every trained batch as
  they are trained (``batches-rank<r>-pid<p>.jsonl``, so a killed worker leaves its lines), and
  at the end ``rank-<r>.json`` with the image ids, the parameter checksum, where the run resumed
  and the resumed optimizer's momentum checksum. Tests and external tools read these files:
  their names and fields stay as they are.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import ray

from pipelines import storage
from pipelines.training.config import TrainConfig
from pipelines.training.sampling import MAX_COPIES


def failure_marker(cfg: TrainConfig) -> str:
    return storage.resolve(cfg.output).join("injected-failure").uri()


def momentum_checksum(optimizer_or_state) -> float:
    """Sum of SGD momentum buffers: tells a resumed optimizer from a fresh one."""
    state = optimizer_or_state.state_dict() if hasattr(optimizer_or_state, "state_dict") else optimizer_or_state
    return float(sum(float(s["momentum_buffer"].double().sum()) for s in state["state"].values()
                     if s.get("momentum_buffer") is not None))


class DebugRecord:
    """The --debug-dir files of one rank (see the module docstring)."""

    def __init__(self, directory: str, rank: int):
        self.rank, self.dir = rank, directory
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


class Hooks:
    """The hooks of one rank, each a no-op unless its flag is given."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, resumed: int | None, optimizer):
        self.cfg, self.rank, self.world, self.resumed = cfg, rank, world, resumed
        self.momentum = momentum_checksum(optimizer) if resumed is not None else None
        self.debug = DebugRecord(cfg.debug_dir, rank) if cfg.debug_dir else None

    def after_step(self, step: int, epoch: int, keys: np.ndarray) -> None:
        if self.debug:
            self.debug.batch(step, epoch, keys)
        if self.cfg.slow_steps:
            time.sleep(self.cfg.slow_steps)
        last_rank = self.rank == self.world - 1
        if self.cfg.fail_at_step == step and last_rank and not storage.exists(failure_marker(self.cfg)):
            storage.write_bytes_atomic(failure_marker(self.cfg), b"injected")
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies: Ray restarts the group from the last checkpoint

    def finish(self, model) -> None:
        if self.debug:
            self.debug.finish(model, ray.get_runtime_context().get_node_id(), self.resumed, self.momentum)
