"""Λ and DDB against hand-computed answers on a 3-block toy circuit (DESIGN §3)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _synthetic import synthetic_edges, vit_edge_list

from circuitray.errors import MetricError, TableError
from circuitray.graph import edge_count
from circuitray.metrics.depth import (
    ddb_column,
    dependency_depth_bias,
    dependency_matrix,
    depth_metrics,
    lambda_matrices,
)

TAU = 1 / 3  # L = 3: low = block 0 (depth 1), high = block 2 (depth 3)

TOY = [  # src, dst, src_depth, dst_depth, score
    ("input", "a0.h0<q>", 0, 1, 1.0),
    ("input", "logits", 0, 4, 2.0),
    ("a0.h0", "logits", 1, 4, -3.0),
    ("m0", "logits", 1, 4, 1.0),
    ("a2.h0", "logits", 3, 4, 8.0),
    ("m2", "logits", 3, 4, -4.0),
    ("a0.h0", "m2", 1, 3, 2.0),
    ("a2.h0", "m2", 3, 3, 0.5),
    ("a1.h0", "a2.h0<q>", 2, 3, 5.0),
    ("a0.h0", "a1.h0<k>", 1, 2, 6.0),
]


def toy(checkpoint: str = "c0", domain: str = "id") -> pd.DataFrame:
    df = pd.DataFrame(TOY, columns=["src", "dst", "src_depth", "dst_depth", "score"])
    return df.assign(task="t", checkpoint=checkpoint, domain=domain, method="eap")


def test_edge_count_matches_design_formula_and_vit_b() -> None:
    assert edge_count(12, 12) == 32491 == len(vit_edge_list(12, 12)["src"])
    assert edge_count(12, 6) == 9163
    assert edge_count(24, 16) == 231877


def test_lambda_on_toy_equals_hand_computed_means() -> None:
    lam = dependency_matrix(toy(), n_blocks=3)
    want = np.zeros((5, 5))
    want[0, 1], want[0, 4], want[1, 4], want[3, 4] = 1.0, 2.0, 2.0, 6.0
    want[1, 3], want[3, 3], want[2, 3], want[1, 2] = 2.0, 0.5, 5.0, 6.0
    np.testing.assert_allclose(lam, want)


@pytest.mark.parametrize("target, want", [
    ("out", math.log(12 / 4)),          # high (8+4) over low (3+1) into logits
    ("deep", math.log(12.5 / 6)),       # + into block 2: high 0.5, low 2
    ("global", math.log(12.5 / 12)),    # + low→block 1 (6); middle blocks never count
])
def test_ddb_on_toy_equals_hand_computed_log_ratio(target: str, want: float) -> None:
    assert dependency_depth_bias(toy(), n_blocks=3, tau=TAU, target=target) == pytest.approx(want)


def test_table_function_matches_single_circuit_functions_and_row_order() -> None:
    table = pd.concat([toy("c0"), toy("c1", "ood").assign(score=lambda d: d.score * 2)])
    shuffled = table.sample(frac=1.0, random_state=3)
    out = depth_metrics(shuffled, taus=(TAU,))
    assert list(out.checkpoint) == ["c0", "c1"]
    assert out[ddb_column("out", TAU)].to_numpy() == pytest.approx([math.log(3)] * 2)
    lam = lambda_matrices(out)
    np.testing.assert_allclose(lam[0], dependency_matrix(toy(), n_blocks=3))
    np.testing.assert_allclose(lam[1], 2 * lam[0])


def test_ddb_grows_with_planted_depth_slope() -> None:
    t = synthetic_edges(n_blocks=4, n_heads=2, checkpoints=["a", "b", "c"], domains=["id"],
                        depth_slope=[-1.0, 0.0, 2.0])
    ddb = depth_metrics(t)[ddb_column("out", 0.3)].to_numpy()
    assert ddb[0] < ddb[1] < ddb[2]


def test_missing_high_block_mass_is_nan_with_reason_in_table_and_error_alone() -> None:
    df = toy()[lambda d: d.src_depth != 3]
    with pytest.raises(MetricError, match="no \\|score\\| mass"):
        dependency_depth_bias(df, n_blocks=3, tau=TAU, target="out")
    out = depth_metrics(df, taus=(TAU,))
    assert np.isnan(out[ddb_column("out", TAU)].iloc[0])
    assert "ddb_out_0.333333" in out["note"].iloc[0]


def test_missing_column_is_named() -> None:
    with pytest.raises(TableError, match="score"):
        depth_metrics(toy().drop(columns="score"))


def test_mixed_depths_and_chunked_dictionary_tables_are_grouped_per_architecture() -> None:
    import pyarrow as pa

    a = synthetic_edges(n_blocks=4, n_heads=2, checkpoints=["x", "y"], domains=["id"],
                        dictionary=True)
    b = synthetic_edges(n_blocks=6, n_heads=2, checkpoints=["z"], domains=["id"],
                        dictionary=True, seed=1)
    out = depth_metrics(pa.concat_tables([a, b]), taus=(0.25,))
    assert list(out.checkpoint) == ["x", "y", "z"]
    assert list(out.n_blocks) == [4, 4, 6]
    lam = lambda_matrices(out)  # padded to the deepest model (8×8), NaN beyond a model's size
    assert np.isnan(lam[0, 6:, :]).all() and np.isfinite(lam[2]).all()
    single = a.to_pandas().query("checkpoint == 'y'")
    assert out[ddb_column("deep", 0.25)].iloc[1] == pytest.approx(
        dependency_depth_bias(single, n_blocks=4, tau=0.25, target="deep"))
