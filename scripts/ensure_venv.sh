#!/usr/bin/env bash
# Make ./.venv usable: a virtual environment holding the project's dependencies (torch,
# torchvision, Ray, ...) plus this checkout installed in editable mode.
#
# Why a cache: torch alone is ~5.5 GB. A fresh clone (CI clones main anew each run) links
# .venv to a shared environment under ~/.cache keyed by a hash of the dependency lists in
# pyproject.toml; any change to those lists builds a new one. The dependencies are installed
# by pip from pyproject.toml every time a key is new, so the cache only skips repeat work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

key=$("$PY" - <<'PYEOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [project["dependencies"], project.get("optional-dependencies", {}), sys.version_info[:2]]
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
PYEOF
)
cache_root=${RETINANET_RAY_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retinanet-ray}
venv="$cache_root/venv-$key"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "[venv] creating $venv (dependencies of pyproject.toml; first time takes minutes)"
    rm -rf "$venv"
    mkdir -p "$cache_root"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # Dependencies only; the checkout itself is linked in below, per clone.
    deps=$("$PY" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["test"]))
PYEOF
)
    echo "$deps" > "$venv/requirements.txt"
    "$venv/bin/pip" install --quiet -r "$venv/requirements.txt"
    touch "$venv/.complete"
fi

if [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then
    rm -rf .venv
    ln -s "$venv" .venv
fi
# Editable install of this checkout (no dependency resolution: they are all present above).
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e . >/tmp/retinanet-ray-editable.log 2>&1 || { cat /tmp/retinanet-ray-editable.log; exit 1; }
