"""Where a benchmark figure comes from, written beside it: a number in bench/results/ is worth
little once nobody knows which commit, command, machine and library versions produced it, or how
loaded the (often shared) machine was.

`provenance()` never fails: the GPU machines run these scripts from a copy of the tree with
neither git nor Ray, so whatever cannot be found is None. It imports nothing heavy (versions come
from the installed packages' metadata unless the module is loaded already), so it costs a script
well under a second.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "ray", "onnxruntime", "openvino")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_name() -> str | None:
    """The first GPU's name where torch sees one; a failing driver counts as none."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - provenance must not take a benchmark down
        return None


def _version(package: str) -> str | None:
    """The loaded module's own __version__ (what ran), else the installed distribution's; None if absent."""
    module = sys.modules.get(package)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(package)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return None


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def provenance(command: str | None = None) -> dict:
    """Commit (None without git), whether Python files differ from it (the code is what the figures
    depend on; docs and results do not count), the command line (default: this process's), UTC
    time, CPU model and cores, GPU name (None without one), library versions (None where a library
    is not installed) and the 1/5/15-minute load average."""
    status = _git("status", "--porcelain", "--", "*.py")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
        "command": command or shlex.join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": _gpu_name(), "load_average": _load_average()},
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
    }
