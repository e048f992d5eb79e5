"""EAP / EAP-IG scores against exact oracles (DESIGN §2), in float64 on tiny random ViTs.

The oracle tests are parametrized over model families too (a DeiT distilled beside the
ViTs): one finite-difference oracle proves every family's adapter.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _families import tiny_deit
from _tiny import images, tiny_vit

from circuitray import attribute
from circuitray.attribution import (
    ABLATIONS,
    METHODS,
    METRICS,
    _mean_ablation,
    _Runner,
    compute_ablation,
    metric_per_example,
    node_values,
    score_batch,
)
from circuitray.errors import ConfigError, InputError, UnsupportedModelError
from circuitray.families import ViTAdapter, adapter_for

VARIANTS = {
    "plain": {},
    "reg+layerscale+prenorm+avg": {"reg_tokens": 2, "init_values": 0.5, "pre_norm": True,
                                   "class_token": False, "global_pool": "avg"},
    "noembedcls+qknorm": {"no_embed_class": True, "qk_norm": True, "reg_tokens": 1},
}
# every model the forward and per-step oracles run on: the ViT variants, then other families
MODELS = {
    **{name: functools.partial(tiny_vit, **kw) for name, kw in VARIANTS.items()},
    "deit-distilled": tiny_deit,
    "deit-distilled+layerscale+qknorm+prenorm": functools.partial(
        tiny_deit, init_values=0.5, qk_norm=True, pre_norm=True),
}


def _layernorm_width(adapter, x, input_node) -> float:
    """Smallest sqrt(var + eps) over every LayerNorm row of the run: the input scale on which
    LayerNorm is close to linear (sqrt(eps) ≈ 1e-3 where its input is 0, as in block 0 under
    zero ablation)."""
    widths, handles = [], []
    for mod in adapter.model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            handles.append(mod.register_forward_hook(lambda m, i, _o: widths.append(
                float((i[0].var(-1, unbiased=False) + m.eps).sqrt().min()))))
    try:
        with torch.no_grad():
            adapter.graph_forward(x, input_override=input_node)
    finally:
        for h in handles:
            h.remove()
    return min(widths)


def _finite_differences(adapter, x, input_node, edges, delta, metric, clean_logits,
                        labels=None, rel_step=0.1, max_step=0.03):
    """d/dε Σ_examples M when ε·Δ_u is added to destination v alone, for every edge (u, v).

    Central differences at h, h/2, h/4 with two Richardson steps (error O(h⁶)), so that h
    can be large enough to keep round-off small (KL is tiny near the clean end). h is at most
    `max_step`, and smaller where needed so that h·max|Δ_u| is `rel_step` of the narrowest
    LayerNorm width of the run: a fixed step crosses LayerNorm's nonlinearity where its input
    is near 0 (zero ablation) and returns a "derivative" off by 2-55 % (measured) there.
    All edges × 6 offsets run as one batch through `graph_forward`.
    """
    width = _layernorm_width(adapter, x, input_node)
    n, k = x.shape[0], len(edges)
    h = torch.tensor([min(max_step, rel_step * width / float(delta[u].abs().max()))
                      for u, _ in edges], dtype=x.dtype)
    offsets = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25], dtype=x.dtype)
    reps = len(offsets) * k                       # replicate r = (offset r // k, edge r % k)
    extra = {}
    for j, (u, v) in enumerate(edges):
        bump = extra.setdefault(v, torch.zeros((reps, *input_node.shape), dtype=x.dtype))
        for o, off in enumerate(offsets):
            bump[o * k + j] = off * h[j] * delta[u]
    with torch.no_grad():
        logits = adapter.graph_forward(
            x.repeat(reps, 1, 1, 1), input_override=input_node.repeat(reps, 1, 1),
            dst_extra={v: b.flatten(0, 1) for v, b in extra.items()})
    m = metric_per_example(logits, clean_logits.repeat(reps, 1),
                           None if labels is None else labels.repeat(reps), metric)
    m = m.view(len(offsets), k, n).sum(-1)
    d1, d2, d4 = ((m[i] - m[i + 1]) / (2 * h * offsets[i]) for i in (0, 2, 4))
    r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
    return ((16 * r2 - r1) / 15).numpy()


def _assert_matches_finite_differences(got, fd, where, floor=1e-4):
    """Relative error < 1e-5 on every edge above `floor` of the largest derivative; below that
    the finite difference is at float64 round-off, so bound the absolute error."""
    scale = np.abs(fd).max()
    assert scale > 1e-6, where
    big = np.abs(fd) > floor * scale
    rel = np.abs(got - fd)[big] / np.abs(fd)[big]
    assert big.sum() >= len(fd) // 3, where
    assert rel.max() < 1e-5, (where, rel.max())
    assert np.abs(got - fd).max() < 1e-8 * scale, (where, np.abs(got - fd).max() / scale)


@pytest.mark.parametrize("variant", list(MODELS))
def test_graph_forward_reproduces_timm_forward(variant):
    model, x = MODELS[variant](), images()
    with torch.no_grad():
        torch.testing.assert_close(adapter_for(model).graph_forward(x), model(x),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("variant", ["plain", "reg+layerscale+prenorm+avg", "deit-distilled"])
def test_score_equals_finite_difference_per_edge_at_every_ig_step(variant, metric):
    """Oracle (a): at step k, score(u→v) = d/dε M(run k with in_v += ε(ã_u − a_u))."""
    model, x = MODELS[variant]().requires_grad_(False), images()
    labels = torch.arange(len(x)) % 5 if metric == "ce" else None
    adapter = adapter_for(model)
    g = adapter.graph
    runner = _Runner(adapter, torch.device("cpu"), "fp32")
    # ã from a different reference set, so the α=0 run differs per example (non-degenerate)
    ablated, _, _ = _mean_ablation(runner, [images(seed=1)], "mean-positional")
    clean, clean_logits = runner.sources(x, "x")
    ablated = ablated.expand_as(clean)
    delta = ablated - clean
    steps = 3
    edges = list(zip(*np.nonzero(g.edge_mask()), strict=True))
    for k in range(steps):
        alpha = k / steps
        scores, _ = score_batch(runner, x, ablated, alphas=[alpha], metric=metric,
                                labels=labels)
        e_k = ablated[0] + alpha * (clean[0] - ablated[0])
        fd = _finite_differences(adapter, x, e_k, edges, delta, metric, clean_logits, labels)
        got = np.array([float(scores[u, v]) for u, v in edges])
        _assert_matches_finite_differences(got, fd, f"step {k}")


def _layerscale_shrunk(model, factor=1e-2):
    """Scale every LayerScale γ down: at the zero-ablated input every residual stream then
    stays near 0 (std ~ sqrt(eps)), where LayerNorm is most curved, not only block 0's."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.mul_(factor)
            blk.ls2.gamma.mul_(factor)
    return model


ORACLE_MODELS = {
    "reg+layerscale": lambda: tiny_vit(reg_tokens=1, init_values=0.5),
    "near-zero-layernorm": lambda: _layerscale_shrunk(tiny_vit(reg_tokens=1, init_values=0.5)),
    "deit-distilled": lambda: tiny_deit(init_values=0.5),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("model_name", "ablation"), [
    *[("reg+layerscale", a) for a in ABLATIONS], ("near-zero-layernorm", "zero"),
    *[("deit-distilled", a) for a in ABLATIONS],
])
def test_attribute_equals_finite_difference_for_every_option(model_name, ablation, metric,
                                                            method):
    """Oracle (a) through `attribute` for every option it accepts: each edge's score is the
    mean over IG points of d/dε mean_x M(run with in_v += ε(ã_u − a_u)).

    Under zero ablation block 0's LayerNorm reads exactly 0 (gradient 1/sqrt(eps)); with
    shrunk LayerScale every later LayerNorm reads nearly 0 too (input std 2e-4 to 5e-4).
    """
    model, x = ORACLE_MODELS[model_name]().requires_grad_(False), images(n=4)
    # Center the logits over x so the predicted class differs between examples: with one
    # class for all, EAP's logit scores under mean ablations are all exactly 0 (vacuous).
    with torch.no_grad():
        mean = model(x).mean(0)
        for head in (model.head, getattr(model, "head_dist", None)):  # DeiT: logits average
            if head is not None:                                       # both heads
                head.bias -= mean
    assert len(model(x).argmax(-1).unique()) > 1
    labels = torch.arange(len(x)) % 5
    x_corrupted = images(n=4, seed=3)
    steps = 2
    result = attribute(model, [(x, labels)], method=method, ablation=ablation, metric=metric,
                       steps=steps, device="cpu",
                       corrupted_batches=[x_corrupted] if ablation == "corrupted" else None)
    adapter = adapter_for(model)
    g = adapter.graph
    clean = node_values(model, x, device="cpu")
    with torch.no_grad():
        clean_logits = model(x)
    if ablation == "corrupted":
        ablated = node_values(model, x_corrupted, device="cpu")
    else:
        ablated = compute_ablation(model, [x], ablation, device="cpu").expand_as(clean)
    delta = ablated - clean
    alphas = [0.0] if method == "eap" else [k / steps for k in range(steps)]
    edges = list(zip(*np.nonzero(g.edge_mask()), strict=True))
    fd = np.mean([_finite_differences(adapter, x, ablated[0] + a * (clean[0] - ablated[0]),
                                      edges, delta, metric, clean_logits,
                                      labels if metric == "ce" else None)
                  for a in alphas], axis=0) / len(x)
    got = np.array([result.scores[u, v] for u, v in edges])
    # floor 1e-5: under zero ablation the 1/sqrt(eps) edges into block 0 set the scale
    _assert_matches_finite_differences(got, fd, (model_name, ablation, metric, method),
                                       floor=1e-5)


def test_eap_is_exactly_eap_ig_with_one_step():
    model, x = tiny_vit(), images()
    eap = attribute(model, [x], method="eap", metric="logit")
    ig1 = attribute(model, [x], method="eap-ig-inputs", steps=1, metric="logit")
    assert np.array_equal(eap.scores, ig1.scores) and np.abs(eap.scores).max() > 0
    assert eap.method == "eap" and eap.steps == 1


@pytest.mark.parametrize(("ablation", "metric"), [("mean-positional", "kl"), ("mean", "ce"),
                                                  ("zero", "logit")])
def test_streamed_batches_equal_one_batch(ablation, metric):
    model, x = tiny_vit(), images()
    y = torch.arange(8) % 5
    whole = attribute(model, [(x, y)], ablation=ablation, metric=metric, steps=3)
    parts = attribute(model, [(x[:3], y[:3], "dom"), (x[3:6], y[3:6], "dom"), (x[6:], y[6:])],
                      ablation=ablation, metric=metric, steps=3)
    assert parts.n_examples == whole.n_examples == 8
    np.testing.assert_allclose(parts.scores, whole.scores, rtol=1e-9, atol=1e-15)


def test_mean_positional_baseline_is_the_hand_computed_per_position_mean():
    model, x = tiny_vit(init_values=0.7, reg_tokens=1), images(n=6)
    seen = {"z": [], "mlp": []}
    blk = model.blocks[1]
    h1 = blk.attn.proj.register_forward_pre_hook(lambda _m, i: seen["z"].append(i[0]))
    h2 = blk.mlp.register_forward_hook(lambda _m, _i, o: seen["mlp"].append(o))
    with torch.no_grad():
        model(x)
    h1.remove(), h2.remove()
    emb = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    dh, gamma = blk.attn.head_dim, blk.ls1.gamma
    head1 = seen["z"][0][..., dh:2 * dh] @ blk.attn.proj.weight[:, dh:2 * dh].T * gamma
    mlp = (seen["mlp"][0] - blk.mlp.fc2.bias) * blk.ls2.gamma
    abl = compute_ablation(model, [x[:2], x[2:]])  # streamed in two batches
    g = ViTAdapter(model).graph
    torch.testing.assert_close(abl[g.src_index("input"), 0], emb.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(abl[g.src_index("a1.h1"), 0], head1.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(abl[g.src_index("m1"), 0], mlp.mean(0), rtol=0, atol=1e-12)
    mean = compute_ablation(model, [x], "mean")
    torch.testing.assert_close(mean[:, 0, 0], abl[:, 0].mean(1), rtol=0, atol=1e-12)


def test_fused_and_unfused_attention_give_the_same_scores():
    model, x = tiny_vit(qk_norm=True), images()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    fused = attribute(model, [x], steps=2)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    unfused = attribute(model, [x], steps=2)
    np.testing.assert_allclose(fused.scores, unfused.scores, rtol=1e-9, atol=1e-16)


def test_same_input_and_seed_give_identical_scores():
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(attribute(tiny_vit(), [images()], steps=2).scores)
    assert np.array_equal(runs[0], runs[1])


def test_corrupted_ablation_with_identical_images_scores_zero_and_differs_otherwise():
    model, x = tiny_vit(), images()
    same = attribute(model, [x], ablation="corrupted", corrupted_batches=[x.clone()], steps=2)
    assert np.abs(same.scores).max() == 0.0
    other = attribute(model, [x], ablation="corrupted", corrupted_batches=[images(seed=5)],
                      steps=2, metric="logit")
    assert np.abs(other.scores).max() > 0
    # corrupted ã is the node value on the paired image: check against node_values
    torch.testing.assert_close(node_values(model, x)[0], ViTAdapter(model).embed(x))


def test_per_example_norms_and_frozen_then_restored_parameters():
    model, x = tiny_vit(), images(n=3)
    model.train()
    model.head.weight.requires_grad_(False)
    out = attribute(model, [x[:1]], per_example_norms=True, steps=2)
    assert out.example_norms.shape == (1,)
    assert out.example_norms[0] == pytest.approx(np.linalg.norm(out.scores), rel=1e-12)
    assert model.training and not model.head.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.weight")
    assert all(p.grad is None for p in model.parameters())
    many = attribute(model, [x], per_example_norms=True, steps=2)
    assert many.example_norms.shape == (3,) and (many.example_norms > 0).all()


def test_bf16_autocast_scores_track_fp32():
    model, x = tiny_vit(dtype=torch.float32), images(dtype=torch.float32)
    fp32 = attribute(model, [x], steps=2, metric="logit", device="cpu")
    bf16 = attribute(model, [x], steps=2, metric="logit", device="cpu", dtype="bf16")
    mask = fp32.graph.edge_mask()
    assert bf16.scores.dtype == np.float64
    assert np.corrcoef(fp32.scores[mask], bf16.scores[mask])[0, 1] > 0.9


def test_progress_reports_examples_done():
    calls = []
    attribute(tiny_vit(), [images(n=3), images(n=2)], steps=1,
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 5), (5, 5)]


def test_wrong_image_size_is_refused_naming_the_batch():
    model = tiny_vit()
    with pytest.raises(InputError, match=r"batch 1: .*expects images of size \(8, 8\), got "
                                         r"\(12, 12\)"):
        attribute(model, [images(), images(img=12)])


def test_nan_activations_are_refused_naming_the_node():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite activations .* node 'm1'"):
        attribute(model, [images()])
    with pytest.raises(InputError, match="NaN or infinite pixel"):
        attribute(tiny_vit(), [images().fill_(float("nan"))])


def test_bad_options_and_unsupported_models_are_refused():
    x = images()
    with pytest.raises(UnsupportedModelError, match="global_pool='map'"):
        attribute(tiny_vit(global_pool="map"), [x])
    with pytest.raises(InputError, match="metric 'ce' needs labels"):
        attribute(tiny_vit(), [x], metric="ce")
    with pytest.raises(InputError, match="unlabeled"):
        attribute(tiny_vit(), [(x, torch.full((8,), -1))], metric="ce")
    with pytest.raises(ConfigError, match="metric: unknown 'acc'"):
        attribute(tiny_vit(), [x], metric="acc")
    with pytest.raises(ConfigError, match="corrupted_batches"):
        attribute(tiny_vit(), [x], ablation="corrupted")


def test_dataloader_of_labeled_tuples_equals_a_list_of_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    model, x = tiny_vit(), images()
    loader = DataLoader(TensorDataset(x, torch.arange(8) % 5), batch_size=3)
    a = attribute(model, loader, steps=2)
    b = attribute(model, [x], steps=2)
    assert a.n_examples == 8
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-15)


class _ReshufflingBatches:
    """Re-iterable whose second pass yields the same examples in other batches, as a
    shuffling DataLoader does: a cached plain run must not be reused for other images."""

    def __init__(self, x: torch.Tensor, size: int):
        self.x, self.size, self.passes = x, size, 0

    def __iter__(self):
        order = torch.arange(len(self.x)) if self.passes == 0 else torch.randperm(
            len(self.x), generator=torch.Generator().manual_seed(self.passes))
        self.passes += 1
        return iter([self.x[order[i:i + self.size]] for i in range(0, len(self.x), self.size)])


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_reusing_the_mean_pass_runs_changes_no_score(method):
    """The clean runs kept from the mean pass give the same scores as recomputing them."""
    model, x = tiny_vit(), images(n=8)
    batches = [x[:3], x[3:6], x[6:]]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def forwards(**kw) -> tuple[np.ndarray, int]:
        calls.clear()
        scores = attribute(model, batches, method=method, steps=3, **kw).scores
        return scores, len(calls)

    kept, n_kept = forwards()
    recomputed, n_recomputed = forwards(cache_bytes=0)
    none_fit, n_none_fit = forwards(cache_bytes=1)
    steps = 1 if method == "eap" else 3
    assert n_kept == 3 * (1 + steps)  # mean pass + IG steps; the clean run is reused
    assert n_recomputed == n_none_fit == 3 * (2 + steps)
    np.testing.assert_array_equal(kept, recomputed)
    np.testing.assert_array_equal(none_fit, recomputed)


def test_a_loader_that_reshuffles_gets_fresh_clean_runs():
    model, x = tiny_vit(), images(n=8)
    reshuffled = attribute(model, _ReshufflingBatches(x, 3), steps=3).scores
    reference = attribute(model, _ReshufflingBatches(x, 3), steps=3, cache_bytes=0).scores
    np.testing.assert_allclose(reshuffled, reference, rtol=1e-10, atol=1e-12)
