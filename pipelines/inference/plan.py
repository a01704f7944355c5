"""The plan of a bulk-detection run: units of work listed once, saved under the output, claimed once.

Listing 10M keys takes tens of minutes and, held as Python objects, ~9 GiB. So the listing (or
the `--input-list` file) is streamed page by page into ``_infer_units-<token>.pq`` (Parquet): one row
per unit of work (its URIs, or a row range of a shard), written one row group at a time, so
the driver holds one page and one group of units, never the input. Then the run claims the
output by creating ``_infer_plan.json`` only if it does not exist (an exclusive create: O_EXCL
semantics locally, If-None-Match on S3). That record names the units file and the settings that
change the rows. Whoever loses a race (or any rerun) reads the record instead: same settings ->
use its units, never list again; other settings -> exit 2. A rerun thus ignores keys added to
the prefix since the first run: the plan, not the bucket, defines the job.

Workers read units by row group (`read_units`); the driver only needs counts.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.errors import UserError
from pipelines.formats import shards
from pipelines.formats.shards import COCO_ANNOTATIONS, COCO_IMAGES, IMAGE_SUFFIXES
from pipelines.inference import predictions

log = logging.getLogger(__name__)

PLAN_FILE = "_infer_plan.json"  # leading "_": Parquet/Hive readers skip it
# The units file is Parquet, but named so that readers of the output's "*.parquet" (jobs.evaluate,
# DuckDB) never take it for predictions, and Hive/Arrow dataset readers skip it ("_").
UNITS_PREFIX, UNITS_SUFFIX = "_infer_units-", ".pq"
UNITS_PER_GROUP = 64  # units per Parquet row group: what the writer holds, and a worker reads
UNITS_SCHEMA = pa.schema([
    ("unit", pa.int64()), ("uris", pa.list_(pa.string())), ("image_ids", pa.list_(pa.int64())),
    ("shard", pa.string()), ("images", pa.string()), ("start", pa.int64()), ("stop", pa.int64()),
])
LIST_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}  # anything else: text, one URI per line


@dataclass
class Plan:
    """What a run's units are: the record saved in ``_infer_plan.json``."""

    record: dict

    @property
    def units_uri(self) -> str:
        return self.record["units_uri"]

    @property
    def num_units(self) -> int:
        return self.record["num_units"]

    @property
    def num_images(self) -> int:
        return self.record["num_images"]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def has_image_ids(self) -> bool:
        return self.kind in ("coco", "shards")


def unit_size_of(spec: dict) -> int:
    return spec["stop"] - spec["start"] if spec.get("shard") else len(spec["uris"])


# ------------------------------------------------------------------------------- claim / reuse
def read_plan(output: str) -> Plan | None:
    loc = storage.resolve(output)
    loc.fs.invalidate_cache()  # another process (a killed or racing run) may have written here
    uri = loc.join(PLAN_FILE).uri()
    if not storage.exists(uri):
        return None
    try:
        return Plan(json.loads(storage.read_bytes(uri)))
    except ValueError:
        raise UserError(f"{uri}: unreadable; delete it (and the parts beside it) or use a new --output") from None


def _check_same(output: str, earlier: Plan, settings: dict) -> Plan:
    changed = sorted(k for k in settings if settings[k] != earlier.record.get(k))
    if changed:
        what = ", ".join(f"{k}: {earlier.record.get(k)!r} then, {settings[k]!r} now" for k in changed)
        raise UserError(f"{output}: holds part of a run with other settings ({what}); rerun with the same "
                        "command to resume, or use a new --output")
    return earlier


def claim_plan(output: str, settings: dict, units: Iterable[dict], source: str) -> tuple[Plan, bool]:
    """(the output's plan, True if this run made it). `units` (a lazy iterable: the listing) is
    consumed only when no plan exists yet; `settings` must equal the existing plan's."""
    earlier = read_plan(output)
    if earlier is not None:
        return _check_same(output, earlier, settings), False
    out = storage.resolve(output)
    units_uri = out.join(f"{UNITS_PREFIX}{uuid.uuid4().hex[:12]}{UNITS_SUFFIX}").uri()
    summary = write_units(units_uri, units, source)
    record = {**settings, **summary, "units_uri": units_uri}
    if storage.create_exclusive(out.join(PLAN_FILE).uri(), json.dumps(record, indent=1, sort_keys=True).encode()):
        return Plan(record), True
    _remove(units_uri)  # another run claimed the output first: follow its plan
    return _check_same(output, read_plan(output), settings), False


def _remove(uri: str) -> None:
    loc = storage.resolve(uri)
    try:
        loc.fs.rm(loc.path)
    except FileNotFoundError:
        pass


def write_units(uri: str, units: Iterable[dict], source: str) -> dict:
    """Stream unit rows into one Parquet file, `UNITS_PER_GROUP` per row group; returns counts
    and a fingerprint (sha256 over every unit's inputs, in order)."""
    units = iter(units)
    first = next(units, None)  # a missing or empty input fails here, before the output is touched
    if first is None:
        raise UserError(f"{source}: the input holds no images")
    fs, path = storage.arrow_filesystem(uri)
    if storage.resolve(uri).protocol == "file":
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    digest, num_units, num_images, group = hashlib.sha256(), 0, 0, []
    try:
        with fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, UNITS_SCHEMA, compression="zstd") as writer:
            for spec in itertools.chain([first], units):
                group.append(spec)
                num_units += 1
                num_images += unit_size_of(spec)
                digest.update(json.dumps(spec, sort_keys=True).encode())
                if len(group) == UNITS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(group, UNITS_SCHEMA))
                    group = []
            if group:
                writer.write_table(pa.Table.from_pylist(group, UNITS_SCHEMA))
    except BaseException as exc:  # a listing that failed half-way leaves no units file behind
        _remove(uri)
        if isinstance(exc, OSError):
            raise storage.describe_error(uri, exc) from None
        raise
    if num_images == 0:
        _remove(uri)
        raise UserError(f"{source}: the input holds no images")
    return {"num_units": num_units, "num_images": num_images, "fingerprint": digest.hexdigest()}


def read_units(uri: str, groups: list[int]) -> pa.Table:
    """Row groups `groups` of a units file (what one worker task reads)."""
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).read_row_groups(groups)


def units_row_groups(uri: str) -> int:
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).num_row_groups


def finished_units(output: str, num_units: int) -> np.ndarray:
    """bool[num_units]: which units have their part (one listing of the output's top level)."""
    done = np.zeros(num_units, bool)
    loc = storage.resolve(output)
    loc.fs.invalidate_cache()
    for page in storage.iter_files(output, suffixes=[predictions.PART_SUFFIX]):
        units = [predictions.unit_of(u) for u in page]
        done[[u for u in units if u is not None and u < num_units]] = True
    if loc.protocol == "file":  # temporaries of atomic writes a killed run left behind
        for path in loc.fs.glob(loc.path + "/*.tmp-*"):
            loc.fs.rm(path)
    return done


# ------------------------------------------------------------------------------ what to list
def input_units(input_uri: str | None, input_list: str | None, unit_size: int) -> tuple[str, Iterator[dict]]:
    """(kind, lazy unit rows) of an input: "list" (--input-list), "shards", "coco" or "images"."""
    if input_list:
        return "list", _cut(_list_file_uris(input_list), unit_size)
    kind = shards.input_kind(input_uri)
    if kind == "shards":
        return kind, _shard_units(input_uri, unit_size)
    if kind == "coco":
        return kind, _coco_units(input_uri, unit_size)
    return kind, _cut(_listing(input_uri), unit_size)


def _listing(uri: str) -> Iterator[list[str]]:
    found = False
    for page in storage.iter_files(uri, suffixes=IMAGE_SUFFIXES):
        found = found or bool(page)
        yield page
    if not found:
        raise UserError(f"{uri}: no {'/'.join(IMAGE_SUFFIXES)} files found; check the folder or prefix")


def _cut(pages: Iterator[list[str]], unit_size: int, image_ids: list[int] | None = None) -> Iterator[dict]:
    """Pages of URIs -> unit rows of `unit_size` URIs (the last one shorter)."""
    pending, unit = [], 0
    for page in pages:
        pending.extend(page)
        cut = len(pending) - len(pending) % unit_size
        for start in range(0, cut, unit_size):
            yield _uri_unit(unit, pending[start:start + unit_size], image_ids, unit * unit_size)
            unit += 1
        del pending[:cut]
    if pending:
        yield _uri_unit(unit, pending, image_ids, unit * unit_size)


def _uri_unit(unit: int, uris: list[str], image_ids: list[int] | None, first: int) -> dict:
    ids = image_ids[first:first + len(uris)] if image_ids else None
    return {"unit": unit, "uris": uris, "image_ids": ids, "shard": None, "images": None, "start": None, "stop": None}


def _shard_units(uri: str, unit_size: int) -> Iterator[dict]:
    manifest = shards.read_manifest(uri)
    if not manifest.shards:
        raise UserError(f"{uri}: the manifest lists no shards; rerun jobs.prepare")
    shard_uris = shards.shard_uris(uri, manifest)
    present = storage.file_sizes(storage.resolve(shard_uris[0]).uri().rsplit("/", 1)[0])
    images, unit = manifest.source.get("images", ""), 0
    for info, shard in zip(manifest.shards, shard_uris):
        if info["file"] not in present:
            raise UserError(f"{shard}: listed in the manifest but missing; rerun jobs.prepare")
        for start in range(0, info["num_images"], unit_size):
            yield {"unit": unit, "uris": None, "image_ids": None, "shard": shard, "images": images,
                   "start": start, "stop": min(start + unit_size, info["num_images"])}
            unit += 1


def _coco_units(uri: str, unit_size: int) -> Iterator[dict]:
    uris, ids = _coco_inputs(uri)  # read only when a plan is made, not on reruns
    yield from _cut(iter([uris]), unit_size, ids)


def _coco_inputs(uri: str) -> tuple[list[str], list[int]]:
    """(image URIs, image ids) of a COCO layout, sorted by image id (the json is in memory anyway)."""
    from pipelines.formats import coco

    root = storage.resolve(uri)
    issues = coco.Issues()
    records = sorted(coco.image_records(coco.load_annotations(root.join(COCO_ANNOTATIONS).uri()), issues),
                     key=lambda r: r["image_id"])
    dropped = {k: n for k, n in issues.counts.items() if k in ("invalid_image_entry", "duplicate_image_id")}
    if dropped:  # annotation problems do not matter here, image entries do
        log.warning("%s: image entries skipped: %s", uri, dropped)
    images = root.join(COCO_IMAGES)
    return [images.join(r["file_name"]).uri() for r in records], [r["image_id"] for r in records]


def _list_file_uris(uri: str) -> Iterator[list[str]]:
    """URIs of an input list, a batch at a time: Parquet or CSV (column ``uri``, else the first
    column; CSV with a header row) or text (one URI per line; blank lines skipped)."""
    loc = storage.resolve(uri)
    fmt = next((f for s, f in LIST_SUFFIXES.items() if loc.path.lower().endswith(s)), "text")
    try:
        if fmt == "text":
            with loc.fs.open(loc.path, "rt", encoding="utf-8") as lines:
                batch = []
                for line in lines:
                    if line.strip():
                        batch.append(line.strip())
                    if len(batch) == 1000:
                        yield batch
                        batch = []
                yield batch
            return
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as handle:
            if fmt == "parquet":
                pfile = pq.ParquetFile(handle)
                names = pfile.schema_arrow.names
                batches = pfile.iter_batches(columns=["uri" if "uri" in names else names[0]])
            else:
                import pyarrow.csv as csv

                batches = csv.open_csv(handle)
            for batch in batches:
                column = batch.column("uri" if "uri" in batch.schema.names else 0)
                yield [u.strip() for u in column.cast(pa.string()).to_pylist() if u and u.strip()]
    except UserError:
        raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"--input-list {uri}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "give a text file (one URI per line), a CSV with a 'uri' column or a Parquet file") from None
