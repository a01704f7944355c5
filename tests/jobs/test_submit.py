"""jobs.submit against a real Ray head started with `ray start --head` (the `ray_head`
fixture), with token auth on."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs import project_deps, submit
from jobs.submit import runtime_env
from pipelines.errors import UserError
from tests.support.ray_head import TcpProxy, clean_env, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


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


def test_rayignore_excludes_data_and_storage_settings_travel(ray_head, tmp_path):
    """A working dir without its own .rayignore gets the project's; the endpoint and region of
    this shell reach the job, and --env / --runtime-env-json values too; the driver fits the
    1 CPU it asks for."""
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
        "assert os.environ['AWS_ENDPOINT_URL'] == 'http://127.0.0.1:9'\n"
        "assert os.environ['AWS_REGION'] == 'eu-west-1'\n"
        "assert os.environ['GREETING'] == 'a=b'\n"
        "assert os.environ['FROM_JSON'] == 'yes'\n"
        "print('checks passed')\n")
    env = clean_env(RAY_AUTH_TOKEN=ray_head["token"], AWS_ENDPOINT_URL="http://127.0.0.1:9",
                    AWS_REGION="eu-west-1")
    r = _submit(["--address", ray_head["address"], "--working-dir", str(tmp_path),
                 "--requirements", "none", "--env", "GREETING=a=b",
                 "--entrypoint-num-cpus", "1", "--entrypoint-memory", str(2**20),
                 "--runtime-env-json", '{"env_vars": {"FROM_JSON": "yes"}}', "--",
                 "python", "check.py"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checks passed" in r.stdout


def _files_containing(root: str, needle: bytes) -> list[str]:
    found = []
    for path in Path(root).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
        except OSError:
            continue
    return found


def _job_records(ray_head) -> str:
    """Everything the Jobs API tells anyone holding the cluster token about its jobs."""
    import requests

    reply = requests.get(f"{ray_head['address']}/api/jobs/", timeout=30,
                         headers={"Authorization": f"Bearer {ray_head['token']}"})
    reply.raise_for_status()
    return reply.text


@pytest.mark.parametrize("forward", [False, True], ids=["default", "forward-env"])
def test_a_secret_in_the_shell_reaches_no_job_record_and_no_file_of_the_head(
        ray_head, forward):
    """By default, the secret stays here. With --forward-env the same checks find it: they can
    fail, and the warning says why."""
    secret = f"fake-secret-{uuid.uuid4().hex}"
    env = clean_env(RAY_AUTH_TOKEN=ray_head["token"], AWS_ACCESS_KEY_ID="AKIAFAKEFAKEFAKE0000",
                    AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=secret + "-session",
                    WAREHOUSE_PASSWORD=secret + "-pw", AWS_ENDPOINT_URL="http://127.0.0.1:9")
    code = ("import os; print('secret here:', 'AWS_SECRET_ACCESS_KEY' in os.environ, "
            "'endpoint:', os.environ.get('AWS_ENDPOINT_URL'))")
    extra = ["--forward-env", "AWS_SECRET_ACCESS_KEY"] if forward else []
    r = _submit(["--address", ray_head["address"], "--requirements", "none", *extra, "--",
                 "python", "-c", code], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"secret here: {forward} endpoint: http://127.0.0.1:9" in r.stdout
    assert secret not in r.stdout + r.stderr  # never printed, forwarded or not
    records, files = _job_records(ray_head), _files_containing(ray_head["temp_dir"],
                                                               secret.encode())
    if forward:
        assert "Ray stores runtime envs in the job record" in r.stderr
        assert secret in records and files, "the checks below could never fail"
    else:
        assert secret not in records and "AKIAFAKEFAKEFAKE0000" not in records
        assert files == []


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


def _clear_aws(monkeypatch):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)


def test_runtime_env_requirements_come_from_pyproject_without_ray(monkeypatch):
    _clear_aws(monkeypatch)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/only/on/this/laptop.pem")  # a local path: stays here
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    env = runtime_env.build_runtime_env(REPO, "project", {"X": "1"})
    assert env["working_dir"] == str(REPO)
    assert "excludes" not in env  # the repository has its own .rayignore, which Ray reads
    assert any(req.startswith("torch") for req in env["pip"])
    assert any(req.startswith("tqdm") for req in env["pip"])
    assert not any(req.lower().startswith("ray") for req in env["pip"])
    assert env["env_vars"] == {"AWS_REGION": "eu-west-1", "X": "1"}
    bare = runtime_env.build_runtime_env(REPO, "none", {}, forward_settings=False)
    assert "pip" not in bare and "env_vars" not in bare
    with pytest.raises(UserError, match="no such file"):
        runtime_env.build_runtime_env(REPO, "missing-reqs.txt", {})


def test_project_deps_read_the_same_without_tomllib():
    """Python 3.10 has no tomllib: ensure_venv.sh and --requirements project use this reader."""
    assert project_deps.read(REPO / "pyproject.toml", use_tomllib=False) == \
        project_deps.read(REPO / "pyproject.toml")


def test_secret_names_are_refused_unless_forwarded_by_name(monkeypatch, tmp_path):
    _clear_aws(monkeypatch)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "DB_PASSWORD",
                 "HF_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert runtime_env.is_secret_name(name), name
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "OMP_NUM_THREADS", "GREETING"):
        assert not runtime_env.is_secret_name(name), name
    with pytest.raises(UserError, match="--env DB_PASSWORD: looks like a secret"):
        runtime_env.build_runtime_env(tmp_path, "none", {"DB_PASSWORD": "x"})
    with pytest.raises(UserError, match="env_vars HF_TOKEN: looks like a secret"):
        runtime_env.build_runtime_env(tmp_path, "none", {},
                                     user_runtime_env={"env_vars": {"HF_TOKEN": "x"}})
    with pytest.raises(UserError, match="--forward-env NOPE_TOKEN: not set"):
        runtime_env.build_runtime_env(tmp_path, "none", {}, forward_names=["NOPE_TOKEN"])
    monkeypatch.setenv("HF_TOKEN", "hf-value")
    env = runtime_env.build_runtime_env(tmp_path, "none", {}, forward_names=["HF_TOKEN"])
    assert env["env_vars"] == {"HF_TOKEN": "hf-value"}


def test_runtime_env_json_is_merged_over_the_projects(monkeypatch, tmp_path):
    _clear_aws(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local")
    user = runtime_env.parse_json_object(
        '{"env_vars": {"AWS_ENDPOINT_URL": "http://other", "A": "1"}, "excludes": ["/big"], '
        '"pip": ["requests"], "config": {"setup_timeout_seconds": 60}}', "--runtime-env-json")
    env = runtime_env.build_runtime_env(tmp_path, "none", {"B": "2"}, user_runtime_env=user)
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://other", "A": "1", "B": "2"}
    assert env["excludes"][-1] == "/big" and "/.venv" in env["excludes"]  # project's .rayignore
    assert env["pip"] == ["requests"] and env["config"] == {"setup_timeout_seconds": 60}
    assert env["working_dir"] == str(tmp_path)
    for bad, match in (("{not json", "not valid JSON"), ("[1]", "expected a JSON object")):
        with pytest.raises(UserError, match=match):
            submit.main(["--address", "http://127.0.0.1:1", "--runtime-env-json", bad,
                         "--", "true"])


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


def test_entrypoint_resources_reach_the_scheduler(ray_head):
    """The driver's resources are really requested: 1 CPU fits the 4-CPU head and the job
    runs (test above); 64 CPUs do not, and the job waits for them (an autoscaler would add a
    node)."""
    env = clean_env(RAY_AUTH_TOKEN=ray_head["token"])
    r = _submit(["--address", ray_head["address"], "--requirements", "none", "--no-wait",
                 "--entrypoint-num-cpus", "64", "--", "python", "-c", "print(1)"], env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    client = submit.connect(ray_head["address"], {"Authorization": f"Bearer {ray_head['token']}"})
    try:
        time.sleep(3)
        assert str(client.get_job_info(job_id).status.value) == "PENDING"
    finally:
        client.stop_job(job_id)
    with pytest.raises(UserError, match="--entrypoint-num-gpus -1.0: must be >= 0"):
        submit.main(["--address", "http://127.0.0.1:1", "--entrypoint-num-gpus", "-1", "--",
                     "true"])


def test_log_stream_reconnects_after_a_dropped_connection_and_prints_each_line_once(
        ray_head, tmp_path):
    """Through a TCP proxy that is killed mid-job and restarted, as `kubectl port-forward`
    does: the stream reconnects while the job runs, and no line is lost or printed twice."""
    upstream = int(ray_head["address"].rsplit(":", 1)[1])
    proxy = TcpProxy(upstream)
    code = ("import time\nfor i in range(40):\n    print(f'line {i:02d}', flush=True)\n"
            "    time.sleep(0.25)")
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.submit", "--address", f"http://127.0.0.1:{proxy.port}",
         "--requirements", "none", "--", "python", "-c", code],
        cwd=REPO, env=clean_env(RAY_AUTH_TOKEN=ray_head["token"]), stdout=subprocess.PIPE,
        stderr=stderr, text=True)
    try:
        seen: list[str] = []
        for line in proc.stdout:  # follow until the job is visibly streaming
            seen.append(line.rstrip("\n"))
            if line.startswith("line 04"):
                break
        proxy.stop()  # every connection dies, the listener too
        time.sleep(2.0)
        before = proxy.accepted
        proxy.start()
        seen += [line.rstrip("\n") for line in proc.stdout]
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proxy.stop()
    stderr.seek(0)
    errors = stderr.read()
    assert [s for s in seen if s.startswith("line ")] == [f"line {i:02d}" for i in range(40)], \
        errors
    assert "log stream dropped" in errors and "SUCCEEDED" in errors
    assert proxy.accepted > before  # it did reconnect through the restarted proxy


def test_follow_gives_up_when_the_cluster_stops_answering(ray_head):
    """A head that goes away for good (the proxy never comes back): outcome unknown, exit 1."""
    from jobs.submit.follow import follow

    upstream = int(ray_head["address"].rsplit(":", 1)[1])
    proxy = TcpProxy(upstream)
    address = f"http://127.0.0.1:{proxy.port}"
    headers = {"Authorization": f"Bearer {ray_head['token']}"}
    client = submit.connect(address, headers)
    job_id = client.submit_job(entrypoint="sleep 30")
    proxy.stop()
    start = time.monotonic()
    assert follow(client, address, headers, job_id, say=lambda m: None, poll_s=0.2,
                  patience_s=2.0) is None
    assert time.monotonic() - start < 30
    submit.connect(ray_head["address"], headers).stop_job(job_id)
