"""EAP / EAP-IG scores against exact oracles (DESIGN §2), in float64 on tiny random ViTs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import images, tiny_vit

from circuitray import attribute
from circuitray.attribution import (
    _mean_ablation,
    _Runner,
    compute_ablation,
    metric_per_example,
    node_values,
    score_batch,
)
from circuitray.errors import ConfigError, InputError, UnsupportedModelError
from circuitray.hooks import ViTAdapter

VARIANTS = {
    "plain": {},
    "reg+layerscale+prenorm+avg": {"reg_tokens": 2, "init_values": 0.5, "pre_norm": True,
                                   "class_token": False, "global_pool": "avg"},
    "noembedcls+qknorm": {"no_embed_class": True, "qk_norm": True, "reg_tokens": 1},
}


def _finite_difference(adapter, x, input_node, extra_dst, extra, metric, clean_logits,
                       eps=1e-3):
    """d/dε Σ_examples M when ε·`extra` is added to destination `extra_dst` alone.

    Central differences with one Richardson step (error O(ε⁴)), so large ã − a do not
    leave truncation error above the 1e-5 tolerance.
    """
    def m(step):
        with torch.no_grad():
            logits = adapter.graph_forward(x, input_override=input_node,
                                           dst_extra={extra_dst: step * extra})
        return float(metric_per_example(logits, clean_logits, None, metric).sum())

    def central(h):
        return (m(h) - m(-h)) / (2 * h)
    return (4 * central(eps / 2) - central(eps)) / 3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graph_forward_reproduces_timm_forward(variant):
    model, x = tiny_vit(**VARIANTS[variant]), images()
    with torch.no_grad():
        torch.testing.assert_close(ViTAdapter(model).graph_forward(x), model(x),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ["logit", "kl"])
@pytest.mark.parametrize("variant", ["plain", "reg+layerscale+prenorm+avg"])
def test_score_equals_finite_difference_per_edge_at_every_ig_step(variant, metric):
    """Oracle (a): at step k, score(u→v) = d/dε M(run k with in_v += ε(ã_u − a_u))."""
    model, x = tiny_vit(**VARIANTS[variant]).requires_grad_(False), images()
    adapter = ViTAdapter(model)
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
        scores, _ = score_batch(runner, x, ablated, alphas=[alpha], metric=metric)
        e_k = ablated[0] + alpha * (clean[0] - ablated[0])
        fd = np.array([_finite_difference(adapter, x, e_k, v, delta[u], metric, clean_logits)
                       for u, v in edges])
        got = np.array([float(scores[u, v]) for u, v in edges])
        scale = np.abs(fd).max()
        assert scale > 1e-6
        # relative error for every edge above 1e-4 of the largest derivative; below that the
        # finite difference itself is at float64 round-off, so bound the absolute error
        big = np.abs(fd) > 1e-4 * scale
        rel = np.abs(got - fd)[big] / np.abs(fd)[big]
        assert big.sum() >= len(edges) // 3
        assert rel.max() < 1e-5, (k, rel.max())
        assert np.abs(got - fd).max() < 1e-8 * scale


def test_eap_ig_equals_mean_of_step_finite_differences():
    model, x = tiny_vit(**VARIANTS["plain"]), images()
    steps = 4
    result = attribute(model, [x], steps=steps, metric="kl")
    adapter = ViTAdapter(model)
    runner = _Runner(adapter, torch.device("cpu"), "fp32")
    ablated = compute_ablation(model, [x])
    clean, clean_logits = runner.sources(x, "x")
    ablated = ablated.expand_as(clean)
    g = adapter.graph
    for src, dst in [("input", "a0.h1<k>"), ("a0.h0", "a1.h1<q>"), ("m0", "logits"),
                     ("a1.h1", "m1"), ("input", "a1.h0<v>")]:
        u, v = g.src_index(src), g.dst_index(dst)
        fds = [_finite_difference(adapter, x, ablated[0] + k / steps * (clean[0] - ablated[0]),
                                  v, ablated[u] - clean[u], "kl", clean_logits)
               for k in range(steps)]
        expected = np.mean(fds) / x.shape[0]
        assert result.scores[u, v] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert expected != 0


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
