"""Connecting to Ray the same way in every job.

With RAY_ADDRESS set (a cluster, `ray job submit`) jobs join that cluster. Otherwise they start
a local instance sized on purpose: on a 2-core machine the default (logical CPUs = cores) lets
two Train workers take every CPU and starve Ray Data, and the run hangs without an error.
"""
from __future__ import annotations

import os

LOCAL_MIN_CPUS = 4


def ensure_ray(num_cpus: int | None = None) -> None:
    """ray.init() unless already connected; a local instance gets max(4, cores) logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
        return
    ray.init(num_cpus=num_cpus or max(LOCAL_MIN_CPUS, os.cpu_count() or 1), include_dashboard=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
