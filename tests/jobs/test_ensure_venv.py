"""scripts/ensure_venv.sh on a copy of this checkout: the clone's .venv runs the clone's code
and the cached environment's console scripts, and a .venv the script did not make is refused.

The cached dependencies are not rebuilt here (minutes, gigabytes): the cache entry the script
looks for is pointed at the environment running these tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _deps_prefix() -> Path:
    """The environment that holds Ray (the cache entry of this clone, or the old shared one)."""
    import ray

    prefix = Path(ray.__file__).resolve().parents[4]
    assert (prefix / "bin" / "python").exists(), prefix
    return prefix


@pytest.fixture
def clone(tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout's code and a cache whose entry for it is the running env."""
    root = tmp_path / "clone"
    for name in ("pyproject.toml", "README.md", "scripts", "jobs", "pipelines", "retinanet"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            root.mkdir(exist_ok=True)
            shutil.copy(src, root / name)
    deps = _deps_prefix()
    python = str(deps / "bin" / "python")
    key = subprocess.run([python, "jobs/project_deps.py", "pyproject.toml", "--key"], cwd=root,
                         check=True, capture_output=True, text=True).stdout.strip()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"deps-{key}").symlink_to(deps)
    (deps / ".complete").exists() or pytest.skip(f"{deps} is not a finished cache entry")
    env = {**os.environ, "RETINANET_RAY_VENV_CACHE": str(cache), "PYTHON": python}
    return root, env


def _ensure(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/ensure_venv.sh"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_clone_runs_its_own_code_and_the_cached_console_scripts(clone):
    root, env = clone
    (root / ".venv").symlink_to("/nonexistent/shared-venv")  # the old layout: replaced
    r = _ensure(root, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / ".venv").is_dir() and not (root / ".venv").is_symlink()
    code = "import jobs, ray, tqdm; print(jobs.__file__); print(ray.__version__)"
    out = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", code], cwd="/",
                         check=True, capture_output=True, text=True).stdout.split()
    assert out[0] == str(root / "jobs" / "__init__.py")  # this clone's code, wherever we are
    ray_cli = root / ".venv" / "bin" / "ray"
    assert ray_cli.read_text().startswith(f"#!{root / '.venv' / 'bin' / 'python'}\n")
    version = subprocess.run([str(ray_cli), "--version"], check=True, capture_output=True,
                             text=True, timeout=120).stdout
    assert out[1] in version
    again = _ensure(root, env)  # idempotent on its own .venv
    assert again.returncode == 0, again.stderr


def test_a_venv_it_did_not_make_is_refused_and_left_alone(clone):
    root, env = clone
    (root / ".venv").mkdir()
    (root / ".venv" / "mine.txt").write_text("keep me")
    r = _ensure(root, env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: .venv exists and was not made by this script: move it away "
        "(mv .venv .venv.old) and rerun"]
    assert (root / ".venv" / "mine.txt").read_text() == "keep me"


def test_an_old_python_is_a_one_line_error(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.18' && exit 0\nexit 1\n")
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(REPO / "scripts" / "ensure_venv.sh")], cwd=tmp_path,
                       env={**os.environ, "PYTHON": str(fake),
                            "RETINANET_RAY_VENV_CACHE": str(tmp_path / "cache")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Python 3.9.18 is too old: this project needs Python >= 3.10" in r.stderr
    assert not (tmp_path / "cache").exists()
    assert sys.version_info >= (3, 10)
