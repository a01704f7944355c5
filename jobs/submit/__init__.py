"""Submit any job of this project to a Ray cluster through the Ray Jobs API and follow it.

    python -m jobs.submit --address http://HEAD:8265 [--working-dir .] [--env KEY=VALUE ...]
        [--entrypoint-num-cpus N] [--entrypoint-num-gpus N] [--entrypoint-memory BYTES]
        [--runtime-env-json JSON] [--forward-env NAME ...]
        [--requirements project|none|FILE] [--no-wait] -- python -m jobs.train --data ... --output ...

Why not plain `ray job submit`: on Ray 2.60 it sends the cluster's token only when the client
itself runs with RAY_AUTH_MODE=token; it lets RAY_ADDRESS silently override --address; a head
that has just started answers "No available agent to submit job" for a while and the CLI gives
up; its log stream goes silent when the connection drops; and it exits 1 whatever the job's
own exit code was. This module does each of those the way our users need, keeps the project's
exit-code contract (0 ok, 2 user error in one line, 1 internal), and otherwise takes the same
flags (entrypoint resources, a runtime env in JSON, `.rayignore` in the working dir).

No secret leaves this machine by default (see jobs/submit/runtime_env.py): only storage settings
(endpoint, region) are forwarded; clusters hold their own credentials.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs.submit.follow import follow
from jobs.submit.runtime_env import FORWARD_WARNING, build_runtime_env, parse_env_pairs, parse_json_object
from pipelines.errors import UserError

# The Jobs API answers 500 with this text while the head's agent is still starting.
AGENT_NOT_READY = "No available agent to submit job"
ERROR_TAIL_LINES = 25


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
    p.add_argument("--no-forward-aws", dest="forward_settings", action="store_false",
                   help="do not forward even this shell's storage settings (AWS_ENDPOINT_URL, "
                   "AWS_REGION, AWS_DEFAULT_REGION); credentials are never forwarded by default")
    p.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                   help="copy this shell's NAME into the job, secrets included (repeatable). "
                   "Ray stores runtime envs in the job record and logs them on every node: "
                   "prefer the cluster's own credentials (cluster/README.md)")
    p.add_argument("--runtime-env-json", default=None, metavar="JSON",
                   help="a runtime env merged over the project's: env_vars merged, excludes "
                   "added, other keys (pip, working_dir, ...) replaced")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, metavar="N",
                   help="CPUs reserved for the job's driver (its entrypoint); with none of the "
                   "entrypoint resources the driver runs on the head")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, metavar="N",
                   help="GPUs reserved for the job's driver")
    p.add_argument("--entrypoint-memory", type=int, default=None, metavar="BYTES",
                   help="memory (bytes) reserved for the job's driver")
    p.add_argument("--entrypoint-resources", default=None, metavar="JSON",
                   help='custom resources for the driver, e.g. \'{"driver": 1}\'')
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


def entrypoint_resources(args) -> dict:
    """The driver's resources, as `submit_job` takes them (only those given)."""
    resources = {"entrypoint_num_cpus": args.entrypoint_num_cpus,
                 "entrypoint_num_gpus": args.entrypoint_num_gpus,
                 "entrypoint_memory": args.entrypoint_memory}
    for flag, value in resources.items():
        if value is not None and value < 0:
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be >= 0")
    if args.entrypoint_resources:
        custom = parse_json_object(args.entrypoint_resources, "--entrypoint-resources")
        if not all(isinstance(v, (int, float)) for v in custom.values()):
            raise UserError("--entrypoint-resources: expected {\"NAME\": number, ...}")
        resources["entrypoint_resources"] = custom
    return {k: v for k, v in resources.items() if v is not None}


def submit_with_retry(client, *, entrypoint: str, runtime_env: dict, submission_id: str | None,
                      timeout: float, sleep=time.sleep, **resources) -> str:
    """Submit, retrying with exponential backoff while the head's agent is not ready yet."""
    from ray.exceptions import AuthenticationError

    deadline, delay = time.monotonic() + timeout, 1.0
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                     submission_id=submission_id, **resources)
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
    runtime_env = build_runtime_env(
        working_dir, args.requirements, parse_env_pairs(args.env),
        forward_settings=args.forward_settings, forward_names=args.forward_env,
        user_runtime_env=parse_json_object(args.runtime_env_json, "--runtime-env-json"))
    resources = entrypoint_resources(args)
    address = resolve_address(args.address)
    if args.forward_env:
        _say("warning: " + FORWARD_WARNING.format(names=", ".join(args.forward_env)))

    headers = auth_headers(address, args.connect_timeout)
    client = connect(address, headers)
    ray_cli = ("RAY_AUTH_MODE=token " if headers else "") + "ray job"  # for the hints below
    if runtime_env.get("env_vars"):  # names only: values may be secrets
        _say("job environment: " + ", ".join(sorted(runtime_env["env_vars"])))
    job_id = submit_with_retry(client, entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=args.submission_id, timeout=args.submit_timeout,
                               **resources)
    _say(f"submitted job {job_id} to {address}: {entrypoint}")
    if args.no_wait:
        print(job_id)
        _say(f"follow it with: {ray_cli} logs --follow --address {address} {job_id}")
        return 0
    try:
        info = follow(client, address, headers, job_id, say=_say)
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
