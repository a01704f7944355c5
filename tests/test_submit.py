"""jobs.submit against a real Ray head started with `ray start --head` (the `ray_head`
fixture), with token auth on."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs import submit
from pipelines.errors import UserError
from ray_head import clean_env, free_port

REPO = Path(__file__).resolve().parents[1]


def _submit(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "jobs.submit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# --- against the real head --------------------------------------------------------------------

def test_trivial_job_succeeds_and_streams_its_logs(ray_head):
    r = _submit(["--address", ray_head["address"], "--requirements", "none", "--",
                 "python", "-c", "print('hello from the job')"],
                clean_env(RAY_AUTH_TOKEN=ray_head["token"]))
    assert r.returncode == 0, r.stderr
    assert "hello from the job" in r.stdout
    assert "submitted job raysubmit_" in r.stderr
    assert "SUCCEEDED" in r.stderr


def test_failing_job_exits_with_its_code_and_shows_the_error(ray_head):
    code = "import sys; print('boom: the reason', file=sys.stderr); sys.exit(3)"
    r = _submit(["--address", ray_head["address"], "--requirements", "none", "--",
                 "python", "-c", code], clean_env(RAY_AUTH_TOKEN=ray_head["token"]))
    assert r.returncode == 3, r.stderr
    assert "FAILED (exit code 3)" in r.stderr
    # The tail of the job's error is on submit's own stderr, not only in the streamed logs.
    error_part = r.stderr.split("FAILED (exit code 3)", 1)[1]
    assert "boom: the reason" in error_part


def test_runtime_env_excludes_data_and_forwards_env_without_printing_secrets(ray_head, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "python").write_text("nope")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "ckpt.pt").write_text("nope")
    (tmp_path / "pkg" / "data").mkdir(parents=True)  # nested data/ is code: it travels
    (tmp_path / "pkg" / "data" / "keep.txt").write_text("kept")
    (tmp_path / "check.py").write_text(
        "import os, sys\n"
        "names = sorted(os.listdir('.'))\n"
        "print('listing', names)\n"
        "assert 'data' not in names and '.venv' not in names and 'outputs' not in names\n"
        "assert open('pkg/data/keep.txt').read() == 'kept'\n"
        "assert os.environ['AWS_SECRET_ACCESS_KEY'] == 'sekrit-value-42'\n"
        "assert os.environ['AWS_ENDPOINT_URL'] == 'http://127.0.0.1:9'\n"
        "assert os.environ['GREETING'] == 'a=b'\n"
        "print('checks passed')\n")
    env = clean_env(RAY_AUTH_TOKEN=ray_head["token"], AWS_SECRET_ACCESS_KEY="sekrit-value-42",
                     AWS_ENDPOINT_URL="http://127.0.0.1:9")
    r = _submit(["--address", ray_head["address"], "--working-dir", str(tmp_path),
                 "--requirements", "none", "--env", "GREETING=a=b", "--",
                 "python", "check.py"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checks passed" in r.stdout
    assert "AWS_SECRET_ACCESS_KEY" in r.stderr  # the name is announced ...
    assert "sekrit-value-42" not in r.stderr + r.stdout  # ... the value never


def test_token_from_home_file_and_no_wait(ray_head, tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(ray_head["token"] + "\n")
    r = _submit(["--address", ray_head["address"], "--requirements", "none", "--no-wait", "--",
                 "python", "-c", "print(1)"], clean_env(HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("raysubmit_")  # only the id on stdout: scriptable
    assert ray_head["token"] not in r.stdout + r.stderr


@pytest.mark.parametrize("token_env, expect", [
    ({}, "requires a Ray auth token"),
    ({"RAY_AUTH_TOKEN": "not-the-token"}, "rejected our Ray auth token"),
])
def test_missing_or_wrong_token_is_a_one_line_user_error(ray_head, tmp_path, token_env, expect):
    env = clean_env(HOME=str(tmp_path), **token_env)  # empty HOME: no ~/.ray/auth_token
    r = _submit(["--address", ray_head["address"], "--requirements", "none", "--",
                 "python", "-c", "print(1)"], env, timeout=60)
    assert r.returncode == 2
    lines = _stderr_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


# --- without a head -------------------------------------------------------------------------

def test_unreachable_address_is_a_one_line_user_error():
    start = time.monotonic()
    r = _submit(["--address", f"http://127.0.0.1:{free_port()}", "--", "python", "-c", "1"],
                clean_env(RAY_ADDRESS="http://127.0.0.1:1"), timeout=60)
    assert r.returncode == 2
    lines = _stderr_lines(r)
    assert len(lines) == 1 and "cannot reach the Ray Jobs API" in lines[0], r.stderr
    assert time.monotonic() - start < 30


def test_missing_entrypoint_and_bad_env_are_user_errors():
    with pytest.raises(UserError, match="nothing to submit"):
        submit.main(["--address", "http://127.0.0.1:1"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        submit.parse_env_pairs(["NOEQUALS"])


def test_entrypoint_quotes_words_but_keeps_a_single_shell_string():
    words = ["python", "-m", "jobs.train", "--data", "s3://b/with space", "--use-gpu"]
    assert submit.entrypoint_command(words) == \
        "python -m jobs.train --data 's3://b/with space' --use-gpu"
    assert submit.entrypoint_command(["python -m jobs.infer && echo ok"]) == \
        "python -m jobs.infer && echo ok"


def test_parser_separates_own_flags_from_the_job_flags():
    args = submit.build_parser().parse_args(
        ["--address", "http://h:8265", "--env", "A=1", "--no-wait", "--",
         "python", "-m", "jobs.train", "--address", "not-ours", "--epochs", "1"])
    assert args.address == "http://h:8265" and args.env == ["A=1"] and args.no_wait
    assert args.entrypoint == ["python", "-m", "jobs.train", "--address", "not-ours",
                               "--epochs", "1"]


def test_runtime_env_requirements_come_from_pyproject_without_ray(monkeypatch):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/only/on/this/laptop.pem")  # a local path: stays here
    env = submit.build_runtime_env(REPO, "project", {"X": "1"}, forward_aws=True)
    assert env["working_dir"] == str(REPO)
    assert "/.venv" in env["excludes"] and "/data" in env["excludes"] and "/.git" in env["excludes"]
    assert any(req.startswith("torch") for req in env["pip"])
    assert not any(req.lower().startswith("ray") for req in env["pip"])
    assert env["env_vars"] == {"AWS_REGION": "eu-west-1", "X": "1"}
    bare = submit.build_runtime_env(REPO, "none", {}, forward_aws=False)
    assert "pip" not in bare and "env_vars" not in bare
    with pytest.raises(UserError, match="no such file"):
        submit.build_runtime_env(REPO, "missing-reqs.txt", {}, forward_aws=False)


def test_token_lookup_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert submit.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.find_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token() == "from-env"


class _AgentNotReadyClient:
    """Answers like a head whose job agent is still starting, `failures` times."""

    def __init__(self, failures: int, error: str = submit.AGENT_NOT_READY):
        self.failures, self.error, self.calls = failures, error, 0

    def submit_job(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"Request failed with status code 500: {self.error}, "
                               "please try again later.")
        return "raysubmit_fake"


def test_submit_retries_with_backoff_while_the_agent_is_not_ready():
    sleeps: list[float] = []
    client = _AgentNotReadyClient(failures=3)
    job_id = submit.submit_with_retry(client, entrypoint="true", runtime_env={},
                                      submission_id=None, timeout=60, sleep=sleeps.append)
    assert job_id == "raysubmit_fake" and client.calls == 4
    assert sleeps == [1.0, 2.0, 4.0]


def test_submit_gives_up_after_its_timeout_and_does_not_retry_other_errors():
    with pytest.raises(UserError, match="no job agent"):
        submit.submit_with_retry(_AgentNotReadyClient(failures=100), entrypoint="true",
                                 runtime_env={}, submission_id=None, timeout=0.5,
                                 sleep=lambda s: None)
    client = _AgentNotReadyClient(failures=1, error="runtime_env is invalid")
    with pytest.raises(UserError, match="refused the job"):
        submit.submit_with_retry(client, entrypoint="true", runtime_env={},
                                 submission_id=None, timeout=60, sleep=lambda s: None)
    assert client.calls == 1


class _FollowClient:
    """A job that is RUNNING for `running` polls, then ends as `final`; its log stream breaks."""

    def __init__(self, final, running=2, unreachable=False):
        self.final, self.running, self.unreachable, self.polls = final, running, unreachable, 0

    async def tail_job_logs(self, job_id):
        raise RuntimeError("WebSocket connection closed unexpectedly")
        yield  # pragma: no cover - makes this an async generator

    def get_job_info(self, job_id):
        if self.unreachable:
            raise ConnectionError("head is gone")
        self.polls += 1
        return self.final if self.polls > self.running else SimpleNamespace(status="RUNNING")

    def get_job_logs(self, job_id):
        return "all the logs\n"


def test_follow_polls_to_the_end_and_prints_logs_when_the_stream_breaks(capsys):
    final = SimpleNamespace(status="STOPPED", driver_exit_code=None, message="stopped by user")
    client = _FollowClient(final)
    info = submit.follow(client, "raysubmit_x", poll_s=0)
    assert info is final and client.polls == 3
    assert "all the logs" in capsys.readouterr().out
    assert submit.outcome("raysubmit_x", info) == 1  # no exit code of its own: still non-zero
    assert "STOPPED (exit code 1)" in capsys.readouterr().err


def test_follow_gives_up_when_the_cluster_stops_answering():
    client = _FollowClient(final=None, unreachable=True)
    assert submit.follow(client, "raysubmit_x", poll_s=0, patience_s=0.05) is None
