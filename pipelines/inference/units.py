"""One unit of work, start to finish, on the worker that holds the model: read, decode, detect, write.

A unit (N URIs, or a row range of a shard) becomes ``part-<unit>.parquet``, written by the worker
in one atomic put under that fixed name once all of its rows exist; the driver gets back one
small record (unit, images, errors, failure), never rows. Killing anything at any moment thus
loses at most the units in flight, and a rerun (or Ray's retry of the actor call) writes the
same name again, never a second copy.

Storage faults are not image faults: a read that still fails after the storage library's own
retries (throttling, 5xx, an expired token) fails the whole unit, which is then not written, so
a rerun completes it. Only bytes that do not decode (and files gone since planning) become rows
with ``error``.

Reading and decoding run in a thread pool inside the worker, a few chunks ahead of the detector:
PIL and the object-store client release the GIL, so a GPU is fed while the next chunk decodes,
and decode capacity grows with the pool of workers. Nothing here needs Ray (`UnitDetector` is the
thin Ray Data actor around it).
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.images.transforms import preprocess_images_batch
from pipelines.inference import predictions
from pipelines.inference.detector import Detector

RECORD_SCHEMA = pa.schema([("unit", pa.int64()), ("images", pa.int64()), ("errors", pa.int64()),
                           ("failure", pa.string())])


class UnitFailed(Exception):
    """A unit that cannot be completed now for a storage reason; a rerun completes it."""


# ------------------------------------------------------------------------------------ read
def _rows(unit: int, first_index: int, uris, images, image_ids, errors) -> pa.Table:
    n = len(uris)
    return pa.table({
        "uri": pa.array(uris, pa.string()), "image": pa.array(images, pa.binary()),
        "image_id": pa.array(image_ids, pa.int64()), "error": pa.array(errors, pa.string()),
        "unit": pa.array(np.full(n, unit, np.int64)),
        "index": pa.array(np.arange(first_index, first_index + n, dtype=np.int32)),
    })


def read_uris(spec: dict, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a unit of URIs, read concurrently; raises `UnitFailed` on a storage fault."""
    uris = spec["uris"][start:stop]
    ids = (spec.get("image_ids") or [None] * len(spec["uris"]))[start:stop]
    loc = storage.resolve(uris[0])
    fetched = storage.read_many(loc, [storage.resolve(u).path for u in uris])
    for uri, data in zip(uris, fetched):
        if isinstance(data, Exception) and storage.is_storage_fault(data):
            raise UnitFailed(f"{uri}: {type(data).__name__}: {str(data).splitlines()[0] if str(data) else ''}"[:300])
    errors = [f"cannot read: {type(d).__name__}: {d}"[:300] if isinstance(d, Exception) else None for d in fetched]
    return _rows(spec["unit"], start, uris, [None if isinstance(d, Exception) else d for d in fetched], ids, errors)


def read_shard_rows(spec: dict) -> pa.Table:
    """Rows [start, stop) of a shard (only the row groups that hold them), as `read_uris` rows."""
    start, stop = spec["start"], spec["stop"]
    images = storage.resolve(spec["images"]) if spec["images"] else None
    try:
        fs, path = storage.arrow_filesystem(spec["shard"])
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            groups, first, row = [], None, 0
            for g in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if row < stop and row + n > start:
                    groups.append(g)
                    first = row if first is None else first
                row += n
            table = parquet.read_row_groups(groups, columns=["image_id", "file_name", "image"])
    except OSError as exc:
        raise UnitFailed(f"{spec['shard']}: {type(exc).__name__}: {exc}"[:300]) from None
    table = table.slice(start - (first or 0), stop - start)
    names = table.column("file_name").to_pylist()
    uris = [images.join(n).uri() for n in names] if images else names
    return _rows(spec["unit"], 0, uris, table.column("image"), table.column("image_id"), [None] * len(names))


def chunk_readers(spec: dict, chunk: int) -> Iterator[Callable[[], pa.Table]]:
    """Zero-argument readers of a unit's rows, `chunk` at a time (run them in any thread)."""
    if spec.get("shard"):
        rows = read_shard_rows(spec)
        for start in range(0, rows.num_rows, chunk):
            yield lambda start=start: rows.slice(start, chunk)
        return
    for start in range(0, len(spec["uris"]), chunk):
        yield lambda start=start: read_uris(spec, start, start + chunk)


# ----------------------------------------------------------------------------- one unit
def decoded_chunks(spec: dict, chunk: int, pool: ThreadPoolExecutor, ahead: int, **decode) -> Iterator[pa.Table]:
    """A unit's decoded rows in order, read and decoded in `pool`, at most `ahead` chunks early."""
    in_flight: collections.deque = collections.deque()
    try:
        for reader in chunk_readers(spec, chunk):
            in_flight.append(pool.submit(lambda r=reader: preprocess_images_batch(r(), **decode)))
            if len(in_flight) > ahead:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        for future in in_flight:
            future.cancel()


def process_unit(spec: dict, detector: Detector, output: str, *, chunk: int, pool: ThreadPoolExecutor,
                 ahead: int, decode: dict) -> dict:
    """Read, decode, detect and write one unit; returns its record (``failure`` set: not written;
    0 images: its part was already there, written by another run or an earlier attempt)."""
    unit = spec["unit"]
    part = storage.resolve(output).join(predictions.part_name(unit)).uri()
    try:
        if storage.exists(part):  # finished meanwhile by a concurrent identical run (or a retried call)
            return {"unit": unit, "images": 0, "errors": 0, "failure": None}
        table = pa.concat_tables(detector(rows) for rows in decoded_chunks(spec, chunk, pool, ahead, **decode))
        storage.write_bytes_atomic(part, predictions.to_parquet_bytes(table))
    except (UnitFailed, storage.StorageError) as exc:
        return {"unit": unit, "images": 0, "errors": 0, "failure": str(exc)}
    return {"unit": unit, "images": table.num_rows, "errors": table.num_rows - table["error"].null_count,
            "failure": None}


class UnitDetector:
    """Ray Data actor: unit specs -> records, writing each unit's part itself.

    `threads` read+decode threads (the CPUs the actor declares); `ahead` chunks decoded ahead of
    the detector. `debug_sleep` (tests) slows every unit so that a test can kill a run mid-way.
    """

    def __init__(self, checkpoint, *, output: str, chunk: int, threads: int, decode: dict, detector: dict,
                 debug_sleep: float = 0.0):
        self.detector = Detector(checkpoint, **detector)
        self.output, self.chunk, self.decode, self.debug_sleep = output, chunk, decode, debug_sleep
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        if debug_sleep and os.environ.get("INFER_DEBUG_PID_DIR"):  # tests: who to kill
            open(os.path.join(os.environ["INFER_DEBUG_PID_DIR"], str(os.getpid())), "w").close()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import time

        records = []
        for spec in batch.to_pylist():
            if self.debug_sleep:
                time.sleep(self.debug_sleep)
            records.append(process_unit(spec, self.detector, self.output, chunk=self.chunk, pool=self.pool,
                                        ahead=self.threads + 1, decode=self.decode))
        return pa.Table.from_pylist(records, RECORD_SCHEMA)
