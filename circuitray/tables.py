"""Arrow schemas of the tables that cross stage boundaries (DESIGN §6) and atomic Parquet I/O.

Every stage reads and writes through here, so a column renamed in one place is renamed
everywhere, and a half-written file is never mistaken for a finished one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from circuitray import storage
from circuitray.errors import OutputError, TableError, os_error_is_permanent
from circuitray.storage import AnyPath, ObjectPath

EDGE_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("checkpoint", pa.string()),
        ("domain", pa.string()),
        ("method", pa.string()),
        ("src", pa.string()),
        ("dst", pa.string()),
        ("src_depth", pa.int16()),
        ("dst_depth", pa.int16()),
        ("score", pa.float32()),
        ("n_examples", pa.int64()),
    ]
)

# Per-example model outputs: what every output-based baseline (DESIGN §4) needs.
# `logits` lets baselines re-derive softmax with temperature scaling, nuclear norm, MaNo,
# BBSD; `features` (penultimate, pooled, pre-head) serves RankMe and MMD.
OUTPUT_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("checkpoint", pa.string()),
        ("domain", pa.string()),
        ("example", pa.int64()),
        ("label", pa.int64()),  # null when unlabeled
        ("pred", pa.int64()),
        ("max_prob", pa.float32()),
        ("neg_entropy", pa.float32()),
        ("energy", pa.float32()),  # -logsumexp(logits); lower = more in-distribution
        ("logits", pa.list_(pa.float32())),
        ("features", pa.list_(pa.float32())),
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error", pa.string()),
    ]
)


def require_columns(df: pd.DataFrame | pa.Table, columns: Iterable[str], what: str) -> None:
    """Raise a TableError naming the table and every missing column."""
    have = set(df.column_names if isinstance(df, pa.Table) else df.columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise TableError(f"{what}: missing column(s) {missing}; has {sorted(have)}")


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and cast `table` to `schema`, failing with the names of missing columns."""
    require_columns(table, schema.names, what)
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TableError(f"{what}: cannot cast to schema: {exc}") from exc


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: str | os.PathLike | ObjectPath,
                         schema: pa.Schema | None = None) -> AnyPath:
    """Write a whole Parquet file: readers see all of it or none of it.

    Locally to a temporary sibling, then renamed; on an object store (`path` a URI) in one
    PUT under the final name (circuitray.storage). A full disk, a read-only or
    unwritable folder, or a file where a folder should be raise OutputError naming `path`
    and the reason in words (retrying cannot help); other OSErrors (a network filesystem's
    or an object store's hiccup) propagate for the caller to retry. Either way no temporary
    is left behind.
    """
    path = storage.as_path(path)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if schema is not None:
        table = conform(table, schema, str(path))
    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(path, sink.getvalue())
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if os_error_is_permanent(exc):
            raise OutputError.from_os_error(path.parent, exc) from exc
        raise
    tmp = storage.temporary_name(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if os_error_is_permanent(exc):
            raise OutputError.from_os_error(path, exc) from exc
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder went away or read-only: nothing was left there
            pass
    return path


def _read_one(path: AnyPath) -> pa.Table:
    if isinstance(path, Path):
        return pq.read_table(path)
    return pq.read_table(pa.BufferReader(storage.read_bytes(path)))


def read_parquet(path: str | os.PathLike | ObjectPath, schema: pa.Schema | None = None
                 ) -> pa.Table:
    """Read a Parquet file or a folder of them, local or on an object store (hidden
    temporaries are ignored)."""
    path = storage.as_path(path)
    files = storage.list_files(path, ".parquet")
    if not files:
        if storage.exists(path):
            files = [path]
        elif isinstance(path, Path) and path.is_dir() or isinstance(path, ObjectPath) and \
                storage.list_files(path, hidden=True):
            raise TableError(f"{path}: directory holds no .parquet files")
        else:
            raise TableError(f"{path}: no such table")
    if len(files) == 1 and files[0] == path:
        table = _read_one(path)
    else:
        table = pa.concat_tables([_read_one(f) for f in files], promote_options="default")
    return conform(table, schema, str(path)) if schema is not None else table


def read_parquet_or_empty(path: str | os.PathLike | ObjectPath, schema: pa.Schema) -> pa.Table:
    """`read_parquet` of a folder that may not exist yet: an empty `schema` table then."""
    if not storage.list_files(path, ".parquet"):
        return schema.empty_table()
    return read_parquet(path, schema)
