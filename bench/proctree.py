"""CPU and memory of a whole process tree from /proc, by process role: what a benchmark needs to
account for every CPU-second of a Ray job (driver, raylet, Ray Data tasks, Train workers, ...).

CPU time per image hardly changes with other load on the machine, unlike images/s, so it is
the fair comparison on a shared box: capacity on N idle cores ~ N / CPU-seconds per image.
"""
from __future__ import annotations

import os
import re
import threading
import time


def _stat_fields(pid: int | str, task: str = "") -> list[str] | None:
    """Fields of /proc/PID[/task/TID]/stat after the command name (field 3 onwards); None if gone."""
    try:
        with open(f"/proc/{pid}{task}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(roots: list[int]) -> list[int]:
    """`roots` and all their descendants (Ray's raylet and workers, DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat_fields(int(entry)) if entry.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, stack = [], list(roots)
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def cpu_seconds(roots: list[int]) -> dict[int, float]:
    """user+system CPU seconds of each live process in the trees under `roots`, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    seen = {}
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields:
            seen[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return seen


def memory_bytes(pid: int, key: str) -> int:
    """A "Key: N kB" line of /proc/PID/smaps_rollup (Pss, Rss); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def role(pid: int) -> str:
    """What a process is, from its command line: Ray sets worker titles to ``ray::<actor or task>``
    (``ray::IDLE`` between tasks); system processes by executable name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "gone"
    first = argv[0].decode(errors="replace")
    executable = os.path.basename(first)
    if executable in ("raylet", "gcs_server"):
        return executable
    if first.startswith("ray::"):
        name = first[5:].split(" ")[0]
        if name.startswith(("ReadParquet", "MapBatches", "Map(", "MapWorker", "RandomShuffle", "Repartition",
                            "ReadRange", "FromItems", "Filter", "split_")) or "->" in name:
            return "Ray Data tasks"
        return "ray::" + re.split(r"[.(]", name)[0]
    if first.startswith("ray-dashboard-"):
        return "dashboard"
    text = " ".join(a.decode(errors="replace") for a in argv)
    for key, label in (("default_worker.py", "ray worker (starting)"), ("dashboard/agent", "dashboard agent"),
                       ("runtime_env/agent", "runtime-env agent"), ("dashboard.py", "dashboard"),
                       ("multiprocessing.forkserver", "dashboard"), ("log_monitor", "log monitor"),
                       ("monitor.py", "autoscaler monitor"), ("moto", "moto S3")):
        if key in text:
            return label
    return os.path.basename(first) or "?"


IDLE = ("ray::IDLE", "ray worker (starting)")


class CpuSampler:
    """Samples the CPU seconds and role of every process under `roots` every `interval` s in a
    thread, so that CPU per role between two wall-clock times can be read afterwards. A pooled
    Ray worker changes role from task to task: each interval's CPU goes to the role the process
    had at its end (or at its start, when it was idle by then)."""

    def __init__(self, roots: list[int], interval: float = 0.2):
        self.roots, self.interval = roots, interval
        self.samples: list[tuple[float, dict[int, tuple[float, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = {pid: (cpu, role(pid)) for pid, cpu in cpu_seconds(self.roots).items()}
            seen[0] = (machine_busy_seconds(), "machine")
            self.samples.append((time.time(), seen))
            self._stop.wait(self.interval)

    def by_role(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per role between wall-clock times `start` and `end` (to the sampling interval)."""
        window = [s for t, s in self.samples if start <= t <= end]
        out: dict[str, float] = {}
        for before, after in zip(window, window[1:]):
            for pid, (cpu, name) in after.items():
                was_cpu, was_name = before.get(pid, (cpu, name))  # a process born in this interval: from now on
                label = was_name if name in IDLE and was_name not in IDLE else name
                out[label] = out.get(label, 0.0) + cpu - was_cpu
        out["outside this process tree"] = out.pop("machine", 0.0) - sum(out.values())
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
