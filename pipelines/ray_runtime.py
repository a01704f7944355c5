"""Connecting to Ray the same way in every job.

With RAY_ADDRESS set (a cluster, `ray job submit`) jobs join that cluster. Otherwise they start
their own local instance (never one that happens to run on the same machine) sized on purpose:
on a 2-core machine the default (logical CPUs = cores) lets two Train workers take every CPU and
starve Ray Data, and the run hangs without an error.

The local instance runs its dashboard, and every process in it is told where that dashboard is
(RAY_API_SERVER_ADDRESS). Ray Train's placement-group cleaner asks the state API once a second
whether the train controller is alive; left to find "the" cluster itself it warns every second
when there is no dashboard, and when another local instance with a dashboard was started later
it asks that one, is told the controller does not exist, and removes a live run's placement
group (seen: "Destroying worker since its placement group was removed").
"""
from __future__ import annotations

import os
import socket
import sys

LOCAL_MIN_CPUS = 4


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_ray(num_cpus: int | None = None, progress_bars: bool = True) -> None:
    """ray.init() unless already connected; a local instance gets max(4, cores) logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
        return
    port, cpus = free_port(), num_cpus or max(LOCAL_MIN_CPUS, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    print(f"local Ray instance: {cpus} logical CPUs, dashboard http://127.0.0.1:{port}", file=sys.stderr, flush=True)
