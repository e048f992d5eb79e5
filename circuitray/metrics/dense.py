"""Edge tables -> dense [circuit, edge] score matrices, without per-edge Python.

Every circuit metric is array math once the scores of many circuits sit in one matrix with
the same edge order in every row. This module does that reshaping once: it groups rows into
circuits (task, checkpoint, domain, method), verifies (or restores, by sorting) a common edge
order, and splits circuits with different edge sets (different architectures) into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from circuitray.errors import TableError
from circuitray.tables import require_columns

KEYS = ("task", "checkpoint", "domain", "method")
EDGE_COLUMNS = (*KEYS, "src", "dst", "src_depth", "dst_depth", "score")


@dataclass
class EdgeBlock:
    """Circuits that share one edge set, in one edge order.

    keys: one row per circuit (task, checkpoint, domain, method); scores: float32
    [n_circuits, n_edges]; src/dst/src_depth/dst_depth: per edge, shared by every row.
    """

    keys: pd.DataFrame
    scores: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    src_depth: np.ndarray
    dst_depth: np.ndarray

    @property
    def n_blocks(self) -> int:
        """L = max(dst_depth) − 1: the logits sit at depth L+1 (DESIGN §1)."""
        return int(self.dst_depth.max()) - 1


def as_table(edges: pa.Table | pd.DataFrame, what: str = "edges") -> pa.Table:
    """Accept Arrow or pandas; check the columns every circuit metric needs."""
    require_columns(edges, EDGE_COLUMNS, what)
    if isinstance(edges, pd.DataFrame):
        edges = pa.Table.from_pandas(edges[list(EDGE_COLUMNS)], preserve_index=False)
    return edges


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes per row, in the narrowest dtype Arrow gives, and distinct values) for a
    string or dictionary column. Chunks with different dictionaries are unified first."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    if col.null_count:
        raise TableError(f"column has {col.null_count} null value(s)")
    chunks = col.chunks
    if len(chunks) == 0:
        return np.zeros(0, np.int32), np.array([], dtype=object)
    dictionary = chunks[0].dictionary
    if any(not c.dictionary.equals(dictionary) for c in chunks[1:]):
        col = col.unify_dictionaries() if hasattr(col, "unify_dictionaries") else \
            pc.dictionary_encode(col.cast(dictionary.type))
        chunks = col.chunks
        dictionary = chunks[0].dictionary
    parts = [c.indices.to_numpy(zero_copy_only=False) for c in chunks]
    idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return idx, np.asarray(dictionary.to_pylist(), dtype=object)


def _numeric(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise TableError(f"edges: column '{name}' has {col.null_count} null value(s)")
    return col.to_numpy().astype(dtype, copy=False)


def edge_blocks(edges: pa.Table | pd.DataFrame) -> list[EdgeBlock]:
    """Group an edges table into dense blocks of circuits with identical edge sets.

    Fast path (the discover stage writes one circuit after another, each in the same edge
    order): no sort and no copy, the score column is reshaped in place. Otherwise rows are
    sorted once by circuit and, where a circuit's edge order differs from its block's, by edge.
    Peak memory beyond the table is about two int64 columns (circuit key, edge key).
    """
    table = as_table(edges)
    if table.num_rows == 0:
        raise TableError("edges: table is empty")
    gkey = np.zeros(table.num_rows, np.int64)
    key_values = []
    for k in KEYS:  # one column's codes alive at a time
        try:
            codes, values = _codes(table.column(k))
        except TableError as exc:
            raise TableError(f"edges: column '{k}': {exc}") from None
        gkey *= max(len(values), 1)
        gkey += codes
        key_values.append(values)
        del codes
    src_c, src_v = _codes(table.column("src"))
    dst_c, dst_v = _codes(table.column("dst"))
    ekey = src_c.astype(np.int64) * len(dst_v)
    ekey += dst_c
    del src_c, dst_c
    score = _numeric(table, "score", np.float32)
    sdep = _numeric(table, "src_depth", np.int16)
    ddep = _numeric(table, "dst_depth", np.int16)

    starts = np.concatenate([[0], np.flatnonzero(gkey[1:] != gkey[:-1]) + 1])
    if len(np.unique(gkey[starts])) != len(starts):  # a circuit's rows are not contiguous
        order = np.argsort(gkey, kind="stable")
        gkey, ekey, score, sdep, ddep = (a[order] for a in (gkey, ekey, score, sdep, ddep))
        del order
        starts = np.concatenate([[0], np.flatnonzero(gkey[1:] != gkey[:-1]) + 1])
    sizes = np.diff(np.append(starts, len(gkey)))

    def decode(rows: np.ndarray) -> pd.DataFrame:
        out, rest = {}, gkey[rows]
        for name, values in reversed(list(zip(KEYS, key_values, strict=True))):
            n = max(len(values), 1)
            out[name] = values[rest % n]
            rest = rest // n
        return pd.DataFrame({k: out[k].astype(str) for k in KEYS})

    blocks: list[EdgeBlock] = []
    for size in np.unique(sizes):
        first = starts[sizes == size]
        if len(first) * size == len(gkey):  # every circuit has this size: views, no copies
            def take(a: np.ndarray, g: int = len(first), s: int = int(size)) -> np.ndarray:
                return a.reshape(g, s)
        else:
            rows = first[:, None] + np.arange(size)[None, :]

            def take(a: np.ndarray, rows: np.ndarray = rows) -> np.ndarray:
                return a[rows]
        ek, sc, sd, dd = take(ekey), take(score), take(sdep), take(ddep)
        same = (ek == ek[0]).all(axis=1)
        if not same.all():  # restore a common edge order by sorting each circuit by edge
            perm = np.argsort(ek, axis=1, kind="stable")
            ek, sc, sd, dd = (np.take_along_axis(a, perm, axis=1) for a in (ek, sc, sd, dd))
            del perm
        dup = (ek[:, 1:] == ek[:, :-1]).any(axis=1)
        if dup.any():
            bad = decode(first[np.flatnonzero(dup)[:1]]).iloc[0].to_dict()
            raise TableError(f"edges: circuit {bad} lists the same edge twice")
        # circuits of equal size may still differ in their edge sets: one block per set
        set_id = (np.unique(ek, axis=0, return_inverse=True)[1].reshape(-1) if not same.all()
                  else np.zeros(len(first), np.int64))
        for s in np.unique(set_id):
            members = np.flatnonzero(set_id == s)
            every = len(members) == len(first)
            block = EdgeBlock(
                keys=decode(first[members]),
                scores=sc if every else sc[members],
                src=src_v[ek[members[0]] // len(dst_v)],
                dst=dst_v[ek[members[0]] % len(dst_v)],
                src_depth=sd[members[0]].copy(),
                dst_depth=dd[members[0]].copy(),
            )
            _check_depths(block, sd if every else sd[members], dd if every else dd[members])
            blocks.append(block)
    return blocks


def _check_depths(block: EdgeBlock, sdep: np.ndarray, ddep: np.ndarray) -> None:
    """Every circuit of a block must agree on each edge's depths (same architecture)."""
    if not ((sdep == block.src_depth).all() and (ddep == block.dst_depth).all()):
        raise TableError("edges: the same (src, dst) edge has different depths across circuits")
    if (block.src_depth > block.dst_depth).any():  # heads of block l feed m{l}: equal is fine
        raise TableError("edges: an edge's src_depth exceeds its dst_depth")
