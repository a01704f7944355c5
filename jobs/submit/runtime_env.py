"""The runtime env `jobs.submit` sends with a job: code, packages, and no secrets.

Why so careful with environment variables: Ray keeps a job's runtime env in the job record
(returned by the Jobs API and shown by the dashboard to anyone who can reach it) and logs it
(`Creating runtime env: {...}`) on every node that runs the job. A secret put there is a
secret copied to many places its owner does not control. So by default only storage
*settings* travel (which endpoint, which region); credentials come from the cluster's own
identity (IRSA, an instance profile, a Kubernetes Secret: cluster/README.md). A user who
insists names each variable with --forward-env and is told what happens to it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from jobs import project_deps
from pipelines.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Storage settings of this shell that the job needs to read the same URIs: not secrets.
FORWARDED_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                      "AWS_DEFAULT_REGION")
# Names that hold (or point at) a credential. Checked on every variable we are asked to send,
# so that `--env` or `--runtime-env-json` cannot carry one by accident.
SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|(^|_)KEY$",
    re.IGNORECASE)
FORWARD_WARNING = ("forwarding {names} by --forward-env: Ray stores runtime envs in the job "
                   "record (Jobs API, dashboard) and logs them on every node of the cluster")


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair.split('=')[0]!r}: expected KEY=VALUE")
        env[key] = value
    return env


def forwarded_env(forward_settings: bool, forward_names: list[str]) -> dict[str, str]:
    """Storage settings of this shell (unless told not to), plus the --forward-env names."""
    env = {k: os.environ[k] for k in FORWARDED_SETTINGS if forward_settings and k in os.environ}
    for name in forward_names:
        if name not in os.environ:
            raise UserError(f"--forward-env {name}: not set in this shell")
        env[name] = os.environ[name]
    return env


def refuse_secrets(env_vars: dict[str, str], allowed: set[str], where: str) -> None:
    for name in env_vars:
        if is_secret_name(name) and name not in allowed:
            raise UserError(f"{where} {name}: looks like a secret, which Ray would keep in the "
                            "job record and its logs; give the cluster its own credentials "
                            f"(cluster/README.md), or export it and pass --forward-env {name} "
                            "if you must")


def project_requirements(working_dir: Path) -> list[str]:
    """The [project] dependencies of the working dir's pyproject.toml, without Ray.

    Ray is left out on purpose: the job must run on the Ray the cluster already runs, and a pip
    runtime env that reinstalls Ray at another version breaks the driver's connection.
    """
    pyproject = working_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise UserError(f"--requirements project: no pyproject.toml in {working_dir}; "
                        "pass --requirements FILE or --requirements none")
    deps, _ = project_deps.read(pyproject)
    return [d for d in deps if not _is_ray(d)]


def _is_ray(requirement: str) -> bool:
    name = requirement.strip()
    for stop in "[<>=!~; ":
        name = name.split(stop, 1)[0]
    return name.lower() == "ray"


def working_dir_excludes(working_dir: Path) -> list[str]:
    """Paths that never travel. Ray reads the working dir's own `.rayignore` itself (plain
    `ray job submit` users get the same); a working dir without one gets the project's."""
    if (working_dir / ".rayignore").is_file():
        return []
    ignore = PROJECT_ROOT / ".rayignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def parse_json_object(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag}: expected a JSON object, e.g. '{{\"NAME\": ...}}'")
    return value


def merge_runtime_env(project: dict, user: dict) -> dict:
    """The user's runtime env over the project's: env_vars merged (user's values win),
    excludes added to ours, any other key (pip, working_dir, ...) replaced by the user's."""
    merged = dict(project)
    for key, value in user.items():
        if key == "env_vars":
            merged["env_vars"] = {**project.get("env_vars", {}), **value}
        elif key == "excludes":
            merged["excludes"] = [*project.get("excludes", []), *value]
        else:
            merged[key] = value
    return merged


def build_runtime_env(working_dir: Path, requirements: str, env: dict[str, str], *,
                      forward_settings: bool = True, forward_names: list[str] = (),
                      user_runtime_env: dict | None = None) -> dict:
    """The runtime env of the job: code, pip packages and environment variables."""
    forward_names = list(forward_names)
    refuse_secrets(env, set(forward_names), "--env")
    refuse_secrets((user_runtime_env or {}).get("env_vars", {}), set(forward_names),
                   "--runtime-env-json env_vars")
    runtime_env: dict = {"working_dir": str(working_dir)}
    excludes = working_dir_excludes(working_dir)
    if excludes:
        runtime_env["excludes"] = excludes
    if requirements == "project":
        runtime_env["pip"] = project_requirements(working_dir)
    elif requirements != "none":
        path = Path(requirements)
        if not path.is_file():
            raise UserError(f"--requirements {requirements}: no such file "
                            "(use 'project', 'none' or a requirements.txt path)")
        runtime_env["pip"] = [line.strip() for line in path.read_text().splitlines()
                              if line.strip() and not line.lstrip().startswith("#")]
    env_vars = {**forwarded_env(forward_settings, forward_names), **env}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return merge_runtime_env(runtime_env, user_runtime_env or {})
