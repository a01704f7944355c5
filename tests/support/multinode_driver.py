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
