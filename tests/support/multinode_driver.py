"""Driver of tests/cluster/test_multinode.py: a head and two worker nodes on this machine, real jobs on them.

    python tests/support/multinode_driver.py WORKDIR

Runs in its own process (the pytest process holds the suite's one local Ray instance) with
RAY_TMPDIR pointing at a private directory, so the cluster's sockets, logs and its
`ray_current_cluster` address file stay out of /tmp/ray, where a concurrent `ray.init()` would
find them and join this cluster. Phases, each recorded in WORKDIR/result.json as it ends:

1. synthetic set -> `jobs.prepare` shards (Ray tasks on the cluster);
2. `jobs.train` with 2 workers and --placement SPREAD, in this driver (ranks write rank-<r>.json
   with the node they ran on);
3. `jobs.infer` as a separate driver process (RAY_ADDRESS = this cluster, exactly as a submitted
   job joins one); once it has written its first part, the worker node that holds the detector
   actor is removed, and the run must still finish.
4. elastic `jobs.train --num-workers 1:2` as a separate driver process, on two fresh nodes:
   once it trains, the node of one training worker is marked draining for preemption (as a
   spot reclaim is told to Ray), the run must checkpoint at once, and the node is removed (the
   group must go on with one worker from that checkpoint); once it trains with one, a node is
   added (it must grow back to two); the run must end at its planned step.

The head has no CPUs, as on the cluster/ manifests: every task and actor runs on the two worker
nodes, so the node removed in phase 3 is always one that does work, never the head (removing the
head ends the cluster). Each worker has 2 CPUs: one 1-CPU Train worker plus room for Ray Data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES = 32, 96, 3
INFER_UNIT, INFER_BATCH, INFER_SLEEP = 4, 4, 1.0  # 8 parts; >= 7 s of detector time after the first
# global batch 4 of 32 images: 8 steps an epoch; >= 0.3 s a step leaves time for two restarts
ELASTIC_STEPS, ELASTIC_BATCH, ELASTIC_GLOBAL, ELASTIC_SLEEP = 24, 2, 4, 0.3
# Ray's elastic policy counts the workers a node can hold by their reserved resources alone: with
# 1-CPU workers on 2-CPU nodes it restarted both on the one node left, and Ray Data's read tasks
# never got a CPU (a hang). 2-CPU workers on 3-CPU nodes: one worker per node and a CPU for data.
ELASTIC_NODE_CPUS, ELASTIC_WORKER_CPUS = 3, 2
WORKER_CPUS = 2
START = time.monotonic()


def say(message: str) -> None:
    print(f"[driver {time.monotonic() - START:6.1f}s] {message}", flush=True)


class Result:
    """result.json, rewritten after every phase so a failed phase still leaves what came before."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"timings": {}}

    def phase(self, name: str, started: float, **values) -> None:
        self.data.update(values)
        self.data["timings"][name] = round(time.monotonic() - started, 1)
        self.path.write_text(json.dumps(self.data, indent=1))


def start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(2)]
    cluster.wait_for_nodes(timeout=120)
    cluster.connect()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    return cluster, workers


def detector_actors() -> list[dict]:
    """Ray Data's detector actors of any job on the cluster: state and node (straight from the GCS)."""
    import ray._private.state as state

    return [{"state": a["State"], "node_id": a["Address"]["NodeID"]}
            for a in state.actors().values() if "Detector" in a.get("ActorClassName", "")]


def part_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.parquet")) if folder.is_dir() else []


def run_infer_and_remove_node(cluster, workers, work: Path, result: Result) -> None:
    import retinanet

    checkpoint = work / "model.pt"
    model = retinanet.build("tiny", num_classes=NUM_CLASSES)
    checkpoint.write_bytes(retinanet.checkpoint_bytes(model))
    out = work / "predictions"
    cmd = [sys.executable, "-m", "jobs.infer", "--model", str(checkpoint), "--input", str(work / "synth" / "images"),
           "--output", str(out), "--unit-size", str(INFER_UNIT), "--batch-size", str(INFER_BATCH),
           "--num-actors", "1", "--debug-sleep", str(INFER_SLEEP),
           "--shared-mount"]  # every node of this one-machine cluster sees the same disk
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    started = time.monotonic()
    say(f"infer: {' '.join(cmd[1:])}")
    with open(work / "infer.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            by_id = {w.node_id: w for w in workers}
            victim = None
            deadline = time.monotonic() + 240
            while victim is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"jobs.infer ended (exit {proc.returncode}) before any node was removed")
                if time.monotonic() > deadline:
                    raise RuntimeError("jobs.infer wrote no part in 240 s")
                alive = [a for a in detector_actors() if a["state"] == "ALIVE" and a["node_id"] in by_id]
                parts = part_files(out)
                if alive and parts:
                    victim = by_id[alive[0]["node_id"]]
                else:
                    time.sleep(0.2)
            say(f"infer: {len(parts)} part(s) written; removing node {victim.node_id[:8]} (holds the detector)")
            removed_at = time.monotonic()
            cluster.remove_node(victim)
            say(f"infer: node removed in {time.monotonic() - removed_at:.1f} s; waiting for the run to finish")
            seen_after = set()
            while proc.poll() is None and time.monotonic() - started < 420:
                seen_after |= {a["node_id"] for a in detector_actors() if a["state"] == "ALIVE"}
                time.sleep(0.5)
            if proc.poll() is None:
                raise RuntimeError("jobs.infer did not finish within 420 s after it started")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    survivor = next(w for w in workers if w is not victim)
    result.phase("infer", started, infer_code=proc.returncode, infer_output=str(out), removed_node=victim.node_id,
                 surviving_node=survivor.node_id, parts_at_removal=len(parts),
                 detector_nodes_after_removal=sorted(seen_after))
    say(f"infer: exit {proc.returncode}")


def train_worker_nodes() -> list[str]:
    """Nodes of the live Ray Train workers of any run on the cluster."""
    import ray._private.state as state

    return [a["Address"]["NodeID"] for a in state.actors().values()
            if "RayTrainWorker" in a.get("ActorClassName", "") and a["State"] == "ALIVE"]


def live_records(output: Path) -> list[dict]:
    """The metrics lines rank 0 has flushed so far (chunks under metrics/, joined at the end)."""
    chunks = sorted((output / "metrics").glob("*.jsonl"))
    return [json.loads(line) for p in chunks for line in p.read_text().splitlines() if line]


def registered_steps(output: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (once every rank has reported)."""
    snapshot = output / "retinanet" / "checkpoint_manager_snapshot.json"
    try:
        return [r["metrics"]["step"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def preemption_step(output: Path) -> int | None:
    """The step of the run's checkpoint on a preemption notice, once Ray has registered it."""
    notices = [r["step"] for r in live_records(output) if r.get("event") == "preemption"]
    return notices[0] if notices and notices[0] in registered_steps(output) else None


def trained_step(debug: Path) -> int:
    """The highest step any rank has recorded in --debug-dir."""
    steps = [json.loads(line)["step"] for p in debug.glob("batches-*.jsonl") for line in p.read_text().splitlines()
             if line]
    return max(steps, default=0)


def drain_for_preemption(cluster, node_id: str, grace_s: float) -> None:
    """What a spot-interruption handler tells Ray: this node goes in `grace_s` seconds."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, "spot reclaim", int((time.time() + grace_s) * 1000))
    if not accepted:
        raise RuntimeError(f"drain of {node_id[:8]} refused: {why}")


def wait_until(condition, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"elastic jobs.train ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"elastic jobs.train: no {what} in {timeout:.0f} s")
        time.sleep(0.2)


def resize_costs(output: Path, debug: Path, events: dict) -> dict:
    """Per resize: seconds from the node's removal (addition) to the first step of the group that
    followed, seconds from its checkpoint to its restart, and the steps trained again."""
    path = output / "metrics.jsonl"
    if not path.is_file() or "added_at" not in events:
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    reached = {}  # the last step each attempt trained, by the step it started at
    for p in debug.glob("batches-*.jsonl"):
        steps = [json.loads(line)["step"] for line in p.read_text().splitlines() if line]
        if steps:
            reached[steps[0]] = max(reached.get(steps[0], 0), steps[-1])
    costs = {}
    for name, at, workers in (("shrink", events["removed_at"], 1), ("grow", events["added_at"], 2)):
        index, resized = next((i, r) for i, r in enumerate(lines)
                              if r.get("event") == "resized" and r["workers_after"] == workers)
        first = next(r for r in lines[index:] if "loss" in r)
        before = max(start for start in reached if start <= resized["step"])
        costs[name] = {"seconds_to_next_step": round(first["time"] - at, 1), "resumed_step": resized["step"],
                       "steps_redone": reached[before] - resized["step"],
                       "seconds_since_checkpoint": resized["seconds_since_checkpoint"]}
    return costs


def run_elastic_training(cluster, work: Path, result: Result) -> None:
    for node in list(cluster.worker_nodes):  # the infer phase's survivor, sized for other work
        cluster.remove_node(node)
    for _ in range(2):
        cluster.add_node(num_cpus=ELASTIC_NODE_CPUS)
    cluster.wait_for_nodes(timeout=120)
    out, debug = work / "elastic", work / "elastic-debug"
    cmd = [sys.executable, "-m", "jobs.train", "--data", str(work / "shards"), "--output", str(out),
           "--num-workers", "1:2", "--batch-size", str(ELASTIC_BATCH), "--global-batch", str(ELASTIC_GLOBAL),
           "--max-steps", str(ELASTIC_STEPS), "--image-size", str(IMAGE_SIZE), "--placement", "SPREAD",
           "--cpus-per-worker", str(ELASTIC_WORKER_CPUS), "--checkpoint-every", "5", "--log-every", "1",
           "--max-failures", "2", "--elastic-check-s", "2",
           "--logger", "none", "--slow-steps", str(ELASTIC_SLEEP), "--debug-dir", str(debug)]
    started, events = time.monotonic(), {}
    say(f"elastic: {' '.join(cmd[1:])}")
    with open(work / "elastic.log", "w") as log:
        # After a node loss Ray 2.60 first tries the old size again (its view of the resources
        # still holds the lost node) until the group start times out (default 60 s), then the size
        # that fits; a shorter timeout keeps this test short.
        # Ray Train looks for draining nodes every 5 s by default; 1 s here.
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
               "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def resized_to(workers: int) -> bool:
                return any(r.get("event") == "resized" and r["workers_after"] == workers for r in live_records(out))

            wait_until(lambda: len(set(train_worker_nodes())) == 2 and trained_step(debug) >= 3, proc,
                       "steps at two workers")
            victim = next(n for n in cluster.worker_nodes if n.node_id == train_worker_nodes()[-1])
            events["drained_at"] = time.time()
            drain_for_preemption(cluster, victim.node_id, grace_s=60)
            say(f"elastic: node {victim.node_id[:8]} marked for preemption")
            wait_until(lambda: preemption_step(out) is not None, proc, "checkpoint on the preemption notice")
            events["removed_node"], events["removed_at"] = victim.node_id, time.time()
            cluster.remove_node(victim)
            say(f"elastic: removed node {victim.node_id[:8]} (a training worker's)")
            wait_until(lambda: resized_to(1), proc, "restart at one worker")
            say("elastic: training at one worker; adding a node")
            added = cluster.add_node(num_cpus=ELASTIC_NODE_CPUS)
            events["added_node"], events["added_at"] = added.node_id, time.time()
            wait_until(lambda: resized_to(2), proc, "growth back to two workers")
            say("elastic: grown back to two workers")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    result.phase("elastic", started, elastic_code=proc.returncode, elastic_output=str(out), elastic_debug=str(debug),
                 elastic_events=events, elastic_costs=resize_costs(out, debug, events))
    say(f"elastic: exit {proc.returncode}")


def main(work: Path) -> int:
    from jobs import prepare, train
    from pipelines.formats.synth import write_synth

    result = Result(work / "result.json")
    t = time.monotonic()
    synth = work / "synth"
    write_synth(str(synth), num_images=NUM_IMAGES, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, seed=1,
                progress=lambda line: None)
    result.phase("synth", t)

    t = time.monotonic()
    cluster, workers = start_cluster()
    try:
        import ray

        result.phase("cluster", t, head_node=cluster.head_node.node_id, worker_nodes=[w.node_id for w in workers],
                     cluster_cpus=ray.cluster_resources().get("CPU"))
        say(f"cluster up: head {cluster.head_node.node_id[:8]}, workers "
            + ", ".join(w.node_id[:8] for w in workers))

        t = time.monotonic()
        shards = work / "shards"
        code = prepare.main(["--images", str(synth / "images"), "--annotations", str(synth / "annotations.json"),
                             "--output", str(shards)])
        result.phase("prepare", t, prepare_code=code)
        say(f"prepare: exit {code}")

        t = time.monotonic()
        out, debug = work / "train", work / "train-debug"
        code = train.main(["--data", str(shards), "--output", str(out), "--num-workers", "2", "--batch-size", "4",
                           "--max-steps", "4", "--image-size", str(IMAGE_SIZE), "--placement", "SPREAD",
                           "--debug-dir", str(debug), "--log-every", "2", "--checkpoint-every", "2"])
        result.phase("train", t, train_code=code, train_output=str(out), train_debug=str(debug))
        say(f"train: exit {code}")

        run_infer_and_remove_node(cluster, workers, work, result)
        run_elastic_training(cluster, work, result)
    finally:
        t = time.monotonic()
        import ray

        ray.shutdown()
        cluster.shutdown()
        result.phase("shutdown", t)
        say("cluster shut down")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
