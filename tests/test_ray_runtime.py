"""The local Ray instance the jobs start answers state-API queries about itself.

Ray Train's placement-group cleaner (an actor inside the instance) asks the state API whether
the train controller is alive and removes the run's placement group when told it is not; the
query must reach this instance's dashboard, not whichever local instance was started last.
"""
import os

import ray


@ray.remote(num_cpus=0)
class Probe:
    def ping(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
def actor_state(actor_id: str):
    from ray.util.state import get_actor

    found = get_actor(actor_id, timeout=30)
    return os.environ.get("RAY_API_SERVER_ADDRESS"), found.state if found else None


def test_actors_see_their_own_instance_state_api(ray_local):
    probe = Probe.remote()
    ray.get(probe.ping.remote())
    address, state = ray.get(actor_state.remote(probe._actor_id.hex()))
    assert address and address.startswith("http://127.0.0.1:")
    assert state == "ALIVE"
    ray.kill(probe)
