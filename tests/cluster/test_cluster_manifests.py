"""cluster/: the manifests and the launcher YAML say what we mean, and name jobs that exist.

No Kubernetes or AWS here, so these tests check what would otherwise fail only on a real
cluster, hours later: an entrypoint with a misspelt module or flag, a Ray version that differs
from the image's, a GPU group without GPUs, credentials written into a file, autoscaling
bounds that cannot hold the requested workers, a launcher file Ray's own schema rejects.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from tests.support import crd_schema

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
LAUNCHER = CLUSTER / "aws" / "cluster.yaml"
README = CLUSTER / "README.md"
IMAGE = re.compile(r"^[\w.\-/:]+/retinanet-ray:[\w.\-]*ray(?P<ray>\d+\.\d+\.\d+)-(?P<flavor>gpu|cpu)$")

PYPROJECT = REPO / "pyproject.toml"
KUBERAY_FLOOR = "1.6.0"  # authOptions.secretName (mode alone: 1.5.1); stated in cluster/README.md


def pinned_ray() -> str:
    """The one Ray version of the project: the `ray[...]==X` pin of pyproject.toml."""
    match = re.search(r'"ray\[[\w,]+\]==(\d+\.\d+\.\d+)"', PYPROJECT.read_text())
    assert match, "pyproject.toml must pin Ray exactly (ray[...]==X.Y.Z)"
    return match.group(1)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_objects() -> list[tuple[str, dict, dict]]:
    """(name, the RayCluster spec, the whole object) for every RayCluster and RayJob."""
    found = []
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] == "RayCluster":
                found.append((f"{path.name}:{doc['metadata']['name']}", doc["spec"], doc))
            elif doc["kind"] == "RayJob":
                found.append((f"{path.name}:{doc['metadata']['name']}",
                              doc["spec"]["rayClusterSpec"], doc))
    return found


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g)
                                                for g in spec["workerGroupSpecs"]]


def _ray_container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    return containers[0]  # KubeRay runs Ray in the first container


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


# --- entrypoints ------------------------------------------------------------------------------

def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _readme_commands() -> list[str]:
    """Shell commands of the README's fenced code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), flags=re.S)
    return [cmd for block in blocks for cmd in block.replace("\\\n", " ").splitlines()
            if "python -m jobs." in cmd]


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every string in cluster/ that runs `python -m jobs.<x>`."""
    found = []
    for path in [*KUBERAY, LAUNCHER]:
        for doc in _docs(path):
            found += [(path.name, s) for s in _strings(doc) if "python -m jobs." in s]
    found += [(README.name, cmd) for cmd in _readme_commands()]
    return found


def _invocations(command: str) -> list[tuple[str, list[str]]]:
    """(module, argv) of each `python -m jobs.X ...` in a shell command, `jobs.submit`'s
    own flags and the job after its `--` counted separately."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words, segments = list(lexer), [[]]
    for word in words:
        if word in {"&&", "||", ";", "|", "&"}:
            segments.append([])
        else:
            segments[-1].append(word)
    found = []
    for seg in segments:
        for i in range(len(seg) - 2):
            if seg[i].startswith("python") and seg[i + 1] == "-m" and seg[i + 2].startswith("jobs."):
                module, argv = seg[i + 2], seg[i + 3:]
                if module == "jobs.submit" and "--" in argv:
                    cut = argv.index("--")
                    found.append((module, argv[:cut]))
                    found += _invocations(shlex.join(argv[cut + 1:]))
                else:
                    found.append((module, argv))
                break
    return found


def _all_invocations() -> list[tuple[str, str, list[str]]]:
    return [(where, module, argv) for where, cmd in _commands()
            for module, argv in _invocations(cmd)]


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_entrypoints_cover_every_job_we_document():
    modules = {(where, module) for where, module, _ in _all_invocations()}
    assert ("rayjob-train.yaml", "jobs.train") in modules
    assert ("rayjob-infer.yaml", "jobs.infer") in modules
    readme_jobs = {m for where, m in modules if where == README.name}
    assert {"jobs.submit", "jobs.prepare", "jobs.train", "jobs.infer",
            "jobs.evaluate"} <= readme_jobs


@pytest.mark.parametrize("where, module, argv", [
    pytest.param(where, module, argv, id=f"{where}:{module}:{i}")
    for i, (where, module, argv) in enumerate(_all_invocations())])
def test_entrypoint_names_a_real_job_whose_parser_accepts_the_flags(where, module, argv):
    job = importlib.import_module(module)
    parser = job.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `python -m {module} {shlex.join(argv)}` is rejected by its "
                    f"parser (exit {exc.code})")


# --- KubeRay ----------------------------------------------------------------------------------

def test_kuberay_folder_holds_one_raycluster_and_three_rayjobs():
    kinds = {}
    for path in KUBERAY:
        for doc in _docs(path):
            kinds.setdefault(doc["kind"], []).append(path.name)
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1", path.name
    assert kinds.get("RayCluster") == ["raycluster.yaml"]
    assert sorted(kinds.get("RayJob", [])) == ["rayjob-infer.yaml", "rayjob-train-spot.yaml", "rayjob-train.yaml"]


def _crd_versions() -> list[str]:
    versions = crd_schema.crd_versions()
    if not versions:
        pytest.skip(f"no KubeRay CRDs in {crd_schema.CRD_DIR} (developer machines and CI only)")
    return versions


def test_manifests_pass_the_kuberay_crds_strictly():
    """What `kubectl apply --validate=strict` would say, for every KubeRay release we support."""
    versions = _crd_versions()
    assert versions[0] == f"v{KUBERAY_FLOOR}", "validate against the floor the README states"
    for version in versions:
        for kind in ("RayCluster", "RayJob"):
            schema = crd_schema.load_schema(kind, version)
            for _, _, obj in (o for o in _ray_objects() if o[2]["kind"] == kind):
                problems = crd_schema.errors(obj, schema)
                assert not problems, (version, obj["metadata"]["name"], problems)


def test_strict_validation_catches_a_misspelt_field_and_a_bad_quantity():
    """The check above can fail: an unknown field deep in a pod template is an error, an int
    where int-or-string is allowed is not, and neither is a well-formed quantity."""
    version = _crd_versions()[0]
    schema = crd_schema.load_schema("RayJob", version)
    job = next(o for o in _ray_objects() if o[2]["kind"] == "RayJob")[2]
    bad = copy.deepcopy(job)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4  # int-or-string
    head["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelt
    bad["spec"]["rayClusterSpec"]["autoscalerOptions"]["verison"] = "v2"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["memory"] = "48 GB"
    problems = "\n".join(crd_schema.errors(bad, schema))
    assert "'volumeMount' was unexpected" in problems
    assert "'verison' was unexpected" in problems
    assert "48 GB" in problems
    assert "cpu" not in problems
    assert len(problems.splitlines()) == 3, problems


def test_strict_schema_honours_preserve_unknown_fields_and_int_or_string():
    schema = crd_schema.to_json_schema({"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"known": {"type": "string"}}},
        "port": {"x-kubernetes-int-or-string": True}}})
    assert crd_schema.errors({"free": {"known": "x", "other": 1}, "port": 8265}, schema) == []
    assert crd_schema.errors({"port": "http"}, schema) == []
    assert len(crd_schema.errors({"port": 1.5}, schema)) == 1
    assert "'extra' was unexpected" in crd_schema.errors({"extra": 1}, schema)[0]


def test_images_carry_the_projects_ray_version_and_the_right_flavour():
    version = pinned_ray()
    assert ray.__version__ == version, "the installed Ray differs from pyproject's pin: make venv"
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={version}\n" in dockerfile
    for name, spec, obj in _ray_objects():
        assert spec["rayVersion"] == version, name
        for group_name, group in _groups(spec):
            container = _ray_container(group)
            match = IMAGE.match(container["image"])
            assert match, (name, group_name, container["image"])
            assert match["ray"] == version, (name, group_name)
            assert match["flavor"] == ("gpu" if _gpus(container) else "cpu"), (name, group_name)
        if obj["kind"] == "RayJob":
            submitter = obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
            assert IMAGE.match(submitter["image"])["ray"] == version, name


def test_cpu_head_one_gpu_group_and_a_cpu_only_decode_group():
    for name, spec, _ in _ray_objects():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name  # drivers only, no tasks
        assert _gpus(_ray_container(head)) == 0, name
        workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(workers) == {"gpu-workers", "cpu-decode"}, name

        gpu = workers["gpu-workers"]
        res = _ray_container(gpu)["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, name
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], name
        tolerations = gpu["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), name

        decode = _ray_container(workers["cpu-decode"])["resources"]
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in decode.get(part, {}), name
        assert int(decode["limits"]["cpu"]) >= 8, name


def test_dev_shm_holds_rays_object_store():
    """Ray's object store takes 30% of the pod's memory from /dev/shm, and falls back to disk
    when it does not fit. KubeRay mounts a memory-sized /dev/shm when none is given; one given
    here must be at least that 30%."""
    for name, spec, _ in _ray_objects():
        for group_name, group in _groups(spec):
            container = _ray_container(group)
            memory = crd_schema.quantity(container["resources"]["limits"]["memory"])
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if "/dev/shm" not in mounts:
                continue  # left to KubeRay
            volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
            empty_dir = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert empty_dir["medium"] == "Memory", (name, group_name)
            if "sizeLimit" in empty_dir:
                assert crd_schema.quantity(empty_dir["sizeLimit"]) >= 0.3 * memory, \
                    (name, group_name, empty_dir["sizeLimit"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _all_containers(spec: dict, obj: dict) -> list[tuple[str, dict]]:
    containers = [(g, _ray_container(grp)) for g, grp in _groups(spec)]
    if obj["kind"] == "RayJob":
        containers.append(("submitter", obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]))
    containers.append(("autoscaler", spec["autoscalerOptions"]))
    return containers


def test_token_auth_through_authoptions_so_the_operator_sends_the_token_too():
    """With token auth set by hand (RAY_AUTH_* variables), the operator's own calls to the Jobs
    API carry no token: it cannot read the job's status. authOptions makes KubeRay inject the
    token everywhere, itself included."""
    secrets = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "kuberay" / "secrets.example.yaml")}
    for name, spec, obj in _ray_objects():
        auth = spec["authOptions"]
        assert auth["mode"] == "token", name
        # The operator refuses token auth below Ray 2.52 (its own validation, not the CRD's).
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0), name
        if obj["kind"] == "RayJob":  # KubeRay: at most 47 characters, a DNS-1035 label
            assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", obj["metadata"]["name"]), name
        assert "auth_token" in secrets[auth["secretName"]]["stringData"], name
        for where, container in _all_containers(spec, obj):
            env = _env(container)
            # KubeRay injects these only where absent; set by hand they would shadow its own.
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_enable_autoscaler_v2"} & set(env), \
                (name, where)
    assert f"KubeRay >= {KUBERAY_FLOOR}" in README.read_text()


def test_storage_credentials_come_from_a_secret_never_from_files():
    secrets = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "kuberay" / "secrets.example.yaml")}
    for name, spec, obj in _ray_objects():
        for where, container in _all_containers(spec, obj):
            env = _env(container)
            if where in ("submitter", "autoscaler"):
                assert not any(k.startswith("AWS_") for k in env), (name, where)  # no storage
                continue
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key], (name, where, key)
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "retinanet-s3" and ref["key"] == key, (name, where)
                assert ref.get("optional") is True, "IRSA / instance profiles need no keys"
                assert key in secrets[ref["name"]]["stringData"], ref
    assert all(v == "REPLACE_ME" or not k.startswith(("AWS_ACCESS", "AWS_SECRET", "auth"))
               for s in secrets.values() for k, v in s["stringData"].items())
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not re.search(r"AKIA[0-9A-Z]{16}", path.read_text()), path


def test_autoscaler_v2_and_rayjobs_that_end_and_release_their_gpus():
    for name, spec, obj in _ray_objects():
        assert spec["autoscalerOptions"]["version"] == "v2", name
        if obj["kind"] != "RayJob":
            continue
        job = obj["spec"]
        assert job["activeDeadlineSeconds"] > 0, f"{name}: nothing bounds a hung run"
        assert "deletionStrategy" not in job, name  # DeleteWorkers is refused with autoscaling
        assert job["shutdownAfterJobFinishes"] is True, name
        assert job.get("ttlSecondsAfterFinished", 0) <= 60, f"{name}: GPUs idle after the job"


def test_all_storage_uris_share_one_placeholder_bucket():
    text = "\n".join(p.read_text() for p in [*KUBERAY, README])
    assert set(re.findall(r"s3://([^/\s]+)/", text)) == {"my-bucket"}


def test_autoscaling_bounds_hold_the_workers_the_jobs_ask_for():
    for name, spec, obj in _ray_objects():
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, name
        for group in spec["workerGroupSpecs"]:
            lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
            assert 0 <= lo <= n <= hi, (name, group["groupName"])
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
        per_pod = _gpus(_ray_container(gpu))
        if obj["kind"] == "RayCluster":
            assert gpu["minReplicas"] == 0, "a long-lived cluster must not hold idle GPUs"
            continue
        for module, argv in _invocations(obj["spec"]["entrypoint"]):
            assert "--use-gpu" in argv, name
            if module == "jobs.train":  # synchronous SGD: MIN workers' GPUs from the start, room for MAX
                low, _, high = _flag(argv, "--num-workers").partition(":")
                assert gpu["replicas"] * per_pod >= int(low), name
                assert gpu["maxReplicas"] * per_pod >= int(high or low), name
                if high:  # elastic: the group never autoscales below MIN, and its pods are spot
                    assert gpu["minReplicas"] * per_pod >= int(low), name
                    assert "SPOT" in json.dumps(gpu["template"]["spec"].get("nodeSelector", {})).upper(), name
            if module == "jobs.infer":
                assert gpu["maxReplicas"] * per_pod >= int(_flag(argv, "--max-actors")), name
                assert gpu["minReplicas"] * per_pod >= int(_flag(argv, "--min-actors")), name


# --- AWS cluster launcher ---------------------------------------------------------------------

def test_launcher_yaml_passes_rays_schema_with_the_same_split():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)  # Ray's own ray-schema.json, as `ray up` runs it

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu, cpu = types["gpu_worker"], types["cpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and re.match(r"^[gp]\d", gpu["node_config"]["InstanceType"])
    assert "GPU" not in cpu["resources"] and cpu["resources"]["CPU"] >= 8
    for node_type in (gpu, cpu):
        assert 0 == node_type["min_workers"] <= node_type["max_workers"]
    assert gpu["max_workers"] + cpu["max_workers"] <= raw["max_workers"]

    images = {"head": raw["docker"]["head_image"], "gpu": gpu["docker"]["worker_image"],
              "cpu": cpu["docker"]["worker_image"]}
    for flavor, image in images.items():
        match = IMAGE.match(image)
        assert match and match["ray"] == pinned_ray(), image
        assert match["flavor"] == ("gpu" if flavor == "gpu" else "cpu"), image

    for node_type in types.values():  # S3 through instance profiles, not keys
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    commands = config["head_setup_commands"] + config["worker_setup_commands"]
    assert not any("pip install" in c for c in commands)  # the image has everything
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(raw[key])
        assert "RAY_AUTH_MODE=token" in start and "0.0.0.0" not in start, key
    assert "~/.ray/auth_token" in raw["file_mounts"]


AMI_PLACEHOLDER = "ami-REPLACE_WITH_CURRENT_DLAMI_ID"
DLAMI_SSM = ("/aws/service/deeplearning/ami/x86_64/"
             "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")


def test_launcher_pins_an_ami_per_node_type_and_says_how_to_find_the_current_one():
    """No ImageId means Ray's default Ubuntu 18.04 AMI. Either the placeholder, which EC2
    rejects as malformed, or a real id with the date it was looked up."""
    text = LAUNCHER.read_text()
    raw = yaml.safe_load(text)
    for name, node_type in raw["available_node_types"].items():
        ami = node_type["node_config"].get("ImageId")
        assert ami, f"{name}: no ImageId, Ray would use its Ubuntu 18.04 default"
        if ami != AMI_PLACEHOLDER:
            assert re.fullmatch(r"ami-[0-9a-f]{17}", ami), (name, ami)
            assert re.search(rf"{ami}\s*#.*\d{{4}}-\d{{2}}-\d{{2}}", text), \
                f"{name}: pin {ami} with the date it was looked up"
    assert not re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?", AMI_PLACEHOLDER)  # malformed
    readme = README.read_text()
    assert DLAMI_SSM in readme and "aws ec2 describe-images" in readme
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert "ARG TORCH_CUDA=cu130" in dockerfile and "driver >= 580" in readme


def test_readme_names_every_file_of_the_folder():
    text = README.read_text()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path != README and not path.name.endswith(".dockerignore"):
            assert str(path.relative_to(CLUSTER)) in text, path
