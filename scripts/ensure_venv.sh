#!/usr/bin/env bash
# Make ./.venv usable: a small virtual environment of this clone, running this clone's code,
# on top of a cached environment that holds the project's dependencies (torch, Ray, ...).
#
# Why two environments: torch alone is ~5.5 GB, so the dependencies are installed once per
# machine under ~/.cache/retinanet-ray/deps-<key> (key: a hash of pyproject.toml's dependency
# lists and the Python version; any change to those lists builds a new one) and shared by
# every clone. Each clone's .venv only links them in (a .pth file), holds its own editable
# install, and its own copies of the console scripts (ray, pytest, ...): two clones sharing
# the cache never run each other's code.
#
# Needs: Python >= 3.10 with its venv module (Debian/Ubuntu: apt install python3-venv) and
# network access to PyPI the first time. RETINANET_RAY_VENV_CACHE moves the cache; PYTHON
# picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

fail() { echo "error: $*" >&2; exit 2; }
command -v "$PY" >/dev/null || fail "$PY not found: install Python >= 3.10 (or set PYTHON=...)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$("$PY" -V 2>&1) is too old: this project needs Python >= 3.10 (set PYTHON=...)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$PY has no venv/ensurepip module: install it (Debian/Ubuntu: sudo apt install python3-venv)"

key=$("$PY" jobs/project_deps.py pyproject.toml --key)
cache_root=${RETINANET_RAY_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retinanet-ray}
deps="$cache_root/deps-$key"
mkdir -p "$cache_root"

# 1. The shared dependencies: built once per key, by one process at a time.
if [ ! -f "$deps/.complete" ]; then
    exec 9>"$cache_root/.lock-$key"
    if command -v flock >/dev/null; then flock 9; fi
    if [ ! -f "$deps/.complete" ]; then
        echo "[venv] creating $deps (dependencies of pyproject.toml; first time takes minutes)"
        rm -rf "${deps:?}"  # an unfinished build of ours, never a user's directory
        "$PY" -m venv "$deps"
        "$deps/bin/python" -m pip install --quiet --upgrade pip "setuptools>=68" wheel
        "$PY" jobs/project_deps.py pyproject.toml > "$deps/requirements.txt"
        "$deps/bin/python" -m pip install --quiet -r "$deps/requirements.txt"
        touch "$deps/.complete"
    fi
    exec 9>&-
fi

# 2. This clone's own .venv. Only a symlink (the old layout) or a .venv made here is replaced.
marker=.venv/.retinanet-ray-clone
if [ -L .venv ]; then
    rm .venv
elif [ -e .venv ] && [ ! -f "$marker" ]; then
    fail ".venv exists and was not made by this script: move it away (mv .venv .venv.old) and rerun"
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --without-pip .venv
fi
echo "$deps" > "$marker"

# Link the dependencies in (site.addsitedir also runs their own .pth files), and copy each
# console script of the cache with this clone's interpreter in its first line.
.venv/bin/python - "$deps" <<'PYEOF'
import os, stat, subprocess, sys, sysconfig
from pathlib import Path

deps = Path(sys.argv[1])
dep_sites = subprocess.run(
    [str(deps / "bin" / "python"), "-c",
     "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"],
    check=True, capture_output=True, text=True).stdout.split()
site = Path(sysconfig.get_paths()["purelib"])
lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(dep_sites)]
(site / "_retinanet_ray_deps.pth").write_text("\n".join(lines) + "\n")

bin_dir, python = Path(sys.prefix) / "bin", Path(sys.prefix) / "bin" / "python"
for script in (deps / "bin").iterdir():
    if script.name.startswith(("python", "activate", "Activate")) or not script.is_file():
        continue
    with open(script, "rb") as f:
        first = f.readline()
    if not (first.startswith(b"#!") and b"/bin/python" in first):  # a console script
        continue
    target = bin_dir / script.name
    target.write_bytes(f"#!{python}\n".encode() + script.read_bytes().split(b"\n", 1)[1])
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF

# This checkout, editable, in this clone's .venv only (its dependencies are all linked in).
log=$(mktemp)
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . >"$log" 2>&1 \
    || { cat "$log"; rm -f "$log"; exit 1; }
rm -f "$log"
