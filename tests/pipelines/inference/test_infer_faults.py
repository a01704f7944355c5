"""jobs.infer at scale, in the small: storage outages, killed workers, racing runs, plans, pixel limits.

Outages are injected at the boundary: a proxy in front of moto (tests/support/s3_fault_proxy.py) answers
503 to chosen GETs while switched on. Runs that go through it are separate drivers joining the
session's Ray (as `ray job submit` would run them); their workers get the proxy as their S3
endpoint through the job's runtime env, the way a job's environment reaches its workers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_infer import encode, parts_of, put, read_output, scene, tiny_checkpoint

from jobs import infer
from pipelines import storage
from pipelines.errors import UserError
from pipelines.inference import plan as plans
from pipelines.inference import predictions
from tests.support.s3_fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server).start()
    yield p
    p.stop()


def driver_env(ray_local, endpoint: str | None = None, **worker_env) -> dict:
    """Environment of a separate jobs.infer driver on the session's Ray; `worker_env` reaches its workers."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = worker_env["AWS_ENDPOINT_URL"] = endpoint
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": worker_env}})
    return env


def run_driver(argv: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.infer", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def jpeg(i: int) -> bytes:
    return encode(Image.fromarray(scene(48, 64, 200 + i)), "JPEG")


# ------------------------------------------------------------------------- storage outage
def test_outage_fails_units_unwritten_then_rerun_completes_them_without_listing(ray_local, proxy, checkpoint,
                                                                                 s3_bucket):
    inputs = {f"{s3_bucket}/in/{g}{i}.jpg": jpeg(k) for k, (g, i) in enumerate(
        [(g, i) for g in "abc" for i in range(2)])}
    inputs[f"{s3_bucket}/in/c9.jpg"] = b"\xff\xd8 not really a jpeg"  # undecodable: an error row, always
    for uri, data in inputs.items():
        put(uri, data)
    out = f"{s3_bucket}/out"
    argv = ["--model", str(checkpoint), "--input", f"{s3_bucket}/in", "--output", out, "--unit-size", "2",
            "--batch-size", "2", "--image-size", "64", "--progress-every", "0"]
    env = driver_env(ray_local, proxy.url, AWS_MAX_ATTEMPTS="2")
    env["AWS_MAX_ATTEMPTS"] = "2"
    proxy.fail = lambda method, path: method == "GET" and "/in/b" in path  # unit 1 (b0, b1) cannot be read

    first = run_driver(argv, env)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "1 unit(s) not written" in first.stderr and "rerun the same command" in first.stderr
    assert proxy.failed > 0 and proxy.lists("in") >= 1
    assert sorted(predictions.unit_of(p) for p in parts_of(out)) == [0, 2, 3]  # b's unit is not written

    proxy.fail = None
    lists_before = proxy.lists("in")
    second = run_driver(argv + ["--max-error-fraction", "0.5"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "plan reused; 3 done before, 1 to run" in second.stdout
    assert proxy.lists("in") == lists_before  # the input was not listed again
    table = read_output(out)
    assert sorted(table["uri"].to_pylist()) == sorted(inputs)  # each input exactly once
    errors = {r["uri"]: r["error"] for r in table.to_pylist() if r["error"] is not None}
    assert list(errors) == [f"{s3_bucket}/in/c9.jpg"] and errors[f"{s3_bucket}/in/c9.jpg"].startswith("cannot decode")


# --------------------------------------------------------------------------- kill a worker
def test_worker_killed_mid_run_then_rerun_is_exactly_once(ray_local, checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(12):
        (images / f"{i:02d}.jpg").write_bytes(jpeg(i))
    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    argv = ["--model", str(checkpoint), "--input", str(images), "--output", str(out), "--unit-size", "2",
            "--batch-size", "2", "--image-size", "64", "--debug-sleep", "1.0"]
    env = driver_env(ray_local, INFER_DEBUG_PID_DIR=str(pids))
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs.infer", *argv], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (list(pids.iterdir()) and parts_of(str(out))) and driver.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        for pid in pids.iterdir():
            os.kill(int(pid.name), signal.SIGKILL)  # the detector actor, mid-unit
        code = driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    print(f"worker-kill run exited {code}")  # for the log: 0 = Ray restarted the actor and retried its call
    # Ray restarts the actor and retries its call, or the run fails: either way a rerun is exactly once.
    assert code in (0, 1), (tmp_path / "driver.log").read_text()[-3000:]
    assert infer.main(argv[:-2]) == 0
    table = read_output(str(out))
    assert sorted(table["uri"].to_pylist()) == sorted(str(p) for p in images.iterdir())
    assert len(parts_of(str(out))) == 6 and table["error"].null_count == 12
    assert not list(out.glob("*.tmp-*"))


# -------------------------------------------------------------------- two runs, one output
@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_runs_claim_one_plan(where, tmp_path, s3_bucket):
    output = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    settings = {"model": "m", "unit_size": 2}
    barrier = threading.Barrier(2)

    def units(n):  # both runs finish listing, then both try to claim at the same moment
        yield from ({"unit": k, "uris": [f"x{k}"], "image_ids": None} for k in range(n))
        barrier.wait(timeout=30)

    results: list = [None, None]

    def claim(i):
        results[i] = plans.claim_plan(output, settings, units(3), source="in")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    (plan_a, made_a), (plan_b, made_b) = results
    assert sorted([made_a, made_b]) == [False, True]
    assert plan_a.record == plan_b.record and plan_a.num_units == 3
    storage.resolve(output).fs.invalidate_cache()
    units_files = [f for f in storage.list_files(output) if plans.UNITS_PREFIX in f]
    assert units_files == [plan_a.units_uri]  # the loser removed its own units file
    with pytest.raises(UserError, match="other settings.*model"):
        plans.claim_plan(output, {**settings, "model": "other"}, units(1), source="in")


# ------------------------------------------------------------------------- --input-list
@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet"])
def test_input_list_formats(fmt, s3_bucket, tmp_path):
    uris = [f"{s3_bucket}/photos/{i:03d}.jpg" for i in range(5)]
    listing = f"{s3_bucket}/lists/inputs.{fmt}"
    if fmt == "txt":
        put(listing, ("\n".join(uris) + "\n\n").encode())
    elif fmt == "csv":
        put(listing, ("id,uri\n" + "".join(f"{i},{u}\n" for i, u in enumerate(uris))).encode())
    else:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"uri": uris, "size": list(range(5))}), sink)
        put(listing, sink.getvalue().to_pybytes())
    kind, units = plans.input_units(None, listing, unit_size=2)
    plan, made = plans.claim_plan(str(tmp_path / "out"), {"kind": kind}, units, source=listing)
    assert (kind, made, plan.num_units, plan.num_images) == ("list", True, 3, 5)
    table = plans.read_units(plan.units_uri, [0])
    assert [u for row in table["uris"].to_pylist() for u in row] == uris


# --------------------------------------------------------------------------- pixel limit
def test_png_above_pixel_limit_is_an_error_row_naming_its_size(ray_local, checkpoint, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(scene(48, 64, 1)).save(images / "a-small.jpg")
    Image.fromarray(scene(200, 300, 2)).save(images / "b-big.png")  # 60,000 px > 20,000
    Image.fromarray(scene(400, 400, 3)).save(images / "c-big.jpg", quality=90)  # drafted to 1/8: 2,500 px
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(images.iterdir())))
    argv = ["--model", str(checkpoint), "--input-list", str(listing), "--output", str(tmp_path / "out"),
            "--unit-size", "2", "--image-size", "48", "--max-pixels", "20000", "--max-error-fraction", "0.2"]
    assert infer.main(argv) == 1  # 1 error row in 3 images is above 0.2: rows written, run fails loudly
    assert "above --max-error-fraction 0.2" in capsys.readouterr().err
    rows = {Path(r["uri"]).name: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert rows["b-big.png"]["error"] == ("cannot decode: 300x200 = 0.1 megapixels, above the pixel limit of "
                                          "0.0 megapixels (--max-pixels)")
    for name, size in (("a-small.jpg", (64, 48)), ("c-big.jpg", (400, 400))):
        assert rows[name]["error"] is None and (rows[name]["width"], rows[name]["height"]) == size
        assert len(rows[name]["detections"]) > 0


# ----------------------------------------------------------------------------- up front
def test_local_paths_refused_on_a_multi_node_cluster():
    infer.refuse_local_paths({"--output": "/data/out", "--input": "s3://b/in"}, nodes=1, shared_mount=False)
    infer.refuse_local_paths({"--output": "/data/out"}, nodes=3, shared_mount=True)
    infer.refuse_local_paths({"--output": "s3://b/out", "--input": None}, nodes=3, shared_mount=False)
    with pytest.raises(UserError, match=r"--output /data/out: a local path on a 3-node Ray cluster.*s3://.*--shared-mount"):
        infer.refuse_local_paths({"--output": "/data/out", "--input": "s3://b/in"}, nodes=3, shared_mount=False)


def test_s3_retries_use_botocore_settings(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    fs = storage.resolve("s3://any-bucket/key").fs
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 4}
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    monkeypatch.delenv("AWS_RETRY_MODE")
    assert storage.resolve("s3://any-bucket/key").fs.config_kwargs["retries"] == {
        "mode": "adaptive", "total_max_attempts": storage.S3_MAX_ATTEMPTS}


def test_detector_pool_is_a_range():
    def pool(*flags):
        argv = ["--model", "m", "--input", "i", "--output", "o", *flags]
        return infer._pool_size(infer.build_parser().parse_args(argv))

    assert pool() == (1, 1) and pool("--use-gpu") == (1, None)  # GPUs: grow with the cluster
    assert pool("--num-actors", "3") == (3, 3) and pool("--num-actors", "2:8") == (2, 8)
    assert pool("--num-actors", "2:") == (2, None) and pool("--min-actors", "2", "--max-actors", "5") == (2, 5)


def test_progress_line_counts_units_rate_and_eta():
    from pipelines.inference.bulk import Progress

    progress = Progress(total=10, every=3600)
    progress.start -= 10.0  # ten seconds ago
    for _ in range(4):
        progress.add(25)
    line = progress.line(progress.start + 10.0)
    assert line == "progress: 4/10 units, 100 images, 10.0 images/s, ETA 0m15s"
