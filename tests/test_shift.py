"""CSS variants against direct computations and planted permutations (DESIGN §3)."""

from __future__ import annotations

import netlsd
import networkx as nx
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from _synthetic import synthetic_edges, vit_edge_list

from circuitray.errors import MetricError, TableError
from circuitray.metrics.shift import (
    circuit_graph,
    circuit_shift_score,
    heat_trace,
    normalized_laplacian_eigenvalues,
    shift_scores,
)


def circuit(scores: np.ndarray, n_blocks: int = 3, n_heads: int = 2) -> pd.DataFrame:
    e = vit_edge_list(n_blocks, n_heads)
    return pd.DataFrame({k: e[k] for k in ("src", "dst", "src_depth", "dst_depth")}
                        ).assign(score=np.asarray(scores, np.float32))


N_EDGES = len(vit_edge_list(3, 2)["src"])


def test_srcc_is_zero_for_identical_circuits_and_grows_with_permutation() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal(N_EDGES)
    assert circuit_shift_score(circuit(s), circuit(s), variant="srcc") == pytest.approx(0, abs=1e-12)
    values = []
    for frac in (0.1, 0.4, 1.0):
        t = s.copy()
        idx = rng.choice(N_EDGES, int(frac * N_EDGES), replace=False)
        t[idx] = t[rng.permutation(idx)]
        values.append(circuit_shift_score(circuit(s), circuit(t), variant="srcc"))
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(1.0, abs=0.35)  # full shuffle: ρ ≈ 0 ± 1/√100


def test_vector_variants_equal_direct_formulas() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(N_EDGES), rng.standard_normal(N_EDGES)
    b = 0.6 * a + 0.4 * b
    a32, b32 = a.astype(np.float32).astype(float), b.astype(np.float32).astype(float)
    want = {
        "srcc": 1 - scipy.stats.spearmanr(a32, b32).statistic,
        "pearson": 1 - np.corrcoef(a32, b32)[0, 1],
        "cosine": 1 - a32 @ b32 / np.linalg.norm(a32) / np.linalg.norm(b32),
        "l2": np.linalg.norm(a32 - b32),
        "kendall": 1 - scipy.stats.kendalltau(a32, b32).statistic,
    }
    for variant, value in want.items():
        got = circuit_shift_score(circuit(a), circuit(b), variant=variant)
        assert got == pytest.approx(value, rel=1e-6), variant


def test_row_order_does_not_change_css() -> None:
    rng = np.random.default_rng(2)
    a, b = circuit(rng.standard_normal(N_EDGES)), circuit(rng.standard_normal(N_EDGES))
    shuffled = b.sample(frac=1.0, random_state=0)
    for v in ("srcc", "jaccard_weighted", "netlsd"):
        assert circuit_shift_score(a, b, variant=v, top_n=20) == pytest.approx(
            circuit_shift_score(a, shuffled, variant=v, top_n=20))


def test_heat_trace_equals_netlsd_on_undirected_graphs() -> None:
    rng = np.random.default_rng(3)
    g = nx.gnm_random_graph(30, 80, seed=4)
    for u, v in g.edges:
        g[u][v]["weight"] = float(rng.uniform(0.1, 2.0))
    g.remove_nodes_from([n for n in list(g) if g.degree(n) == 0])
    mine = heat_trace(normalized_laplacian_eigenvalues(g))
    np.testing.assert_allclose(mine, netlsd.heat(g, normalization="empty"), rtol=1e-9)


def test_directed_input_is_made_undirected_explicitly() -> None:
    dag = nx.DiGraph()
    dag.add_weighted_edges_from([(0, 1, 1.0), (0, 2, 2.0), (1, 2, 0.5), (2, 3, 1.5), (1, 3, 3.0)])
    mine = heat_trace(normalized_laplacian_eigenvalues(dag))
    want = netlsd.heat(dag.to_undirected(), normalization="empty")
    np.testing.assert_allclose(mine, want, rtol=1e-9)
    # the trap we avoid: netlsd on the DiGraph itself silently returns another signature
    assert not np.allclose(netlsd.heat(dag, normalization="empty"), want, rtol=1e-3)


def test_circuit_graph_is_undirected_top_n_with_qkv_merged() -> None:
    df = pd.DataFrame({
        "src": ["input", "input", "a0.h0", "m0"],
        "dst": ["a1.h0<q>", "a1.h0<k>", "logits", "logits"],
        "score": [1.0, -2.0, 0.5, -0.1],
    })
    g = circuit_graph(df, top_n=3)
    assert not g.is_directed()
    assert set(g.nodes) == {"input", "a1.h0", "a0.h0", "logits"}
    assert g["input"]["a1.h0"]["weight"] == pytest.approx(3.0)  # q and k merged, |score|
    assert g.number_of_edges() == 2


def test_jaccard_on_known_top_sets() -> None:
    a, b = np.zeros(N_EDGES), np.zeros(N_EDGES)
    a[[0, 1, 2]] = [4.0, -3.0, 2.0]  # top-3 of ID: {0, 1, 2}
    b[[1, 2, 3]] = [3.0, 1.0, -5.0]  # top-3 of D: {1, 2, 3}
    a[10:], b[10:] = 1e-3, 1e-3  # everything else is tiny and out of the top-3
    assert circuit_shift_score(circuit(a), circuit(b), variant="jaccard", top_n=3) == \
        pytest.approx(1 - 2 / 4)
    # weighted over the union: min = 0+3+1+0, max = 4+3+2+5
    assert circuit_shift_score(circuit(a), circuit(b), variant="jaccard_weighted", top_n=3) == \
        pytest.approx(1 - 4 / 14)


def test_graph_variants_match_circuit_graph_and_are_zero_when_unchanged() -> None:
    rng = np.random.default_rng(5)
    a, b = circuit(rng.standard_normal(N_EDGES)), circuit(rng.standard_normal(N_EDGES))
    ha = heat_trace(normalized_laplacian_eigenvalues(circuit_graph(a, 25)))
    hb = heat_trace(normalized_laplacian_eigenvalues(circuit_graph(b, 25)))
    assert circuit_shift_score(a, b, variant="netlsd", top_n=25) == \
        pytest.approx(np.linalg.norm(ha - hb))
    for v in ("netlsd", "jaccard", "jaccard_weighted", "laplacian"):
        assert circuit_shift_score(a, a, variant=v, top_n=25) == pytest.approx(0, abs=1e-9)
        assert circuit_shift_score(a, b, variant=v, top_n=25) > 0


def test_table_scores_every_non_id_domain_and_planted_shift_orders_css() -> None:
    t = synthetic_edges(n_blocks=3, n_heads=2, checkpoints=["a", "b"], domains=["id", "x", "y"],
                        shift=[[0, 0.2, 1.0], [0, 0.5, 2.0]])
    out = shift_scores(t, id_domain="id", top_n=30)
    assert list(zip(out.checkpoint, out.domain, strict=True)) == \
        [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    for col in ("css_srcc", "css_jaccard", "css_l2"):
        v = out[col].to_numpy()
        assert v[0] < v[1] and v[2] < v[3] and v[0] < v[2], col


def test_mismatched_edge_sets_name_the_checkpoint_and_domain() -> None:
    t = synthetic_edges(n_blocks=2, n_heads=2, checkpoints=["ck1", "ck2"], domains=["id", "ood"])
    df = t.to_pandas()
    drop = df.index[(df.checkpoint == "ck2") & (df.domain == "ood")][0]
    with pytest.raises(TableError, match="checkpoint 'ck2', domain 'ood'.*different edge set"):
        shift_scores(df.drop(index=drop), id_domain="id")
    with pytest.raises(TableError, match="no circuit on the ID domain 'clean'"):
        shift_scores(df, id_domain="clean")


def test_unknown_variant_is_refused() -> None:
    t = synthetic_edges(n_blocks=2, n_heads=2, checkpoints=["c"], domains=["id", "ood"])
    with pytest.raises(MetricError, match="unknown variant"):
        shift_scores(t, id_domain="id", variants=["spearman"])


def test_rank_rows_equals_scipy_rankdata_with_ties() -> None:
    from circuitray.metrics.shift import rank_rows

    x = np.random.default_rng(6).standard_normal((5, 300)).astype(np.float32)
    x[:, :40] = 0.0
    x[:, 100:160] = np.round(x[:, 100:160])
    np.testing.assert_array_equal(rank_rows(x), scipy.stats.rankdata(x, axis=1))


def test_same_size_but_different_edge_set_is_a_mismatch_too() -> None:
    t = synthetic_edges(n_blocks=2, n_heads=2, checkpoints=["ck"], domains=["id", "ood"])
    df = t.to_pandas()
    row = df.index[(df.domain == "ood") & (df.src == "m1") & (df.dst == "logits")][0]
    df.loc[row, "dst"] = "a1.h0<q>"  # same count of edges, one of them different
    df.loc[row, "dst_depth"] = 2
    with pytest.raises(TableError, match="checkpoint 'ck', domain 'ood'.*different edge set"):
        shift_scores(df, id_domain="id")


def _weighted_graph_with_isolated_nodes(n_isolated: int) -> nx.Graph:
    rng = np.random.default_rng(3)
    g = nx.gnm_random_graph(30, 80, seed=4)
    for u, v in g.edges:
        g[u][v]["weight"] = float(rng.uniform(0.1, 2.0))
    g.remove_nodes_from([n for n in list(g) if g.degree(n) == 0])
    g.add_nodes_from(f"isolated{i}" for i in range(n_isolated))
    return g


@pytest.mark.parametrize("n_isolated", [1, 3])
def test_isolated_nodes_get_eigenvalue_zero_and_heat_trace_equals_netlsd(n_isolated: int) -> None:
    """An isolated node's normalized-Laplacian row is zero (networkx, scipy.sparse.csgraph and
    netlsd agree), so it adds e^0 = 1 to the heat trace; eigenvalue 1 put it 50% off."""
    import scipy.sparse.csgraph

    g = _weighted_graph_with_isolated_nodes(n_isolated)
    eigs = normalized_laplacian_eigenvalues(g)
    want = np.sort(np.linalg.eigvalsh(
        scipy.sparse.csgraph.laplacian(nx.to_numpy_array(g), normed=True)))
    np.testing.assert_allclose(eigs, want, atol=1e-10)
    assert (np.abs(eigs) < 1e-10).sum() == n_isolated + nx.number_connected_components(
        g.subgraph(n for n in g if g.degree(n) > 0))
    np.testing.assert_allclose(heat_trace(eigs), netlsd.heat(g, normalization="empty"),
                               rtol=1e-9)


def test_graph_variants_with_a_dead_head_equal_netlsd_and_csgraph() -> None:
    """Zero-score edges in the top-n leave their nodes isolated (weight 0): the netlsd and
    laplacian CSS variants must then equal the reference libraries on circuit_graph."""
    import scipy.sparse.csgraph

    rng = np.random.default_rng(7)
    a, b = circuit(rng.standard_normal(N_EDGES)), circuit(rng.standard_normal(N_EDGES))
    for df, dead in ((a, ("a1.h1", "m2")), (b, ("a1.h1",))):
        touches = df.src.isin(dead) | df.dst.map(lambda d: d.split("<")[0]).isin(dead)
        df.loc[touches, "score"] = 0.0
    ga, gb = circuit_graph(a, N_EDGES), circuit_graph(b, N_EDGES)
    assert "m2" in ga and ga.degree("m2", weight="weight") == 0
    want = np.linalg.norm(netlsd.heat(ga, normalization="empty")
                          - netlsd.heat(gb, normalization="empty"))
    assert circuit_shift_score(a, b, variant="netlsd", top_n=N_EDGES) == pytest.approx(want)

    def eigs(g: nx.Graph) -> np.ndarray:
        lap = scipy.sparse.csgraph.laplacian(nx.to_numpy_array(g), normed=True)
        return np.sort(np.linalg.eigvalsh(lap))

    k = 20
    want = np.linalg.norm(eigs(ga)[:k] - eigs(gb)[:k])
    assert circuit_shift_score(a, b, variant="laplacian", top_n=N_EDGES, k_eigs=k) == \
        pytest.approx(want, abs=1e-9)
