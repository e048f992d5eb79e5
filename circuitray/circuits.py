"""Circuits: choose edges from scores, prune dangling ones, run a model with only them, and
measure how faithful the circuit is (MIB faithfulness curve, CPR and CMD; DESIGN §2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from circuitray.attribution import (
    EdgeScores,
    _device,
    _labels_for,
    compute_ablation,
    metric_per_example,
    node_values,
)
from circuitray.errors import ConfigError, InputError
from circuitray.families import adapter_for
from circuitray.graph import ViTGraph
from circuitray.torch_utils import eval_mode, split_batch

DEFAULT_SIZES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def select_edges(scores: EdgeScores | np.ndarray, *, top_n: int | None = None,
                 fraction: float | None = None, threshold: float | None = None,
                 absolute: bool = True, graph: ViTGraph | None = None) -> np.ndarray:
    """Boolean [n_src, n_dst] mask of the chosen edges; exactly one criterion is given.

    Ranking is by |score| (`absolute`) or signed score, ties broken in forward order; only
    existing edges are eligible (all entries when a bare array comes without a graph).
    """
    if sum(c is not None for c in (top_n, fraction, threshold)) != 1:
        raise ConfigError("select_edges: give exactly one of top_n, fraction, threshold")
    if isinstance(scores, EdgeScores):
        graph, values = scores.graph, scores.scores
    else:
        values = np.asarray(scores, dtype=np.float64)
    eligible = graph.edge_mask() if graph is not None else np.ones(values.shape, bool)
    if eligible.shape != values.shape:
        raise ConfigError(f"select_edges: scores of shape {values.shape} for a graph of "
                          f"shape {eligible.shape}")
    key = np.abs(values) if absolute else values
    if threshold is not None:
        return eligible & (key >= threshold)
    n_eligible = int(eligible.sum())
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"select_edges: fraction must be in [0, 1], got {fraction}")
        top_n = int(round(fraction * n_eligible))
    if top_n < 0:
        raise ConfigError(f"select_edges: top_n must be >= 0, got {top_n}")
    flat = np.flatnonzero(eligible)
    order = flat[np.argsort(-key.ravel()[flat], kind="stable")[:top_n]]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return mask.reshape(values.shape)


def prune(graph: ViTGraph, mask: np.ndarray) -> np.ndarray:
    """Keep only edges on some path `input` → … → `logits` inside the circuit.

    A head or MLP node is reached when any of its destinations (q, k, v or MLP input) has a
    kept edge from a reached source; it is useful when one of its kept out-edges goes to a
    useful node (logits is useful). Edges from unreached or into useless nodes are dropped.
    """
    mask = np.asarray(mask, dtype=bool) & graph.edge_mask()
    src_index = {n: i for i, n in enumerate(graph.src_names)}
    dst_owner = np.array([src_index.get(graph.dst_node(j), -1) for j in range(graph.n_dst)])
    reached = np.zeros(graph.n_src, dtype=bool)
    reached[0] = True
    for j in range(graph.n_dst - 1):  # forward order: a node's sources precede it
        if (mask[:, j] & reached).any():
            reached[dst_owner[j]] = True
    mask &= reached[:, None]
    useful = np.zeros(graph.n_src, dtype=bool)
    dst_useful = np.zeros(graph.n_dst, dtype=bool)
    dst_useful[-1] = True
    for u in range(graph.n_src - 1, -1, -1):  # backward: a node's readers follow it
        useful[u] = bool((mask[u] & dst_useful).any())
        dst_useful |= (dst_owner == u) & useful[u]
    dst_useful = np.where(dst_owner >= 0, useful[dst_owner], True)
    return mask & useful[:, None] & dst_useful[None, :]


def run_with_circuit(model: nn.Module, images: torch.Tensor, mask: np.ndarray, *,
                     ablation: str | torch.Tensor = "mean-positional",
                     reference: Iterable | None = None, corrupted: torch.Tensor | None = None,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """Logits with only the circuit's edges intact; every other edge carries ã_u instead.

    `ablation` is a kind (means are taken over `reference` batches, default `images`) or a
    precomputed ã [n_src, N|1, T|1, D]; 'corrupted' takes ã from `corrupted` images.
    """
    adapter = adapter_for(model)
    dev = _device(device)
    model.to(dev)
    dtype = next(model.parameters()).dtype
    adapter.check_images(images, "images")
    images = images.to(dev, dtype=dtype)
    if isinstance(ablation, torch.Tensor):
        abl = ablation
    elif ablation == "corrupted":
        if corrupted is None:
            raise ConfigError("run_with_circuit: ablation='corrupted' needs `corrupted` images")
        abl = node_values(model, corrupted, device=dev)
    else:
        abl = compute_ablation(model, reference if reference is not None else [images],
                               ablation, device=dev)
    m = torch.as_tensor(np.asarray(mask, dtype=bool) & adapter.graph.edge_mask(), device=dev)
    with torch.no_grad(), eval_mode(model):
        return adapter.graph_forward(images, mask=m, ablated=abl.to(dev))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def faithfulness(model: nn.Module, batches: Iterable, edge_scores: EdgeScores, *,
                 sizes: Sequence[float] = DEFAULT_SIZES, metric: str | None = None,
                 ablation: str | None = None, corrupted_batches: Iterable | None = None,
                 absolute: bool = True, prune_circuit: bool = False,
                 device: str | torch.device | None = None
                 ) -> tuple[pd.DataFrame, float, float]:
    """MIB faithfulness f(C) = (M(C) − M(∅)) / (M(N) − M(∅)) over circuit sizes (% of edges).

    M is the dataset mean of the attribution metric (default: the one the scores used).
    CPR = ∫ f and CMD = ∫ |1 − f| by the trapezoid rule over the edge fraction (0…1].
    """
    metric = metric or edge_scores.metric or "kl"
    ablation = ablation or edge_scores.ablation or "mean-positional"
    adapter = adapter_for(model)
    graph, dev = adapter.graph, _device(device)
    model.to(dev)
    dtype = next(model.parameters()).dtype
    if graph.n_src != edge_scores.graph.n_src or graph.n_dst != edge_scores.graph.n_dst:
        raise ConfigError(f"faithfulness: scores are for a {edge_scores.graph.n_blocks}-block "
                          f"{edge_scores.graph.n_heads}-head graph, model '{adapter.name}' is "
                          f"{graph.n_blocks}-block {graph.n_heads}-head")
    sizes = sorted(float(s) for s in sizes)
    masks = []
    for s in sizes:
        mk = select_edges(edge_scores, top_n=int(round(s / 100 * graph.n_edges)),
                          absolute=absolute)
        masks.append(prune(graph, mk) if prune_circuit else mk)
    masks_t = [torch.as_tensor(m, device=dev) for m in masks]
    empty = torch.zeros(graph.n_src, graph.n_dst, dtype=torch.bool, device=dev)
    abl = None if ablation == "corrupted" else compute_ablation(model, batches, ablation,
                                                                device=dev)
    corrupted = iter(corrupted_batches) if corrupted_batches is not None else None
    sums, n = np.zeros(len(sizes) + 2), 0
    with torch.no_grad(), eval_mode(model):
        for i, item in enumerate(batches):
            images, labels = split_batch(item, f"batch {i}")
            adapter.check_images(images, f"batch {i}")
            images = images.to(dev, dtype=dtype)
            labels = _labels_for(metric, labels, images.shape[0], f"batch {i}", dev)
            if corrupted is not None:
                abl = node_values(model, split_batch(next(corrupted), "corrupted")[0], device=dev)
            if abl is None:
                raise ConfigError("faithfulness: ablation='corrupted' needs corrupted_batches")
            clean = model(images)
            for k, m in enumerate([*masks_t, empty, None]):
                logits = adapter.graph_forward(images, mask=m, ablated=abl)
                sums[k] += float(metric_per_example(logits, clean, labels, metric).sum())
            n += images.shape[0]
    if n == 0:
        raise InputError("faithfulness: the dataset is empty")
    means = sums / n
    m_circ, m_empty, m_full = means[:-2], means[-2], means[-1]
    denom = m_full - m_empty
    f = (m_circ - m_empty) / denom if denom != 0 else np.full(len(sizes), math.nan)
    curve = pd.DataFrame({"size_pct": sizes, "n_edges": [int(m.sum()) for m in masks],
                          "metric": m_circ, "faithfulness": f})
    curve.attrs.update(metric_full=m_full, metric_empty=m_empty, metric_name=metric)
    x = np.asarray(sizes) / 100
    return curve, _trapezoid(f, x), _trapezoid(np.abs(1 - f), x)
