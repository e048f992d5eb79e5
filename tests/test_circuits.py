"""Circuits: selection, pruning, circuit runs and faithfulness; completeness on a trained ViT.

Circuit runs are checked on every model family (`_families.FAMILY_MODELS`).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _families import FAMILY_MODELS, tiny_deit
from _tiny import images, tiny_vit, trained_vit

from circuitray import attribute
from circuitray.attribution import compute_ablation, metric_per_example, node_values
from circuitray.circuits import faithfulness, prune, run_with_circuit, select_edges
from circuitray.errors import ConfigError
from circuitray.families import ViTAdapter, adapter_for
from circuitray.graph import ViTGraph


@pytest.mark.parametrize("make", [
    tiny_vit,
    functools.partial(tiny_vit, reg_tokens=2, init_values=0.3, class_token=False,
                      global_pool="avg"),
    functools.partial(tiny_deit, init_values=0.3),
], ids=["vit", "vit-reg-avg", "deit-distilled"])
def test_full_circuit_reproduces_clean_logits(make):
    model, x = make(), images()
    full = np.ones((7, 15), dtype=bool)
    with torch.no_grad():
        torch.testing.assert_close(run_with_circuit(model, x, full), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_empty_circuit_reproduces_the_fully_ablated_run(family):
    model, x, xc = FAMILY_MODELS[family](init_values=0.5), images(), images(seed=7)
    empty = np.zeros((7, 15), dtype=bool)
    adapter = adapter_for(model)
    with torch.no_grad():
        # corrupted: every destination reads the corrupted run's nodes = the corrupted run
        torch.testing.assert_close(run_with_circuit(model, x, empty, ablation="corrupted",
                                                    corrupted=xc), model(xc), rtol=0, atol=1e-6)
        # mean-positional: the readout sees the per-position mean of the final residual
        resid = []
        h = model.norm.register_forward_hook(lambda _m, i, _o: resid.append(i[0]))
        model(x)
        h.remove()
        expected = adapter.readout(resid[0].mean(0, keepdim=True)).expand(8, -1)
        torch.testing.assert_close(run_with_circuit(model, x, empty), expected,
                                   rtol=0, atol=1e-6)
        assert not torch.allclose(expected, model(x), atol=1e-3)


def test_select_edges_by_top_n_fraction_threshold_and_sign():
    g = ViTGraph(2, 2)
    rng = np.random.default_rng(0)
    scores = np.where(g.edge_mask(), rng.normal(size=(g.n_src, g.n_dst)), 99.0)
    top = select_edges(scores, top_n=5, graph=g)
    assert top.sum() == 5 and not (top & ~g.edge_mask()).any()
    assert np.abs(scores[top]).min() >= np.abs(scores[g.edge_mask() & ~top]).max()
    signed = select_edges(scores, top_n=5, absolute=False, graph=g)
    assert scores[signed].min() >= scores[g.edge_mask() & ~signed].max()
    assert select_edges(scores, fraction=0.5, graph=g).sum() == round(0.5 * g.n_edges)
    thr = select_edges(scores, threshold=1.0, graph=g)
    assert thr.sum() == (np.abs(scores[g.edge_mask()]) >= 1.0).sum()
    with pytest.raises(ConfigError, match="exactly one"):
        select_edges(scores, top_n=3, threshold=1.0)


def test_prune_drops_edges_off_every_input_to_logits_path():
    g = ViTGraph(2, 2)
    mask = np.zeros((g.n_src, g.n_dst), dtype=bool)
    on = [("input", "a0.h0<v>"), ("a0.h0", "m0"), ("m0", "logits"),   # a complete path
          ("a0.h1", "logits"),                                          # a0.h1 never reached
          ("input", "a1.h1<q>")]                                        # a1.h1 feeds nothing
    for s, d in on:
        mask[g.src_index(s), g.dst_index(d)] = True
    kept = prune(g, mask)
    got = {(g.src_names[s], g.dst_names[d]) for s, d in zip(*np.nonzero(kept), strict=True)}
    assert got == {("input", "a0.h0<v>"), ("a0.h0", "m0"), ("m0", "logits")}
    assert prune(g, g.edge_mask()).sum() == g.n_edges


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_faithfulness_curve_ends_at_one_and_cpr_cmd_are_trapezoids(family):
    model, x = FAMILY_MODELS[family](), images()
    scores = attribute(model, [x[:4], x[4:]], steps=2)
    curve, cpr, cmd = faithfulness(model, [x[:4], x[4:]], scores, sizes=(0, 10, 50, 100))
    assert list(curve["n_edges"]) == [0, round(0.1 * 46), 23, 46]
    assert curve["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert curve["faithfulness"].iloc[0] == pytest.approx(0.0, abs=1e-9)
    f, xs = curve["faithfulness"].to_numpy(), curve["size_pct"].to_numpy() / 100
    assert cpr == pytest.approx(np.trapezoid(f, xs))
    assert cmd == pytest.approx(np.trapezoid(np.abs(1 - f), xs))


def _patching_effects(model, x, ablated, edges, metric, clean_logits):
    """Exact effect of ablating each single edge: mean M(N without u→v) − M(N)."""
    adapter = ViTAdapter(model)
    g = adapter.graph
    base = metric_per_example(adapter.graph_forward(x), clean_logits, None, metric).mean()
    out = []
    for u, v in edges:
        mask = torch.ones(g.n_src, g.n_dst, dtype=torch.bool)
        mask[u, v] = False
        logits = adapter.graph_forward(x, mask=mask, ablated=ablated)
        out.append(float(metric_per_example(logits, clean_logits, None, metric).mean() - base))
    return np.array(out)


@pytest.mark.slow
def test_completeness_and_single_edge_patching_on_a_trained_vit(capsys):
    """Oracle (c): Σ scores(input→·) → M(input ablated) − M(clean) with many IG steps."""
    model, acc = trained_vit()
    assert acc > 0.6  # the tiny ViT really learned digits
    from _tiny import digits_data

    x = digits_data()[0][1500:1564].double()
    batches = [x[:32], x[32:]]
    scores = attribute(model, batches, steps=64, metric="kl")
    adapter = ViTAdapter(model)
    ablated = compute_ablation(model, batches)
    with torch.no_grad():
        clean = model(x)
        e_abl = ablated[0].expand(x.shape[0], -1, -1)
        m_abl = metric_per_example(adapter.graph_forward(x, input_override=e_abl), clean,
                                   None, "kl").mean()
    total = scores.scores[0].sum()
    assert float(m_abl) > 0.05
    assert total == pytest.approx(float(m_abl), rel=0.03)

    eap = attribute(model, batches, method="eap", metric="kl")
    edges = list(zip(*np.nonzero(scores.graph.edge_mask()), strict=True))  # all 46
    with torch.no_grad():
        effects = _patching_effects(model, x, ablated, edges, "kl", clean)
    ig = np.array([scores.scores[u, v] for u, v in edges])
    ep = np.array([eap.scores[u, v] for u, v in edges])
    r_ig, r_eap = np.corrcoef(ig, effects)[0, 1], np.corrcoef(ep, effects)[0, 1]
    with capsys.disabled():
        print(f"\n[trained digits ViT, acc {acc:.3f}] completeness: sum={total:.5f} "
              f"exact={float(m_abl):.5f}; Pearson r with exact single-edge patching over "
              f"{len(edges)} edges: EAP-IG(64) {r_ig:.3f}, EAP {r_eap:.3f}")
    assert r_ig > 0 and r_eap > 0


def test_corrupted_node_values_drive_circuit_runs():
    model, x, xc = tiny_vit(), images(), images(seed=3)
    abl = node_values(model, xc)
    empty = np.zeros((7, 15), dtype=bool)
    with torch.no_grad():
        torch.testing.assert_close(run_with_circuit(model, x, empty, ablation=abl), model(xc),
                                   rtol=0, atol=1e-6)


def test_circuit_helpers_run_in_eval_mode_and_restore_train_mode():
    model, x = tiny_vit(drop_rate=0.5, proj_drop_rate=0.5), images()
    model.train()
    full = np.ones((7, 15), dtype=bool)
    a = run_with_circuit(model, x, full)
    b = run_with_circuit(model, x, full)
    assert model.training  # restored
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no dropout in circuit runs
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(a, model(x), rtol=0, atol=1e-6)
