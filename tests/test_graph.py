"""The graph of DESIGN §1: names, depths, edge existence and the edge-count formula."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from _tiny import tiny_vit

from circuitray.errors import UnsupportedModelError
from circuitray.families import graph_of
from circuitray.graph import ViTGraph, edge_count


@pytest.mark.parametrize(("layers", "heads", "expected"), [
    (12, 6, 9_163), (12, 12, 32_491), (24, 16, 231_877)])
def test_edge_count_formula_matches_the_published_vit_sizes(layers, heads, expected):
    assert edge_count(layers, heads) == expected


@pytest.mark.parametrize(("layers", "heads"), [(1, 1), (2, 2), (3, 4), (5, 3), (12, 12)])
def test_edge_mask_counts_equal_the_formula(layers, heads):
    g = ViTGraph(layers, heads)
    assert int(g.edge_mask().sum()) == edge_count(layers, heads) == g.n_edges
    assert len(g.edges()) == g.n_edges


def test_node_order_depths_and_edge_existence_on_a_two_block_graph():
    g = ViTGraph(2, 2)
    assert g.src_names == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert g.dst_names[:7] == ["a0.h0<q>", "a0.h0<k>", "a0.h0<v>", "a0.h1<q>", "a0.h1<k>",
                               "a0.h1<v>", "m0"]
    assert g.dst_names[-1] == "logits"
    np.testing.assert_array_equal(g.src_depth, [0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(g.dst_depth, [1] * 7 + [2] * 7 + [3])
    mask = g.edge_mask()
    e = lambda s, d: mask[g.src_index(s), g.dst_index(d)]  # noqa: E731
    assert e("input", "a0.h0<q>") and e("a0.h1", "m0") and e("m0", "a1.h0<k>")
    assert e("m1", "logits") and e("a1.h1", "m1")
    assert not e("a0.h0", "a0.h1<v>")  # same block's heads read the same residual
    assert not e("m0", "m0") and not e("a1.h0", "a0.h0<q>") and not e("m1", "a1.h0<q>")


def test_graph_rebuilds_from_names():
    g = ViTGraph(3, 2)
    h = ViTGraph.from_names(list(reversed(g.src_names)), g.dst_names)
    assert (h.n_blocks, h.n_heads, h.dst_names) == (3, 2, g.dst_names)


@pytest.mark.parametrize("kw", [
    {},
    {"reg_tokens": 4, "init_values": 1e-5},                       # registers + LayerScale
    {"class_token": False, "global_pool": "avg"},                 # avg-pool, no cls
    {"no_embed_class": True, "reg_tokens": 2, "pre_norm": True},  # CLIP-style norm_pre
    {"qk_norm": True, "depth": 3, "heads": 4},
])
def test_graph_from_timm_variants_has_formula_edge_count(kw):
    kw = dict(kw)
    depth, heads = kw.pop("depth", 2), kw.pop("heads", 2)
    g = graph_of(tiny_vit(depth=depth, heads=heads, **kw))
    assert (g.n_blocks, g.n_heads) == (depth, heads)
    assert int(g.edge_mask().sum()) == edge_count(depth, heads)


def test_vit_b16_built_on_meta_device_has_32491_edges():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert graph_of(model).n_edges == 32_491


@pytest.mark.parametrize(("kw", "part"), [
    ({"global_pool": "map"}, "global_pool='map'"),
    ({"scale_attn_norm": True}, "scale_norm"),
    ({"block_fn": "ResPostBlock"}, "ResPostBlock"),
    ({"block_fn": "ParallelScalingBlock"}, "ParallelScalingBlock"),
])
def test_unsupported_variants_are_refused_naming_model_and_part(kw, part):
    from timm.models import vision_transformer as vt

    if "block_fn" in kw:
        kw = {"block_fn": getattr(vt, kw["block_fn"])}
    model = tiny_vit(**kw)
    with pytest.raises(UnsupportedModelError) as err:
        graph_of(model)
    assert part in str(err.value) and "vit_tiny_patch16_224" in str(err.value)


def test_a_non_vit_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        graph_of(torch.nn.Linear(3, 3))


def test_graphs_compare_by_shape_and_are_hashable():
    assert ViTGraph(2, 3, "a") == ViTGraph(2, 3, "b") != ViTGraph(3, 2)
    assert len({ViTGraph(2, 3), ViTGraph(2, 3, "x")}) == 1


def test_node_name_helpers_read_block_head_node_and_depth():
    from circuitray.graph import node_block, node_depth, node_head, node_of

    assert [node_of(n) for n in ("a3.h1<q>", "a3.h1", "m2", "input", "logits")] == [
        "a3.h1", "a3.h1", "m2", "input", "logits"]
    assert [node_block(n) for n in ("a3.h1<v>", "m12", "input", "logits")] == [3, 12, None, None]
    assert [node_head(n) for n in ("a3.h10<k>", "a0.h0", "m1", "input")] == [10, 0, None, None]
    g = ViTGraph(3, 2)
    assert [node_depth(n, 3) for n in g.src_names] == g.src_depth.tolist()
    assert [node_depth(n, 3) for n in g.dst_names] == g.dst_depth.tolist()


@pytest.mark.parametrize("bad", ["a3", "m1<q>", "x0.h1", "a1.h2<z>", ""])
def test_malformed_node_names_are_refused_naming_the_name(bad):
    from circuitray.errors import TableError
    from circuitray.graph import node_depth

    with pytest.raises(TableError, match="node name"):
        node_depth(bad, 4)


def test_graph_module_imports_neither_torch_nor_a_model_family():
    import subprocess
    import sys

    code = ("import sys, circuitray.graph, circuitray.metrics; "
            "bad = [m for m in ('torch', 'timm', 'circuitray.families', 'circuitray.hooks') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
