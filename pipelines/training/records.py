"""What a training run leaves beside its checkpoints: metrics lines, TensorBoard events, its
config, the loss curve; and the console line of each record.

Rank 0 keeps the lines since the last flush in memory and writes them as one chunk
(``metrics/chunk-<step><part>.jsonl``) at every checkpoint and epoch end, so bytes written grow with
the run, not with its square; the driver joins the chunks into ``metrics.jsonl`` when the run
ends. A chunk is named by the step it was flushed at: a rerun from an earlier checkpoint
rewrites the same names instead of adding duplicates, and lines after the last checkpoint of a
lost worker group are never written (they were not kept either).

TensorBoard (`--logger tensorboard`): each flush period is one event file written locally and
uploaded to ``tensorboard/`` under the output (any storage; TensorBoard reads every event file
of a folder). MLflow (`--logger mlflow`): metrics to the tracking server of MLFLOW_TRACKING_URI.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

from pipelines import storage
from pipelines.errors import UserError
from pipelines.training.config import TrainConfig

LOGGERS = ("tensorboard", "mlflow", "none")
CHUNKS = "metrics"


def check_logger(name: str) -> None:
    """Fail before Ray starts when the chosen logger's package is missing."""
    module = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}.get(name)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"--logger {name} needs the {module} package; pip install {module}, or --logger none") from None


class RunRecords:
    """Rank 0's metrics lines and logger events (see module docstring)."""

    def __init__(self, output: str, logger: str, run_name: str):
        self.output, self.logger, self.run_name = storage.resolve(output), logger, run_name
        self.lines: list[str] = []
        self.local = tempfile.mkdtemp(prefix="tb-") if logger == "tensorboard" else None
        self.writer = None
        if logger == "mlflow":
            import mlflow

            mlflow.set_experiment(run_name)
            mlflow.start_run(run_name=run_name)

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        step = record.get("step")
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ("step", "epoch", "time")}
        if step is None or not scalars:
            return
        if self.logger == "tensorboard":
            if self.writer is None:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(self.local, flush_secs=3600)
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        elif self.logger == "mlflow":
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)

    def flush(self, step: int, part: str = "a") -> None:
        """Write the lines (and events) since the last flush as one chunk named by `step` and
        `part` (a: the steps' lines, b: the epoch's end, c: the run's end, in that order)."""
        if self.lines:
            chunk = self.output.join(CHUNKS, f"chunk-{step:010d}{part}.jsonl").uri()
            storage.write_bytes_atomic(chunk, ("\n".join(self.lines) + "\n").encode())
            self.lines = []
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            for name in sorted(os.listdir(self.local)):
                path = os.path.join(self.local, name)
                with open(path, "rb") as f:
                    storage.write_bytes_atomic(self.output.join("tensorboard", name).uri(), f.read())
                os.remove(path)

    def close(self, step: int) -> None:
        self.flush(step, "c")
        if self.logger == "mlflow":
            import mlflow

            mlflow.end_run()


def join_metrics(output: str) -> str:
    """Concatenate the chunks into ``metrics.jsonl`` (driver, once, at the end); returns its URI."""
    root = storage.resolve(output)
    root.fs.invalidate_cache()  # the workers wrote the chunks: no stale listing of this process
    folder = root.join(CHUNKS).uri()
    chunks = sorted(u for u in storage.list_files(folder) if u.endswith(".jsonl")) if storage.exists(folder) else []
    target = root.join("metrics.jsonl").uri()
    storage.write_bytes_atomic(target, b"".join(storage.read_bytes(u) for u in chunks))
    return target


def save_config(cfg: TrainConfig) -> str:
    """The resolved options and model config as YAML beside the run."""
    import yaml

    uri = storage.resolve(cfg.output).join("config.yaml").uri()
    storage.write_bytes_atomic(uri, yaml.safe_dump(cfg.to_dict(), sort_keys=True).encode())
    return uri


def plot_loss_curve(metrics_uri: str, png_uri: str) -> None:
    """loss_curve.png: each loss term of the metrics lines over the steps, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in storage.read_bytes(metrics_uri).decode().splitlines() if line]
    records = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "classification", "bbox_regression", "objectness"):
        if any(key in r for r in records):
            ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(png_uri, buffer.getvalue())


def log(records: RunRecords | None, metrics: dict, flush_step: int | None) -> None:
    """Rank 0: the metrics line (a chunk at checkpoints and epoch ends) and one console line."""
    if records is None:
        return
    records.append(metrics)
    if flush_step is not None:
        records.flush(flush_step, "b" if metrics.get("event") == "epoch_end" else "a")
    # straight to the stream: Ray Train's patched print() would show the line twice
    fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k != "time")
    sys.stdout.write(" ".join(fields) + "\n")
    sys.stdout.flush()


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
