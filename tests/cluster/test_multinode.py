"""Several nodes for real: a multi-node cluster on this machine, and jobs submitted to a real head.

Neither may live in the pytest process, which holds the suite's one local Ray (`ray_local`):

- `multinode_driver.py` runs in a subprocess: `ray.cluster_utils.Cluster` with a CPU-less head and
  two 2-CPU worker nodes, a 2-worker `jobs.train --placement SPREAD` run, a `jobs.infer` run
  whose detector's node is removed mid-run, then an elastic 1:2-worker `jobs.train` run that loses
  a node and gets one back. One cluster serves them all (starting it and a 2-worker Train run
  each cost tens of seconds here); the tests below check what it left behind.
- `ray start --head` in a subprocess (private temp dir, free ports, its own token), to which
  `jobs.submit` sends a training job, an inference job and a failing job, as a user would.

Teardown kills only this file's process groups and processes naming its private temp dirs.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import retinanet
from pipelines.training.sampling import MAX_COPIES
from tests.support.multinode_driver import ELASTIC_GLOBAL, ELASTIC_STEPS, INFER_UNIT, NUM_IMAGES
from tests.support.ray_head import clean_env, stop_head

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "support" / "multinode_driver.py"
DRIVER_TIMEOUT_S = 840

pytestmark = pytest.mark.slow


def _tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} missing)"


def _read_parts(folder: Path):
    parts = sorted(folder.glob("part-*.parquet"))
    return parts, (pq.read_table(parts) if parts else None)


# --- a head and two worker nodes (ray.cluster_utils.Cluster) -----------------------------------

@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """Run the driver once; yield its result.json, work dir and log. Its cluster is gone by then."""
    work = tmp_path_factory.mktemp("multinode")
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths are limited
    env = clean_env(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                     RAY_USAGE_STATS_ENABLED="0")
    log_path = work / "driver.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(work)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        finally:
            timed_out = proc.poll() is None
            stop_head(proc, temp_dir)  # the driver's group (cluster, jobs.infer) and stragglers
            shutil.rmtree(temp_dir, ignore_errors=True)
    result_path = work / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"timings": {}}
    print(f"multinode driver: exit {proc.returncode} in {time.monotonic() - started:.0f} s; "
          f"phases {result['timings']}")
    yield {"result": result, "work": work, "code": proc.returncode, "timed_out": timed_out,
           "log": _tail(log_path)}


def _phase(multinode, key: str):
    """The driver's value for `key`, or a failure that shows the driver's log."""
    if multinode["timed_out"]:
        pytest.fail(f"the multinode driver ran past {DRIVER_TIMEOUT_S} s:\n{multinode['log']}")
    if key not in multinode["result"]:
        pytest.fail(f"the multinode driver did not get to {key!r} (exit {multinode['code']}):\n{multinode['log']}")
    return multinode["result"][key]


def test_cluster_has_a_head_and_two_worker_nodes(multinode):
    assert _phase(multinode, "cluster_cpus") == 4.0  # 0 on the head, 2 + 2 on the workers
    nodes = [_phase(multinode, "head_node"), *_phase(multinode, "worker_nodes")]
    assert len(set(nodes)) == 3
    assert _phase(multinode, "prepare_code") == 0
    assert (multinode["work"] / "shards" / "manifest.json").is_file()
    assert "shutdown" in multinode["result"]["timings"], multinode["log"]  # it shut its cluster down


def test_spread_training_places_workers_on_different_nodes_and_finishes(multinode):
    assert _phase(multinode, "train_code") == 0, multinode["log"]
    debug = Path(_phase(multinode, "train_debug"))
    records = sorted((json.loads(p.read_text()) for p in debug.glob("rank-*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1]
    nodes = [r["node_id"] for r in records]
    assert nodes[0] != nodes[1], "SPREAD put both workers on one node"
    assert set(nodes) == set(multinode["result"]["worker_nodes"])  # the head has no CPUs for a worker
    # Synchronized SGD across the two nodes: disjoint data, identical weights after 4 steps.
    ids = [set(r["image_ids"]) for r in records]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert records[0]["param_checksum"] == records[1]["param_checksum"]
    assert all(r["resumed_from"] is None for r in records)
    output = Path(_phase(multinode, "train_output"))
    assert (output / "model.pt").is_file()
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 4


def test_inference_survives_losing_the_detector_node_with_one_row_per_input(multinode):
    code = _phase(multinode, "infer_code")
    infer_log = multinode["work"] / "infer.log"
    assert code == 0, _tail(infer_log)
    units = NUM_IMAGES // INFER_UNIT
    # Mid-run: some parts were written, not all of them, when the detector's node went away ...
    assert 1 <= multinode["result"]["parts_at_removal"] < units
    removed, survivor = multinode["result"]["removed_node"], multinode["result"]["surviving_node"]
    assert removed in multinode["result"]["worker_nodes"] and survivor != removed
    # ... and the detector came back on the node that was left.
    assert survivor in multinode["result"]["detector_nodes_after_removal"], _tail(infer_log)
    parts, table = _read_parts(Path(multinode["result"]["infer_output"]))
    assert len(parts) == units
    inputs = sorted(p.name for p in (multinode["work"] / "synth" / "images").iterdir())
    assert len(inputs) == NUM_IMAGES
    uris = table.column("uri").to_pylist()
    assert table.num_rows == len(set(uris)) == NUM_IMAGES, "each input exactly once"
    assert sorted(Path(u).name for u in uris) == inputs
    assert table.column("error").null_count == NUM_IMAGES
    assert f"done: {NUM_IMAGES} images (0 errors)" in _tail(infer_log, 20000)


def _attempts(debug: Path) -> list[list[dict]]:
    """The batches each worker-group attempt trained, in order of the step it started at (its
    ranks' files merged), each cut at the step the next attempt resumed from: what the run kept."""
    by_start: dict[int, list[dict]] = {}
    for path in debug.glob("batches-*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        if records:
            by_start.setdefault(records[0]["step"], []).extend(records)
    starts = sorted(by_start)
    return [[r for r in by_start[s] if r["step"] < (starts[i + 1] if i + 1 < len(starts) else 10**9)]
            for i, s in enumerate(starts)]


def test_elastic_training_shrinks_on_node_loss_grows_back_and_trains_each_image_once(multinode):
    assert _phase(multinode, "elastic_code") == 0, _tail(multinode["work"] / "elastic.log")
    output, debug = Path(_phase(multinode, "elastic_output")), Path(_phase(multinode, "elastic_debug"))
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
    resized = [m for m in metrics if m.get("event") == "resized"]
    assert [(m["workers_before"], m["workers_after"]) for m in resized] == [(2, 1), (1, 2)], \
        "one worker after the node loss, two once a node came back"
    notices = [m for m in metrics if m.get("event") == "preemption"]
    assert len(notices) == 1 and notices[0]["nodes"] == [multinode["result"]["elastic_events"]["removed_node"]]
    assert resized[0]["step"] == notices[0]["step"], "the shrunk group resumed from the checkpoint of the notice"
    assert [m["step"] for m in metrics if "loss" in m][-1] == ELASTIC_STEPS
    _, payload = retinanet.load_checkpoint((output / "model.pt").read_bytes())
    assert payload["step"] == ELASTIC_STEPS and payload["resizes"] == 2 and payload["workers"] == 2
    attempts = _attempts(debug)
    assert len(attempts) == 3, [a[0]["step"] for a in attempts]
    ranks_per_attempt = [len({r["step"] for r in a}) and len(a) // len({r["step"] for r in a}) for a in attempts]
    assert ranks_per_attempt == [2, 1, 2]  # one record per rank per step
    steps: dict[int, list[int]] = {}
    epochs: dict[int, list[int]] = {}
    for record in (r for a in attempts for r in a):
        steps.setdefault(record["step"], []).extend(record["keys"])
        epochs.setdefault(record["epoch"], []).extend(k // MAX_COPIES for k in record["keys"])
    assert sorted(steps) == list(range(1, ELASTIC_STEPS + 1)), "every step kept once"
    assert {len(keys) for keys in steps.values()} == {ELASTIC_GLOBAL}, "the global batch at every world size"
    per_epoch = NUM_IMAGES // ELASTIC_GLOBAL
    assert sorted(epochs) == list(range(ELASTIC_STEPS // per_epoch))
    for epoch, ids in epochs.items():
        assert sorted(ids) == list(range(1, NUM_IMAGES + 1)), f"epoch {epoch}: each image exactly once"
    costs = multinode["result"]["elastic_costs"]
    assert costs["shrink"]["seconds_to_next_step"] > 0 and costs["grow"]["seconds_to_next_step"] > 0
    print(f"elastic resize costs: {costs}")


# --- jobs.submit to a head started with `ray start --head` -------------------------------------

SUBMIT_IMAGES = 16


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """A synthetic COCO layout (jobs.train reads it as is) and an untrained checkpoint."""
    import retinanet
    from pipelines.formats.synth import write_synth

    root = tmp_path_factory.mktemp("submit_inputs")
    write_synth(str(root / "synth"), num_images=SUBMIT_IMAGES, image_size=96, num_classes=3, seed=1,
                progress=lambda line: None)
    model = retinanet.build("tiny", num_classes=3)
    (root / "model.pt").write_bytes(retinanet.checkpoint_bytes(model))
    return root


def _submit_job(ray_head, job: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.submit", "--address", ray_head["address"], "--requirements", "none",
           "--working-dir", str(REPO), "--submit-timeout", "180", "--", *job]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(RAY_AUTH_TOKEN=ray_head["token"]), capture_output=True,
                          text=True, timeout=timeout)


def _shown(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-5000:]}\n--- stderr\n{r.stderr[-5000:]}"


def test_submitted_training_job_succeeds_and_writes_its_model(ray_head, job_inputs, tmp_path):
    # One Train worker: workers across nodes are the Cluster test's; this one is about the route.
    out = tmp_path / "train"
    r = _submit_job(ray_head, ["python", "-m", "jobs.train", "--data", str(job_inputs / "synth"), "--output", str(out),
                           "--num-workers", "1", "--batch-size", "4", "--max-steps", "2", "--image-size", "96",
                           "--log-every", "1", "--checkpoint-every", "2"])
    assert r.returncode == 0, _shown(r)
    assert "SUCCEEDED" in r.stderr and "done: step 2" in r.stdout, _shown(r)  # the job's own log, streamed
    assert (out / "model.pt").is_file() and (out / "metrics.jsonl").is_file()


def test_submitted_inference_job_succeeds_and_writes_one_row_per_image(ray_head, job_inputs, tmp_path):
    out = tmp_path / "predictions"
    r = _submit_job(ray_head, ["python", "-m", "jobs.infer", "--model", str(job_inputs / "model.pt"),
                           "--input", str(job_inputs / "synth" / "images"), "--output", str(out),
                           "--batch-size", "4", "--unit-size", "8"])
    assert r.returncode == 0, _shown(r)
    assert "SUCCEEDED" in r.stderr and f"done: {SUBMIT_IMAGES} images" in r.stdout, _shown(r)
    parts, table = _read_parts(out)
    assert len(parts) == SUBMIT_IMAGES // 8
    assert table.num_rows == len(set(table.column("uri").to_pylist())) == SUBMIT_IMAGES


def test_failing_job_makes_submit_exit_non_zero_and_shows_the_error(ray_head, tmp_path):
    missing = tmp_path / "no-such-shards"
    r = _submit_job(ray_head, ["python", "-m", "jobs.train", "--data", str(missing), "--output", str(tmp_path / "out"),
                           "--max-steps", "1"], timeout=240)
    assert r.returncode == 2, _shown(r)  # the job's own exit code: a user error
    assert "FAILED (exit code 2)" in r.stderr, _shown(r)
    # The job's one-line error, naming the missing folder, is on submit's stderr after the verdict
    # (not only in the streamed log, which also echoes the entrypoint with the same path).
    after_verdict = r.stderr.split("FAILED (exit code 2)", 1)[1]
    assert f"error: {missing}: neither a shards folder" in after_verdict, _shown(r)
