"""jobs.train on a local Ray instance with two CPU workers, checkpoints on moto S3.

Two real runs share the module (a 2-worker TorchTrainer run costs ~35 s here): the first one
loses a worker (SIGKILL) mid-epoch and must finish from its last checkpoint, training every
image of the interrupted epoch exactly once; the second reruns the same command with more
steps and must continue from the saved step and optimizer state. A third, one-worker run
reads a COCO layout with missing files and must still end at its planned step.
"""
import io
import json
import os

import pytest
import torch

import retinanet
from jobs import prepare, train
from pipelines import storage
from pipelines.formats.synth import write_synth
from pipelines.training.engine import STATE_FILE, lr_factor
from pipelines.training.sampling import MAX_COPIES
from pipelines.training.test_hooks import momentum_checksum

pytestmark = pytest.mark.slow


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
    assert {"event": "resumed", "step": 3, "epoch": 0, "epoch_images_done": 24} in metrics
    assert [m["step"] for m in metrics if "loss" in m][-1] == 8
    model, payload = retinanet.load_checkpoint(storage.read_bytes(f"{output}/model.pt"))
    assert payload["step"] == 8 and payload["preset"] == "tiny" and model.config.num_classes == 3
    assert [c["name"] for c in payload["categories"]] == ["circle", "square", "triangle"]
    checkpoints = [u for u in storage.list_files(f"{output}/retinanet") if u.endswith(STATE_FILE)]
    assert 1 <= len(checkpoints) <= 2, checkpoints  # --keep 2
    assert storage.exists(f"{output}/loss_curve.png")


def _batches(debug):
    """{(rank, pid): [{"step", "epoch", "keys"}, ...]} of every attempt, as trained."""
    return {(p.name.split("-")[1], p.name.split("-")[2]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in debug.glob("batches-*.jsonl")}


def test_interrupted_epoch_trains_every_image_exactly_once(first_run):
    """48 images, 2 workers x 4: 6 steps per epoch; checkpoint at 3, a worker killed after 5."""
    _, debug, _ = first_run
    attempts = _batches(debug)
    assert len(attempts) == 4, "two ranks, each started twice"
    first = [a for a in attempts.values() if a[0]["step"] == 1]
    second = [a for a in attempts.values() if a[0]["step"] == 4]
    assert len(first) == len(second) == 2
    assert max(b["step"] for a in first for b in a) == 5, "killed after step 5"
    # what counts from the lost attempt: the steps its checkpoint kept (1-3)
    epoch0 = [k for a in first for b in a if b["step"] <= 3 for k in b["keys"]]
    epoch0 += [k for a in second for b in a if b["epoch"] == 0 for k in b["keys"]]
    image_ids = [k // MAX_COPIES for k in epoch0]
    assert sorted(image_ids) == list(range(1, 49)), "every image of the interrupted epoch once"
    assert [b["step"] for b in second[0]] == [4, 5, 6, 7, 8] and {b["epoch"] for b in second[0] if b["step"] > 6} == {1}
    # the next epoch is a new order: its first batches are not epoch 0's first batches
    assert set(second[0][3]["keys"]) != set(first[0][0]["keys"])


def test_workers_see_disjoint_data_and_keep_identical_parameters(first_run):
    _, debug, _ = first_run
    records = _records(debug)
    assert [r["rank"] for r in records] == [0, 1]
    resumed = {rank: a for (rank, _), a in _batches(debug).items() if a[0]["step"] == 4}
    for epoch in (0, 1):  # within an epoch, the ranks' images are disjoint
        ids = [{k for b in resumed[rank] if b["epoch"] == epoch for k in b["keys"]} for rank in ("rank0", "rank1")]
        assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert sum(len(r["image_ids"]) for r in records) == 5 * 8
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
    assert {"event": "resumed", "step": 8, "epoch": 1, "epoch_images_done": 16} in metrics
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


def test_config_values_are_typed_by_the_flags_parser(tmp_path):
    from pipelines.errors import UserError

    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nbatch_size: 2\nuse_gpu: false\nscale_jitter: [0.8, 1.2]\nepochs: 3\n")
    options = train.resolve_options(["--config", str(config), "--data", "d", "--output", "o", "--max-steps", "9"])
    assert options.lr == 0.001 and isinstance(options.lr, float)  # YAML reads 1e-3 as a string
    assert options.batch_size == 2 and options.scale_jitter == [0.8, 1.2] and options.use_gpu is False
    assert options.max_steps == 9 and options.epochs is None, "the command line's run length wins"
    config.write_text("batch_size: eight\n")
    with pytest.raises(UserError, match=r"c\.yaml: argument --batch-size: invalid int value: 'eight'"):
        train.resolve_options(["--config", str(config), "--data", "d", "--output", "o"])
    config.write_text("preset: r18\n")
    with pytest.raises(UserError, match="c.yaml: argument --preset: invalid choice"):
        train.resolve_options(["--config", str(config), "--data", "d", "--output", "o"])


def test_missing_images_shorten_epochs_instead_of_stalling(ray_local, synth_coco, tmp_path):
    """24 listed images, 10 missing (more than a global batch of 4): epochs end when their data
    ends, and the run still stops at its planned step (24 // 4 = 6 for its one planned epoch)."""
    import shutil

    data = tmp_path / "coco"
    shutil.copytree(synth_coco, data)
    for name in sorted(p.name for p in (data / "images").iterdir())[:10]:
        (data / "images" / name).unlink()
    output = tmp_path / "run"
    assert train.main(["--data", str(data), "--output", str(output), "--num-workers", "1", "--batch-size", "4",
                       "--epochs", "1", "--image-size", "64", "--log-every", "100", "--checkpoint-every", "100",
                       "--logger", "tensorboard"]) == 0
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    ends = [m for m in metrics if m.get("event") == "epoch_end"]
    assert [m["step"] for m in ends] == [3, 6], "14 readable images: 3 steps an epoch"
    assert all(m["missing_or_undecodable"] == 10 and m["read"] == 14 and m["rank_tails"] == 2 for m in ends)
    assert [m["step"] for m in metrics if "loss" in m][-1] == 6
    assert list((output / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard events under the output"
    import yaml

    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["max_steps"] == 6 and saved["model"]["min_size"] == 64 and saved["data"] == str(data)


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


def test_missing_shard_fails_before_ray_starts(tmp_path):
    """A shard the manifest lists but the folder lacks is named at once, with exit code 2."""
    import subprocess
    import sys

    from pipelines.formats.shards import Manifest

    data = tmp_path / "shards"
    data.mkdir()
    shards = [{"file": f"shard-{i:05d}.parquet", "num_images": 8, "num_bytes": 1} for i in range(2)]
    (data / shards[0]["file"]).write_bytes(b"present")
    (data / "manifest.json").write_bytes(Manifest(categories=[{"id": 1, "name": "cell"}], num_images=16,
                                                  shards=shards).to_json())
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--data", str(data), "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                         if not k.startswith("RAY_")})
    assert r.returncode == 2 and "1 of the 2 shards" in r.stderr and "shard-00001.parquet" in r.stderr, r.stderr
    assert "shard-00000.parquet" not in r.stderr and not (tmp_path / "out").exists()


def test_next_epoch_input_is_requested_ahead_and_yields_every_batch_once(ray_local):
    """StartedBatches asks for its first batch at once, in a thread (the next epoch's shuffle runs
    while the current epoch trains); iterating it later gives every row once, a failure in the
    data surfaces in the training thread, and `close` stops an epoch a run no longer needs."""
    import ray

    from pipelines.training.epochs import StartedBatches

    def fail_on_row_5(batch):  # defined here: Ray's workers cannot import the test module
        if 5 in batch["id"]:
            raise ValueError("boom at row 5")
        return batch

    started = StartedBatches(ray.data.range(10).iterator(), batch_size=4)
    started._thread.join(timeout=120)
    assert not started._thread.is_alive() and started._first is not StartedBatches._END, "fetched before iterating"
    batches = [b["id"].tolist() for b in started]
    assert sorted(sum(batches, [])) == list(range(10)) and [len(b) for b in batches] == [4, 4, 2]
    assert list(StartedBatches(ray.data.range(10).filter(lambda row: False).iterator(), batch_size=4)) == []
    failing_rows = ray.data.range(8, override_num_blocks=2).map_batches(fail_on_row_5)
    failing = StartedBatches(failing_rows.iterator(), batch_size=4)
    with pytest.raises(Exception, match="boom at row 5"):
        list(failing)
    ahead = StartedBatches(ray.data.range(1000, override_num_blocks=50).iterator(), batch_size=10)
    ahead.close()  # a run that ends before the epoch it started: the execution stops
    assert list(ahead) == []


def test_next_epoch_input_starts_early_enough_and_no_earlier():
    """The next epoch starts `1.5 x ready time` (in steps) plus 2 steps before this one ends:
    earlier, its finished first blocks would wait unread while Ray Data's loop spins."""
    from pipelines.training.epochs import next_epoch_start_step

    assert next_epoch_start_step(100, ready_seconds=4.0, step_seconds=0.5) == 100 - 12 - 2
    assert next_epoch_start_step(100, ready_seconds=0.0, step_seconds=0.5) == 98
    assert next_epoch_start_step(10, ready_seconds=60.0, step_seconds=0.5) == 0  # slow start: at once
    assert next_epoch_start_step(10, ready_seconds=1.0, step_seconds=0.0) == 0
