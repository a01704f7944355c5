"""URIs -> file systems, on the local disk and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines import storage
from pipelines.storage import StorageError

ROOT = Path(__file__).resolve().parents[2]


def test_resolve_schemes(tmp_path):
    assert storage.resolve("rel/dir").path == os.path.abspath("rel/dir")
    loc = storage.resolve(f"file://{tmp_path}/x")
    assert (loc.protocol, loc.path) == ("file", f"{tmp_path}/x")
    s3 = storage.resolve("s3://bucket/some/prefix/")
    assert (s3.protocol, s3.path, s3.uri()) == ("s3", "bucket/some/prefix", "s3://bucket/some/prefix")
    assert s3.join("a", "b.jpg").uri() == "s3://bucket/some/prefix/a/b.jpg"
    with pytest.raises(StorageError, match="unsupported scheme 'ftp://'"):
        storage.resolve("ftp://host/file")
    with pytest.raises(StorageError, match="empty URI"):
        storage.resolve("")


def exercise(base: str) -> None:
    """The same round trip on any storage."""
    storage.ensure_dir(base)
    storage.write_bytes_atomic(f"{base}/a/one.JPG", b"1")
    storage.write_bytes_atomic(f"{base}/a/b/two.png", b"22")
    storage.write_bytes_atomic(f"{base}/notes.txt", b"333")
    assert storage.read_bytes(f"{base}/a/b/two.png") == b"22"
    assert storage.exists(f"{base}/a/one.JPG") and not storage.exists(f"{base}/nope.jpg")
    assert storage.list_files(base, suffixes=[".jpg", ".png"]) == [f"{base}/a/b/two.png", f"{base}/a/one.JPG"]
    assert storage.file_sizes(base) == {"a/one.JPG": 1, "a/b/two.png": 2, "notes.txt": 3}
    loc = storage.resolve(base)
    got = storage.read_many(loc, [loc.join("notes.txt").path, loc.join("missing.jpg").path])
    assert got[0] == b"333" and isinstance(got[1], FileNotFoundError)
    fs, path = storage.arrow_filesystem(f"{base}/notes.txt")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"333"
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(f"{base}/missing.json")
    with pytest.raises(StorageError, match="not found"):
        storage.list_files(f"{base}/no/such/prefix")


def test_local_round_trip_leaves_no_temp_files(tmp_path):
    exercise(str(tmp_path / "store"))
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == ["a", "b", "notes.txt", "one.JPG", "two.png"]
    assert isinstance(storage.arrow_filesystem(str(tmp_path))[0], pafs.LocalFileSystem)


def test_s3_round_trip(s3_bucket):
    exercise(f"{s3_bucket}/prefix")


def test_s3_missing_bucket_is_one_clear_line(s3_server):
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://no-such-bucket-here/key.json")
    message = str(info.value)
    assert message.startswith("s3://no-such-bucket-here/key.json: not found;") and "AWS_ENDPOINT_URL" in message
    assert "\n" not in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        storage.ensure_dir("s3://no-such-bucket-here/out")


def run_job(module: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_s3_without_credentials_exits_2_without_leaking(s3_bucket):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    args = ["--images", f"{s3_bucket}/images", "--annotations", f"{s3_bucket}/a.json", "--output", f"{s3_bucket}/o"]
    result = run_job("jobs.prepare", args, env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: {s3_bucket}/a.json: access denied or no credentials; check the bucket "
                                     "and prefix, AWS_ENDPOINT_URL for MinIO/moto, and the AWS_* credentials")

    secret = "very-secret-value-123"
    env.update(AWS_ACCESS_KEY_ID="someone", AWS_SECRET_ACCESS_KEY=secret)
    result = run_job("jobs.prepare", [*args[:2], "--annotations", "s3://missing-bucket-x/a.json", *args[4:]], env)
    assert result.returncode == 2 and "missing-bucket-x/a.json: not found" in result.stderr
    assert secret not in result.stderr + result.stdout and len(result.stderr.strip().splitlines()) == 1
