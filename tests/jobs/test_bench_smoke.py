"""Every benchmark under bench/ still runs: each script, in a fresh process, in its smallest real
mode (toy sizes, one round, two steps), writing its result to a temporary folder, never to
bench/results/. Benchmarks are no tests and nothing else runs them, so an import that moved (as
bench/infer.py's `_stat_fields` once did, from bench/ingest.py to bench/proctree.py) would
otherwise show only when someone next wants a figure. Each result must carry its provenance.

Reduced where the smallest real run would not take seconds here:
- runtimes.py: `--skip-e2e` (network only; the end-to-end part is jobs.infer five times over,
  which tests/pipelines/inference/test_infer.py covers);
- infer.py: `--memory-images` with no count (figure 1 only: the fresh-process memory runs would
  start two more Ray instances);
- train.py: two steps of jobs.train at 64 px, one round; longtail.py the same, with
  `--losses seesaw` (one jobs.train run, not two: each costs ~30 s of Ray Train here).
bench/gpu.sh --dry-run runs gpu_model.py, gpu_input.py and gpu_runtimes.py in their own dry
runs on the CPU, with RESULTS so that they write their JSONs.

Scripts with Ray start their own local one (RAY_ADDRESS emptied), each under a timeout, one
after the other: run side by side on two cores they took longer, not shorter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def run(argv: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """`argv` from the project root, with a local Ray of its own where it starts one; fails with
    the output's tail."""
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-5000:]}"
    return done


def script(name: str, *args) -> subprocess.CompletedProcess:
    return run([sys.executable, str(BENCH / name), *map(str, args)])


def provenance_of(path: Path) -> dict:
    data = json.loads(path.read_text())
    record = data[-1] if isinstance(data, list) else data  # evaluate.py appends runs to a list
    origin = record["provenance"]
    assert {"commit", "dirty", "command", "date_utc", "machine", "versions"} <= set(origin)
    assert origin["machine"]["cores"] and origin["versions"]["python"]
    return origin


def header(done: subprocess.CompletedProcess) -> dict:
    """The provenance line a text result starts with."""
    first = done.stdout.splitlines()[0]
    assert first.startswith("provenance: "), first
    return json.loads(first.removeprefix("provenance: "))


def test_provenance_without_git():
    """The GPU machines may lack git: the commit is then None, and nothing raises."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); from provenance import provenance; "
            "print(json.dumps(provenance('given command')))")
    origin = json.loads(run([sys.executable, "-c", code], PATH="/nonexistent").stdout)
    assert origin["commit"] is None and origin["dirty"] is None and origin["command"] == "given command"
    assert origin["machine"]["cores"] == os.cpu_count()


def test_model():
    header(script("model.py", "--smoke"))


def test_ingest():
    done = script("ingest.py", "--num-images", 8, "--image-size", 64, "--resize", 64, "--max-size", 64,
                  "--batch-size", 4, "--epochs", 2, "--rounds", 1, "--memory-sizes", 8, "--memory-shard-sizes", 8)
    header(done)
    assert "Ray vs DataLoader" in done.stdout


def test_train(tmp_path):
    done = script("train.py", "--images", 16, "--steps", 2, "--warmup", 1, "--batch", 2, "--size", 64,
                  "--rounds", 1, "--save", tmp_path / "train.json")
    assert header(done)["command"]
    provenance_of(tmp_path / "train.json")


def test_infer_job(tmp_path):
    script("infer.py", "--num-images", 10, "--memory-images", "--batch-size", 2, "--image-size", 64,
           "--output", tmp_path / "infer.json")
    provenance_of(tmp_path / "infer.json")


def test_infer_device(tmp_path):
    script("infer.py", "--device", "cpu", "--preset", "tiny", "--num-images", 8, "--batch-size", 2,
           "--image-size", 64, "--decode-threads", 1, "--output", tmp_path / "device.json")
    provenance_of(tmp_path / "device.json")


def test_infer_scale(tmp_path):
    script("infer_scale.py", "--list-sizes", 1000, 2000, "--listing-keys", 50, "--writers", 1, 2, "--parts", 4,
           "--output", tmp_path / "scale.json")
    provenance_of(tmp_path / "scale.json")


def test_evaluate(tmp_path):
    script("evaluate.py", "--images", 20, "--detections", 5, "--files", 2, "--save", tmp_path / "evaluate.json")
    provenance_of(tmp_path / "evaluate.json")


def test_ablation(tmp_path):
    script("ablation.py", "--steps", 2, "--warmup", 1, "--batch-size", 2, "--num-train", 4, "--num-val", 2,
           "--seeds", 0, "--rows", 3, 0, "--num-classes", 12, "--canvas", 96, "--tile", 64,
           "--out", tmp_path / "ablation.json")
    provenance_of(tmp_path / "ablation.json")
    report = script("ablation_report.py", tmp_path / "ablation.json", "--plots", tmp_path / "ablation").stdout
    assert "| FL gamma 2, alpha .25 | 1 |" in report and (tmp_path / "ablation-gamma.png").is_file()


def test_longtail(tmp_path):
    script("longtail.py", "--num-images", 16, "--num-classes", 3, "--steps", 2, "--batch-size", 2, "--size", 64,
           "--losses", "seesaw", "--output", tmp_path)
    provenance_of(tmp_path / "results.json")


def test_runtimes(tmp_path):
    script("runtimes.py", "--preset", "tiny", "--image-size", 64, "--batch-size", 1, "--repeats", 1, "--skip-e2e",
           "--output", tmp_path / "runtimes.json")
    provenance_of(tmp_path / "runtimes.json")


def test_gpu_scripts_dry_run(tmp_path):
    run(["bash", str(BENCH / "gpu.sh"), "--dry-run"], PYTHON=sys.executable, RESULTS=str(tmp_path))
    for name in ("model-gpu.json", "train-input-gpu.json", "runtimes-gpu.json"):
        assert provenance_of(tmp_path / name)["versions"]["torch"]
