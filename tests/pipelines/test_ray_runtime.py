"""The local Ray instance the jobs start (`ensure_ray`) answers state-API queries about itself.

Ray Train's placement-group cleaner (an actor inside the instance) asks the state API whether
the train controller is alive and removes the run's placement group when told it is not; the
query must reach this instance's dashboard, not whichever local instance was started last.
Runs in a subprocess: the test session holds its own Ray instance (`ray_local`).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os, ray
from pipelines.ray_runtime import ensure_ray

ensure_ray(2, progress_bars=False)

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return os.getpid()

@ray.remote(num_cpus=0)
def actor_state(actor_id):
    from ray.util.state import get_actor
    found = get_actor(actor_id, timeout=30)
    return os.environ.get("RAY_API_SERVER_ADDRESS"), found.state if found else None

probe = Probe.remote()
ray.get(probe.ping.remote())
address, state = ray.get(actor_state.remote(probe._actor_id.hex()))
print("RESULT", address, state)
"""


def test_actors_see_their_own_instance_state_api():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 0, r.stderr[-3000:]
    result = [line.split() for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert result, r.stdout[-2000:]
    _, address, state = result[0]
    assert address.startswith("http://127.0.0.1:") and state == "ALIVE"
    assert f"dashboard {address}" in r.stderr, "ensure_ray prints the dashboard it started"
