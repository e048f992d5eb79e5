"""Arrow schemas of the tables that cross stage boundaries (DESIGN §6) and atomic Parquet I/O.

Every stage reads and writes through here, so a column renamed in one place is renamed
everywhere, and a half-written file is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from circuitray.errors import OutputError, TableError, os_error_is_permanent

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


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: str | os.PathLike,
                         schema: pa.Schema | None = None) -> Path:
    """Write to a temporary sibling, then rename: readers see all of the file or none of it.

    A full disk, a read-only or unwritable folder, or a file where a folder should be raise
    OutputError naming `path` and the reason in words (retrying cannot help); other OSErrors
    (a network filesystem's hiccup) propagate for the caller to retry. Either way no
    temporary is left behind.
    """
    path = Path(path)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if schema is not None:
        table = conform(table, schema, str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if os_error_is_permanent(exc):
            raise OutputError.from_os_error(path.parent, exc) from exc
        raise
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
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


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    """Read a Parquet file or a directory of them (hidden temporaries are ignored)."""
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: no such table")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise TableError(f"{path}: directory holds no .parquet files")
        tables = [pq.read_table(f) for f in files]
        table = pa.concat_tables(tables, promote_options="default")
    else:
        table = pq.read_table(path)
    return conform(table, schema, str(path)) if schema is not None else table


def read_parquet_or_empty(path: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """`read_parquet` of a directory that may not exist yet: an empty `schema` table then."""
    path = Path(path)
    if not path.is_dir() or not any(p for p in path.rglob("*.parquet")
                                    if not p.name.startswith(".")):
        return schema.empty_table()
    return read_parquet(path, schema)
