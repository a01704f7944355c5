"""URIs -> file systems. The only place in the project that looks at URI schemes.

Local paths, ``file://``, ``s3://`` (s3fs) and ``gs://`` (gcsfs, when installed) resolve to an
fsspec file system plus a path inside it. S3-compatible endpoints (MinIO, moto) and credentials
come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which
s3fs/botocore read themselves, so nothing here ever holds or prints a secret.

`arrow_filesystem` gives the same location as a ``pyarrow.fs.FileSystem`` for Ray Data and
pyarrow readers (``pyarrow.fs.S3FileSystem`` ignores ``AWS_ENDPOINT_URL``, so S3 goes through
s3fs wrapped for pyarrow rather than pyarrow's own client).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs

from pipelines.errors import UserError

S3_MAX_ATTEMPTS = 10  # botocore attempts per S3 request (its "standard" default is 3: too few for long batch jobs)
_REMOTE_PROTOCOLS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_FIXES = {
    "s3": "check the bucket and prefix, AWS_ENDPOINT_URL for MinIO/moto, and the AWS_* credentials",
    "gcs": "check the bucket and prefix and GOOGLE_APPLICATION_CREDENTIALS",
    "file": "check the path",
}


class StorageError(UserError):
    """A URI that cannot be read or written: missing bucket/prefix/file or bad credentials."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: an fsspec file system and the path inside it."""

    fs: fsspec.AbstractFileSystem
    path: str
    protocol: str  # "file", "s3" or "gcs"

    def uri(self, path: str | None = None) -> str:
        """The URI of `path` (default: this location) in the scheme the user wrote."""
        path = self.path if path is None else path
        return path if self.protocol == "file" else f"{'gs' if self.protocol == 'gcs' else 's3'}://{path}"

    def join(self, *parts: str) -> Location:
        return Location(self.fs, "/".join([self.path.rstrip("/"), *parts]), self.protocol)


def resolve(uri: str | os.PathLike) -> Location:
    """Resolve a local path or URI to a `Location`."""
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty URI: give a local path or an s3:// / gs:// URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Location(fsspec.filesystem("file"), os.path.abspath(uri), "file")
    scheme = scheme.lower()
    if scheme == "file":
        return Location(fsspec.filesystem("file"), os.path.abspath(rest), "file")
    protocol = _REMOTE_PROTOCOLS.get(scheme)
    if protocol is None:
        raise StorageError(f"{uri}: unsupported scheme '{scheme}://'; use a local path, s3:// or gs://")
    try:
        fs = fsspec.filesystem(protocol, **_retry_settings(protocol))
    except ImportError as exc:
        raise StorageError(f"{uri}: {scheme}:// needs an extra package ({exc.name or exc}); pip install it") from None
    return Location(fs, rest.rstrip("/") if rest.strip("/") else rest, protocol)


def _retry_settings(protocol: str) -> dict:
    """The storage library's own retry settings: botocore's retry modes for S3.

    botocore retries throttling and 5xx answers with exponential backoff and jitter ("adaptive"
    also slows the client down under throttling); s3fs adds its own retries on connection errors
    and SlowDown on top. AWS_MAX_ATTEMPTS / AWS_RETRY_MODE set them as for any AWS client.
    """
    if protocol != "s3":
        return {}
    return {"config_kwargs": {"retries": {  # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS does
        "mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))}}}


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The location as (pyarrow file system, path) for pyarrow and Ray Data."""
    loc = resolve(uri)
    if loc.protocol == "file":
        return pafs.LocalFileSystem(), loc.path
    return pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs)), loc.path


def describe_error(uri: str, exc: BaseException) -> StorageError:
    """Turn a file-system exception into a one-line `StorageError` with the likely fix."""
    protocol = resolve(uri).protocol
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    if "Credentials" in name or "credential" in text.lower() or "AccessDenied" in text or "Forbidden" in text:
        what = "access denied or no credentials"
    elif isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        what = "not found"
    elif isinstance(exc, PermissionError):
        what = "permission denied"
    else:
        what = f"{name}: {text}"
    return StorageError(f"{uri}: {what}; {_FIXES[protocol]}")


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)
    try:
        return loc.fs.cat_file(loc.path)
    except Exception as exc:  # noqa: BLE001 - any storage failure becomes one clear line
        raise describe_error(uri, exc) from None


def _local_temporary(path: str, data: bytes) -> str:
    """`data` in a new file beside `path` under a unique temporary name (returned)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or all of it.

    Local files are written to a temporary name and renamed; object stores make an object
    visible only when its upload completes, so a plain put is already atomic there.
    """
    loc = resolve(uri)
    try:
        if loc.protocol == "file":
            os.replace(_local_temporary(loc.path, data), loc.path)
        else:
            loc.fs.pipe_file(loc.path, data)
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` holding `data` only if nothing is there yet; False when something is.

    Locally the data goes to a temporary file that is then hard-linked to the name (link fails
    if the name exists), so the file appears complete or not at all. On S3 it is a conditional
    put (If-None-Match: *), which AWS S3, MinIO and moto honour. Other stores fall back to
    check-then-write, which two runs started in the same instant can both pass.
    """
    loc = resolve(uri)
    try:
        if loc.protocol == "file":
            tmp = _local_temporary(loc.path, data)
            try:
                os.link(tmp, loc.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if loc.protocol == "s3":
            try:
                loc.fs.pipe_file(loc.path, data, mode="create")
            except FileExistsError:
                return False
            return True
        if loc.fs.exists(loc.path):
            return False
        loc.fs.pipe_file(loc.path, data)
        return True
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None


def exists(uri: str) -> bool:
    loc = resolve(uri)
    try:
        return loc.fs.exists(loc.path)
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """All files under `uri` (recursive), as URIs, sorted; filtered by lower-case suffix."""
    loc = resolve(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    try:
        if loc.fs.isfile(loc.path):
            paths = [loc.path]
        else:
            if not loc.fs.isdir(loc.path):
                raise FileNotFoundError(loc.path)
            paths = loc.fs.find(loc.path)
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None
    if wanted:
        paths = [p for p in paths if p.lower().endswith(wanted)]
    return sorted(loc.uri(p) for p in paths)


def iter_files(uri: str, suffixes: Iterable[str] | None = None, page: int = 1000) -> Iterator[list[str]]:
    """Every file under `uri` (recursive) as URIs, one page at a time, never the whole listing.

    S3 pages come straight from ListObjectsV2 (1,000 keys each, in key order, each page retried
    by s3fs/botocore); local folders are walked in sorted order. Other stores list at once.
    """
    loc = resolve(uri)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    keep = (lambda p: p.lower().endswith(wanted)) if wanted else (lambda p: True)  # noqa: E731
    try:
        if loc.fs.isfile(loc.path):
            yield [loc.uri()] if keep(loc.path) else []
            return
        if not loc.fs.isdir(loc.path):
            raise FileNotFoundError(loc.path)
        if loc.protocol == "s3":
            bucket, _, key = loc.path.partition("/")
            args = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": page}
            while True:
                out = loc.fs.call_s3("list_objects_v2", **args)
                yield [f"s3://{bucket}/{o['Key']}" for o in out.get("Contents", []) if keep(o["Key"])]
                if not out.get("IsTruncated"):
                    return
                args["ContinuationToken"] = out["NextContinuationToken"]
        elif loc.protocol == "file":
            for folder, dirs, files in os.walk(loc.path):
                dirs.sort()
                found = [os.path.join(folder, f) for f in sorted(files) if keep(f)]
                for start in range(0, len(found), page):
                    yield found[start:start + page]
        else:
            yield sorted(loc.uri(p) for p in loc.fs.find(loc.path) if keep(p))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None


def is_storage_fault(exc: BaseException) -> bool:
    """True for a failed read or write that a later attempt may complete (throttling, 5xx,
    timeouts, expired or missing credentials); False for a file that is not there."""
    return not isinstance(exc, (FileNotFoundError, IsADirectoryError))


def ensure_dir(uri: str) -> None:
    """Create a local directory (object stores need none); fail early on a missing bucket."""
    loc = resolve(uri)
    try:
        if loc.protocol == "file":
            os.makedirs(loc.path, exist_ok=True)
        else:
            bucket = loc.path.split("/", 1)[0]
            if not loc.fs.exists(bucket):
                raise FileNotFoundError(f"bucket {bucket}")
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None


def file_sizes(uri: str) -> dict[str, int]:
    """{path relative to `uri`: size in bytes} of every file under `uri` (one recursive listing).

    One listing instead of one request per file: on object stores that is ~1 request per
    1,000 files, and it tells missing files and shard sizes apart before any image is read.
    """
    loc = resolve(uri)
    base = loc.path.rstrip("/") + "/"
    try:
        if not loc.fs.isdir(loc.path):
            raise FileNotFoundError(loc.path)
        found = loc.fs.find(loc.path, detail=True)
    except Exception as exc:  # noqa: BLE001
        raise describe_error(uri, exc) from None
    return {p[len(base):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(base)}


def read_many(loc: Location, paths: list[str], max_workers: int = 16) -> list[bytes | Exception]:
    """Read many files of one file system concurrently; a failure comes back as its exception.

    Object stores answer each GET in tens of milliseconds, so reading a chunk of images one
    after another would leave the CPU idle; threads overlap the requests. Paths are never
    globbed (unlike ``fs.cat``), so names with ``[`` or ``*`` read as themselves.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> bytes | Exception:
        try:
            return loc.fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - the caller records and skips the file
            return exc

    if loc.protocol == "file" or len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(paths))) as pool:
        return list(pool.map(one, paths))
