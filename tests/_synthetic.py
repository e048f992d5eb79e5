"""Synthetic edge tables with the exact node naming of DESIGN §1.

Tests and `bench/reduce.py` need valid `edges` tables before (and independently of) the
attribution engine; generating them from the graph definition keeps both honest about the
edge count and the depth convention (input 0, block l -> l+1, logits L+1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from circuitray.graph import ViTGraph
from circuitray.tables import EDGE_SCHEMA


def vit_edge_list(n_blocks: int, n_heads: int) -> dict[str, np.ndarray]:
    """Every edge of an L-block, H-head ViT in the order `EdgeScores.to_table` writes them.

    Delegates to the (torch-free) `ViTGraph`, so synthetic and real tables share one
    definition of the nodes, the edges and their order.
    """
    edges = ViTGraph(n_blocks, n_heads).edges()
    return {
        "src": edges["src"].to_numpy(object),
        "dst": edges["dst"].to_numpy(object),
        "src_depth": edges["src_depth"].to_numpy(np.int16),
        "dst_depth": edges["dst_depth"].to_numpy(np.int16),
    }


def synthetic_edges(
    *,
    n_blocks: int,
    n_heads: int,
    checkpoints: Sequence[str],
    domains: Sequence[str],
    task: str = "task0",
    method: str = "eap-ig-inputs",
    depth_slope: np.ndarray | None = None,
    shift: np.ndarray | None = None,
    seed: int = 0,
    dictionary: bool = False,
) -> pa.Table:
    """A valid `edges` table with planted structure.

    score = base(edge) · exp(depth_slope[c] · src_depth / L) + shift[c, d] · noise, so a
    checkpoint's DDB grows with `depth_slope[c]` and its circuit on domain d moves away from
    domain 0 with `shift[c, d]`. `dictionary=True` stores string columns dictionary-encoded
    (what Parquet readers hand back for repeated strings) so 65 M rows fit in memory.
    """
    rng = np.random.default_rng(seed)
    e = vit_edge_list(n_blocks, n_heads)
    n_e, n_c, n_d = len(e["src"]), len(checkpoints), len(domains)
    slope = np.zeros(n_c) if depth_slope is None else np.asarray(depth_slope, float)
    shift = np.zeros((n_c, n_d)) if shift is None else np.asarray(shift, float)
    base = rng.standard_normal(n_e).astype(np.float32)
    rel = e["src_depth"].astype(np.float32) / n_blocks
    scores = np.empty((n_c, n_d, n_e), dtype=np.float32)
    for c in range(n_c):  # one checkpoint at a time keeps the temporaries small
        circuit = base * np.exp(np.float32(slope[c]) * rel)
        for d in range(n_d):
            noise = rng.standard_normal(n_e, dtype=np.float32)
            scores[c, d] = circuit + np.float32(shift[c, d]) * noise * np.abs(circuit)
    n_rows = n_c * n_d * n_e
    ckpt_idx = np.repeat(np.arange(n_c, dtype=np.int16), n_d * n_e)
    dom_idx = np.tile(np.repeat(np.arange(n_d, dtype=np.int8), n_e), n_c)
    edge_idx = np.tile(np.arange(n_e, dtype=np.int32), n_c * n_d)
    src_names, src_codes = np.unique(e["src"].astype(str), return_inverse=True)
    dst_names, dst_codes = np.unique(e["dst"].astype(str), return_inverse=True)

    def strings(values: Sequence[str], codes: np.ndarray) -> pa.Array:
        arr = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(values), pa.string()))
        return arr if dictionary else arr.cast(pa.string())

    columns = {
        "task": strings([task], np.zeros(n_rows, np.int8)),
        "checkpoint": strings(list(checkpoints), ckpt_idx),
        "domain": strings(list(domains), dom_idx),
        "method": strings([method], np.zeros(n_rows, np.int8)),
        "src": strings(list(src_names), src_codes.astype(np.int16)[edge_idx]),
        "dst": strings(list(dst_names), dst_codes.astype(np.int16)[edge_idx]),
        "src_depth": pa.array(e["src_depth"][edge_idx]),
        "dst_depth": pa.array(e["dst_depth"][edge_idx]),
        "score": pa.array(scores.reshape(-1)),
        "n_examples": pa.array(np.full(n_rows, 64, dtype=np.int64)),
    }
    del edge_idx
    if dictionary:
        return pa.table(columns)
    return pa.table(columns).cast(EDGE_SCHEMA)
