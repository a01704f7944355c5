"""Submit any job of this project to a Ray cluster through the Ray Jobs API and follow it.

    python -m jobs.submit --address http://HEAD:8265 [--working-dir .] [--env KEY=VALUE ...]
        [--requirements project|none|FILE] [--no-wait] -- python -m jobs.train --data ... --output ...

Why not plain `ray job submit`: on Ray 2.60 it sends the cluster's token only when the client
itself runs with RAY_AUTH_MODE=token; it lets RAY_ADDRESS silently override --address; a head
that has just started answers "No available agent to submit job" for a while and the CLI gives
up; it uploads the datasets and run outputs lying in the working dir unless told; and it exits
1 whatever the job's own exit code was. This module does each of those the way our users need,
and keeps the project's exit-code contract (0 ok, 2 user error in one line, 1 internal).

Storage credentials travel as the job's environment variables (the caller's AWS_* keys, region
and endpoint, not those naming local files), so a laptop pointed at MinIO/S3 and the cluster
read the same URIs. Their values are never printed.
On a cluster whose pods already hold credentials (cluster/kuberay), pass --no-forward-aws.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from jobs.cli import run
from pipelines.errors import UserError

# Paths of the working dir that never travel: datasets, virtual envs, run outputs, git history.
# Anchored at the working dir ("/data", not "data") so that a package folder called data/
# deeper down still travels. Ray also applies the working dir's .gitignore on top of these.
WORKING_DIR_EXCLUDES = [
    "/data", "/.venv", "/venv", "/outputs", "/out", "/.git",
    "__pycache__", "*.egg-info", ".pytest_cache",
]
# The Jobs API answers 500 with this text while the head's agent is still starting.
AGENT_NOT_READY = "No available agent to submit job"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ERROR_TAIL_LINES = 25
# AWS_* variables that name files or profiles of *this* machine. Forwarded, they would point
# the cluster's S3 client at paths that do not exist there (botocore then fails on every call,
# e.g. a missing AWS_CA_BUNDLE) or override the pod's own identity (IRSA sets its own
# AWS_WEB_IDENTITY_TOKEN_FILE). Pass them with --env when the cluster really has them.
LOCAL_ONLY_AWS = {
    "AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.submit",
        description="Submit a job (e.g. `-- python -m jobs.train ...`) to a Ray cluster, "
        "follow its logs and exit with its outcome.",
    )
    p.add_argument("--address", default=None,
                   help="Ray Jobs API (dashboard) address, e.g. http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--requirements", default="project", metavar="project|none|FILE",
                   help="pip packages for the job's runtime env: 'project' = the dependencies "
                   "in the working dir's pyproject.toml (ray itself left out), 'none' = use the "
                   "cluster's Python as is (a local head sharing this venv, or an image with "
                   "the project baked in), or a requirements.txt path")
    p.add_argument("--no-forward-aws", dest="forward_aws", action="store_false",
                   help="do not copy this shell's AWS_* variables into the job")
    p.add_argument("--submission-id", default=None, help="job id to use (default: generated)")
    p.add_argument("--no-wait", action="store_true",
                   help="print the job id and return without following the job")
    p.add_argument("--submit-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to retry while the head answers 'No available agent' "
                   "(default: 120)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the address to answer at all (default: 10)")
    p.add_argument("entrypoint", nargs="*",
                   help="the command to run, after `--`: python -m jobs.<name> ...")
    return p


def entrypoint_command(words: list[str]) -> str:
    """One shell command from the words after `--`.

    Several words are quoted one by one (so a URI with spaces stays one argument); a single
    word is taken as a shell command as is, so `-- "python -m jobs.infer ... && echo done"`
    keeps its `&&`.
    """
    if not words:
        raise UserError("nothing to submit: add the command after `--`, "
                        "e.g. `-- python -m jobs.train --data URI --output URI`")
    return words[0] if len(words) == 1 else shlex.join(words)


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair.split('=')[0]!r}: expected KEY=VALUE")
        env[key] = value
    return env


def project_requirements(working_dir: Path) -> list[str]:
    """The [project] dependencies of the working dir's pyproject.toml, without Ray.

    Ray is left out on purpose: the job must run on the Ray the cluster already runs, and a pip
    runtime env that reinstalls Ray at another version breaks the driver's connection.
    """
    pyproject = working_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise UserError(f"--requirements project: no pyproject.toml in {working_dir}; "
                        "pass --requirements FILE or --requirements none")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError("--requirements project needs Python >= 3.11 (tomllib); "
                        "pass --requirements FILE instead") from None
    deps = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
    return [d for d in deps if not _is_ray(d)]


def _is_ray(requirement: str) -> bool:
    name = requirement.strip()
    for stop in "[<>=!~; ":
        name = name.split(stop, 1)[0]
    return name.lower() == "ray"


def build_runtime_env(working_dir: Path, requirements: str, env: dict[str, str],
                      forward_aws: bool) -> dict:
    """The runtime env of the job: code, pip packages and environment variables."""
    env_vars = {k: v for k, v in os.environ.items()
                if forward_aws and k.startswith("AWS_") and k not in LOCAL_ONLY_AWS}
    env_vars.update(env)
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if requirements == "project":
        runtime_env["pip"] = project_requirements(working_dir)
    elif requirements != "none":
        path = Path(requirements)
        if not path.is_file():
            raise UserError(f"--requirements {requirements}: no such file "
                            "(use 'project', 'none' or a requirements.txt path)")
        runtime_env["pip"] = [line.strip() for line in path.read_text().splitlines()
                              if line.strip() and not line.lstrip().startswith("#")]
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 "
                        "(the Ray dashboard / Jobs API address)")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: expected the Jobs API over HTTP, "
                        "e.g. http://HEAD:8265 (not a ray:// or GCS address)")
    return address.rstrip("/")


def find_token() -> str | None:
    """The cluster token, from where Ray itself looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    then ~/.ray/auth_token (written by `ray get-auth-token --generate` or a local ray.init)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path = Path(token_path).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={token_path}: no token in that file")
        return path.read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip()
    return None


def auth_headers(address: str, timeout: float) -> dict[str, str]:
    """Headers that authenticate us to the cluster, or {} when it asks for none.

    The dashboard tells anyone its mode (/api/authentication_mode is public), so the token is
    sent only to a cluster that wants it, never to one that does not. The same request doubles
    as the reachability check, with a timeout: the SDK's own requests have none, and an
    unroutable host would otherwise hang for minutes.
    """
    import requests

    try:
        reply = requests.get(f"{address}/api/authentication_mode", timeout=timeout)
    except requests.RequestException as exc:
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({type(exc).__name__}): "
                        "is the head running, and is that its dashboard port (8265)?") from None
    mode = "unknown"
    if reply.ok:
        try:
            mode = reply.json().get("authentication_mode", "unknown")
        except ValueError:
            raise UserError(f"{address} answered, but not as a Ray dashboard: "
                            "check the host and port") from None
    if mode == "disabled":
        return {}
    token = find_token()
    if token is None:
        if mode == "token":
            raise UserError(f"{address} requires a Ray auth token: set RAY_AUTH_TOKEN or put "
                            "the token in ~/.ray/auth_token (`ray get-auth-token` on the head)")
        return {}
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def _without_address_env() -> Iterator[None]:
    """The SDK lets RAY_ADDRESS override the address it is given; ours must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
             if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, headers: dict[str, str]):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_env():
            return JobSubmissionClient(address, headers=headers or None)
    except AuthenticationError:
        raise UserError(f"{address} rejected our Ray auth token: set RAY_AUTH_TOKEN to the "
                        "cluster's token (`ray get-auth-token` on the head)") from None
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


def submit_with_retry(client, *, entrypoint: str, runtime_env: dict, submission_id: str | None,
                      timeout: float, sleep=time.sleep) -> str:
    """Submit, retrying with exponential backoff while the head's agent is not ready yet."""
    from ray.exceptions import AuthenticationError

    deadline, delay = time.monotonic() + timeout, 1.0
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                     submission_id=submission_id)
        except AuthenticationError:
            raise UserError("the cluster rejected our Ray auth token: set RAY_AUTH_TOKEN to "
                            "the cluster's token") from None
        except (RuntimeError, ValueError) as exc:  # ValueError: a runtime env Ray rejects
            text = str(exc)
            if AGENT_NOT_READY not in text:
                raise UserError(f"the cluster refused the job: {_first_line(text)}") from None
            if time.monotonic() + delay > deadline:
                raise UserError(f"the head still had no job agent after {timeout:.0f} s "
                                "(is it overloaded? raise --submit-timeout)") from None
            _say(f"head not ready ({AGENT_NOT_READY!r}); retrying in {delay:.0f} s")
            sleep(delay)
            delay = min(delay * 2, 15.0)


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow(client, job_id: str, poll_s: float = 1.0, patience_s: float = 60.0):
    """Stream the job's logs to stdout until it ends; return its final JobInfo, or None when
    the cluster stopped answering for `patience_s` (deleted, or the network went away).

    The log stream closing is not proof that the job ended (a dropped websocket looks the same),
    so the status is polled to a terminal state afterwards, printing the logs we did not stream
    if the stream broke.
    """
    streamed = True
    try:
        asyncio.run(_stream_logs(client, job_id))
    except Exception as exc:  # noqa: BLE001 - a broken stream must not lose the outcome
        streamed = False
        _say(f"log stream interrupted ({type(exc).__name__}); waiting for the job to end")
    last_answer = time.monotonic()
    while True:
        try:
            info = client.get_job_info(job_id)
            last_answer = time.monotonic()
            if _status(info) in TERMINAL:
                break
        except Exception:  # noqa: BLE001 - transient until patience runs out
            if time.monotonic() - last_answer > patience_s:
                return None
        time.sleep(poll_s)
    if not streamed:
        sys.stdout.write(client.get_job_logs(job_id))
        sys.stdout.flush()
    return info


def outcome(job_id: str, info) -> int:
    """0 when the job SUCCEEDED; else its driver's exit code (or 1), with the error's tail."""
    status = _status(info)
    if status == "SUCCEEDED":
        _say(f"job {job_id} SUCCEEDED")
        return 0
    code = info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
    tail = "\n".join((info.message or "").strip().splitlines()[-ERROR_TAIL_LINES:])
    print(f"error: job {job_id} {status} (exit code {code})", file=sys.stderr)
    if tail:
        print(tail, file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    entrypoint = entrypoint_command(args.entrypoint)
    working_dir = Path(args.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir}: no such directory")
    runtime_env = build_runtime_env(working_dir, args.requirements, parse_env_pairs(args.env),
                                    args.forward_aws)
    address = resolve_address(args.address)

    headers = auth_headers(address, args.connect_timeout)
    client = connect(address, headers)
    ray_cli = ("RAY_AUTH_MODE=token " if headers else "") + "ray job"  # for the hints below
    if runtime_env.get("env_vars"):  # names only: values may be secrets
        _say("job environment: " + ", ".join(sorted(runtime_env["env_vars"])))
    job_id = submit_with_retry(client, entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=args.submission_id, timeout=args.submit_timeout)
    _say(f"submitted job {job_id} to {address}: {entrypoint}")
    if args.no_wait:
        print(job_id)
        _say(f"follow it with: {ray_cli} logs --follow --address {address} {job_id}")
        return 0
    try:
        info = follow(client, job_id)
    except KeyboardInterrupt:
        _say(f"stopped following; the job keeps running. Stop it with: "
             f"{ray_cli} stop --address {address} {job_id}")
        raise
    if info is None:
        print(f"error: {address} stopped answering while job {job_id} ran; its outcome is "
              f"unknown ({ray_cli} status --address {address} {job_id})", file=sys.stderr)
        return 1
    return outcome(job_id, info)


def _status(info) -> str:
    return getattr(info.status, "value", str(info.status))


def _first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), text)[:300]


def _say(message: str) -> None:
    print(f"submit: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run(main)
