"""Edge scores ⇄ Arrow/Parquet (DESIGN §6): the schema, and circuits that round-trip exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from _tiny import images, tiny_vit

from circuitray import attribute
from circuitray.attribution import EdgeScores
from circuitray.circuits import select_edges
from circuitray.errors import TableError
from circuitray.graph import ViTGraph
from circuitray.tables import EDGE_SCHEMA, read_parquet, write_parquet_atomic


@pytest.fixture(scope="module")
def scores() -> EdgeScores:
    return attribute(tiny_vit(depth=3, heads=2, reg_tokens=1), [images()], steps=2)


def test_edge_table_has_the_schema_and_one_row_per_edge_in_forward_order(scores):
    table = scores.to_table("digits", "ckpt-1", "id")
    assert table.schema.equals(EDGE_SCHEMA)
    assert table.num_rows == scores.graph.n_edges
    df = table.to_pandas()
    assert df["src"].iloc[0] == "input" and df["dst"].iloc[0] == "a0.h0<q>"
    assert df["dst"].iloc[-1] == "logits" and df["src"].iloc[-1] == "m2"
    assert (df["n_examples"] == 8).all() and (df["method"] == "eap-ig-inputs").all()
    g = scores.graph
    np.testing.assert_array_equal(df["src_depth"], g.src_depth[[g.src_index(s) for s in df.src]])


def test_round_trip_through_parquet_is_exact(scores, tmp_path):
    table = scores.to_table("digits", "ckpt-1", "id")
    write_parquet_atomic(table, tmp_path / "edges.parquet", schema=EDGE_SCHEMA)
    back = EdgeScores.from_table(read_parquet(tmp_path / "edges.parquet", EDGE_SCHEMA))
    assert back.graph.dst_names == scores.graph.dst_names
    assert back.to_table("digits", "ckpt-1", "id").equals(table)
    np.testing.assert_array_equal(back.scores, scores.scores.astype(np.float32))
    for n in (1, 5, 20, scores.graph.n_edges):
        assert np.array_equal(select_edges(back, top_n=n), select_edges(scores, top_n=n))
    assert back.top_edges(3)[["src", "dst"]].equals(scores.top_edges(3)[["src", "dst"]])


def test_from_table_refuses_mixed_or_foreign_tables(scores):
    a = scores.to_table("digits", "ckpt-1", "id")
    b = scores.to_table("digits", "ckpt-2", "id")
    with pytest.raises(TableError, match="holds 2 circuits"):
        EdgeScores.from_table(pa.concat_tables([a, b]))
    with pytest.raises(TableError, match="missing column"):
        EdgeScores.from_table(a.drop(["score"]))
    with pytest.raises(TableError, match="not in the given graph"):
        EdgeScores.from_table(a, graph=ViTGraph(1, 2))
