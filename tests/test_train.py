"""jobs.train on a local Ray instance with two CPU workers, checkpoints on moto S3.

Two real runs share the module (a 2-worker TorchTrainer run costs ~35 s here): the first one
loses a worker mid-run and must finish from its last checkpoint; the second reruns the same
command with more steps and must continue from the saved step and optimizer state.
"""
import io
import json
import os

import pytest
import torch

import retinanet
from jobs import prepare, train
from jobs.train_loop import STATE_FILE, lr_factor, momentum_checksum
from pipelines import storage
from pipelines.formats.synth import write_synth


@pytest.fixture(scope="module")
def shards_on_s3(ray_local, s3_server, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-data")
    root = tmp_path_factory.mktemp("train_synth")
    write_synth(str(root), num_images=48, image_size=96, num_classes=3, seed=3, progress=lambda line: None)
    assert prepare.main(["--images", str(root / "images"), "--annotations", str(root / "annotations.json"),
                         "--output", "s3://train-data/shards"]) == 0
    return "s3://train-data/shards"


def _argv(data, output, debug, steps, *extra):
    return ["--data", data, "--output", output, "--num-workers", "2", "--batch-size", "4", "--max-steps", str(steps),
            "--image-size", "96", "--lr", "0.02", "--checkpoint-every", "3", "--log-every", "2", "--keep", "2",
            "--debug-dir", str(debug), *extra]


def _records(debug):
    return sorted((json.loads(p.read_text()) for p in debug.glob("rank-*.json")), key=lambda r: r["rank"])


def _metrics(output):
    return [json.loads(line) for line in storage.read_bytes(f"{output}/metrics.jsonl").decode().splitlines()]


@pytest.fixture(scope="module")
def first_run(shards_on_s3, s3_server, tmp_path_factory):
    """8 steps; the last worker dies after step 5 and the group restarts from step 3."""
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-runs")
    debug = tmp_path_factory.mktemp("debug1")
    output = "s3://train-runs/run"
    code = train.main(_argv(shards_on_s3, output, debug, 8, "--fail-at-step", "5", "--max-failures", "1"))
    return output, debug, code


def test_worker_failure_resumes_from_last_checkpoint(first_run):
    output, debug, code = first_run
    assert code == 0
    assert storage.exists(f"{output}/injected-failure"), "the failure was injected"
    metrics = _metrics(output)
    assert {"event": "resumed", "step": 3} in metrics
    assert [m["step"] for m in metrics if "loss" in m][-1] == 8
    model, payload = retinanet.load_checkpoint(storage.read_bytes(f"{output}/model.pt"))
    assert payload["step"] == 8 and payload["preset"] == "tiny" and model.config.num_classes == 3
    assert [c["name"] for c in payload["categories"]] == ["circle", "square", "triangle"]
    checkpoints = [u for u in storage.list_files(f"{output}/retinanet") if u.endswith(STATE_FILE)]
    assert 1 <= len(checkpoints) <= 2, checkpoints  # --keep 2
    assert storage.exists(f"{output}/loss_curve.png")


def test_workers_see_disjoint_data_and_keep_identical_parameters(first_run):
    _, debug, _ = first_run
    records = _records(debug)
    assert [r["rank"] for r in records] == [0, 1]
    ids = [set(r["image_ids"]) for r in records]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert records[0]["param_checksum"] == records[1]["param_checksum"]
    assert all(r["resumed_from"] == 3 for r in records)


def test_rerun_continues_from_saved_step_and_optimizer_state(first_run, shards_on_s3, tmp_path):
    output, _, _ = first_run
    latest = max(u for u in storage.list_files(f"{output}/retinanet") if u.endswith(STATE_FILE))
    saved = torch.load(io.BytesIO(storage.read_bytes(latest)), weights_only=True)
    assert saved["step"] == 8
    assert train.main(_argv(shards_on_s3, output, tmp_path, 14)) == 0
    records = _records(tmp_path)
    assert all(r["resumed_from"] == 8 for r in records)
    assert records[0]["resumed_momentum_checksum"] == pytest.approx(momentum_checksum(saved["optimizer"]), rel=1e-9)
    assert records[0]["resumed_momentum_checksum"] != 0.0
    metrics = _metrics(output)
    assert {"event": "resumed", "step": 8} in metrics
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps[-1] == 14 and 2 not in steps[steps.index(8) + 1:], "continued at 8, not from 0"
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert min(losses[-3:]) < losses[0], losses  # the loss falls over the run


def test_schedule_warms_up_and_steps_down():
    assert lr_factor(0, 900, 100) == pytest.approx(0.001)
    assert lr_factor(50, 900, 100) == pytest.approx(0.5005)
    assert lr_factor(100, 900, 100) == 1.0
    assert lr_factor(600, 900, 100) == pytest.approx(0.1)
    assert lr_factor(800, 900, 100) == pytest.approx(0.01)


def test_bad_input_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.build_parser().parse_args(["--epochs", "1", "--max-steps", "3"])
    assert exit_info.value.code == 2
    from pipelines.errors import UserError

    with pytest.raises(UserError, match="--data is required"):
        train.resolve_options(["--output", str(tmp_path)])
    (tmp_path / "c.yaml").write_text("learning_rate: 3\n")
    with pytest.raises(UserError, match="unknown options"):
        train.resolve_options(["--config", str(tmp_path / "c.yaml"), "--data", "x", "--output", "y"])


def test_missing_data_fails_before_ray_starts(tmp_path):
    """A wrong --data is reported at once, not after starting a Ray instance (seconds) for it."""
    import subprocess
    import sys

    missing = tmp_path / "no-such-shards"
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(missing), "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                         if not k.startswith("RAY_")})
    assert r.returncode == 2 and str(missing) in r.stderr and "run jobs.prepare" in r.stderr
    assert not (tmp_path / "out").exists(), "nothing was started or written"
