"""The family seam: lookup by model class, and DeiT distilled as a second family end to end.

The DeiT distilled family's finite-difference oracles run in test_attribution.py and its
circuit runs in test_circuits.py, parametrized over families; here: what is specific to it
(distillation token, two averaged heads, one `logits` node) and a job run on a DeiT zoo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _families import DEIT_ARCH, tiny_deit
from _jobdata import write_domains
from _tiny import images, tiny_vit

from circuitray.errors import UnsupportedModelError
from circuitray.families import (
    DeiTDistilledAdapter,
    ViTAdapter,
    adapter_for,
    families,
    family_of,
    graph_of,
)
from circuitray.graph import edge_count

DEIT_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_each_model_finds_its_family_by_class():
    assert family_of(tiny_vit()) is ViTAdapter
    assert family_of(tiny_deit()) is DeiTDistilledAdapter
    # a non-distilled DeiT is a plain VisionTransformer: the ViT family reads it
    plain_deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8,
                                   patch_size=4, embed_dim=16, depth=1, num_heads=2)
    assert family_of(plain_deit) is ViTAdapter
    assert {f.family for f in families().values()} >= {"vit", "deit-distilled"}
    with pytest.raises(UnsupportedModelError, match=r"Linear is not a timm .*deit-distilled"):
        adapter_for(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(("layers", "heads"), [(1, 1), (2, 2), (3, 4)])
def test_deit_distilled_edge_count_equals_formula_and_enumerated_edges(layers, heads):
    g = graph_of(tiny_deit(depth=layers, heads=heads, dim=4 * heads))
    assert (g.n_blocks, g.n_heads) == (layers, heads)
    assert g.n_edges == edge_count(layers, heads) == int(g.edge_mask().sum()) == len(g.edges())
    assert g.dst_names[-1] == "logits" and g.dst_names.count("logits") == 1


@pytest.mark.parametrize(("arch", "expected"), [
    ("deit_small_distilled_patch16_224", 9_163), ("deit_base_distilled_patch16_224", 32_491)])
def test_published_deit_distilled_sizes_have_the_vit_edge_counts(arch, expected):
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    g = graph_of(model)
    assert g.n_edges == expected and g.model_name == arch


def test_distillation_token_is_part_of_the_input_node():
    model, x = tiny_deit(), images(n=3)
    ad = adapter_for(model)
    assert ad.extra_tokens == ("cls", "dist")
    with torch.no_grad():
        e = ad.embed(x)
        n_patches = model.patch_embed.num_patches
        assert e.shape == (3, n_patches + 2, 16)
        dist = model.dist_token[0, 0] + model.pos_embed[0, 1]
        torch.testing.assert_close(e[:, 1], dist.expand(3, -1), rtol=0, atol=1e-12)


def test_logits_average_both_heads_and_one_logits_node_reads_tokens_0_and_1():
    """logits = (head(x̂₀) + head_dist(x̂₁)) / 2 in eval; ∂logits/∂(final residual) is
    non-zero on the class and distillation tokens only, so the single `logits` destination
    carries both heads."""
    model, x = tiny_deit(), images(n=3)
    ad = adapter_for(model)
    with ad.instrument() as rec:
        logits = model(x)
    final = rec.final
    with torch.no_grad():
        n = model.norm(final)
        torch.testing.assert_close(logits, (model.head(n[:, 0]) + model.head_dist(n[:, 1])) / 2,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(ad.readout(final), logits, rtol=0, atol=0)
    resid = final.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(ad.readout(resid)[:, 2].sum(), resid)
    per_token = grad.abs().sum((0, 2))
    assert (per_token[:2] > 0).all() and (per_token[2:] == 0).all()
    with torch.no_grad():  # both heads matter: without head_dist the logits move
        model.head_dist.weight.zero_()
        assert not torch.allclose(ad.readout(final), logits, atol=1e-6)


def test_instrumented_forward_and_graph_forward_agree_on_deit():
    model, x = tiny_deit(init_values=0.5, qk_norm=True), images()
    ad = adapter_for(model)
    with torch.no_grad():
        e = ad.embed(images(seed=4)) * 0.7  # a replaced `input` node, as IG runs use
        with ad.instrument(input_override=e) as rec:
            timm_logits = model(x)
        torch.testing.assert_close(ad.graph_forward(x, input_override=e), timm_logits,
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(ad.readout(rec.final), timm_logits, rtol=0, atol=0)
        nodes = ad.expand_sources(rec.input, rec.z, rec.mlp)
        # the residual stream is the sum of the nodes plus the proj/MLP biases
        biases = sum(ad._bias(b.attn.proj, b.ls1, e) + ad.mlp_bias(i, e)
                     for i, b in enumerate(model.blocks))
        torch.testing.assert_close(nodes.sum(0) + biases, rec.final, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("make", "part"), [
    (lambda: tiny_deit(reg_tokens=1), "reg_tokens=1"),
    (lambda: ViTAdapter(tiny_deit()), "distillation token"),
])
def test_what_the_deit_family_cannot_read_is_refused_naming_model_and_part(make, part):
    with pytest.raises(UnsupportedModelError) as err:
        model = make()
        adapter_for(model)
    assert part in str(err.value) and DEIT_ARCH in str(err.value)


def test_per_example_outputs_of_a_deit_are_its_averaged_logits():
    from circuitray.outputs import model_outputs

    model, x = tiny_deit(), images(n=4)
    table = model_outputs(model, [x], task="t", checkpoint="c", domain="d")
    got = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-6, atol=1e-6)


# -- a job on a DeiT distilled zoo ------------------------------------------------------
def _write_deit_zoo(root: Path, n: int = 2) -> Path:
    """n random-weight DeiT distilled checkpoints (safetensors) and their manifest."""
    import pandas as pd
    from safetensors.torch import save_file

    data = write_domains(root / "data", 8, size=DEIT_KWARGS["img_size"])
    (root / "weights").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        torch.manual_seed(i)
        model = timm.create_model(DEIT_ARCH, pretrained=False, num_classes=2, **DEIT_KWARGS)
        path = root / "weights" / f"deit{i}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        rows.append({"checkpoint_id": f"deit{i}", "task": "toy", "arch": DEIT_ARCH,
                     "arch_kwargs": json.dumps(DEIT_KWARGS), "weights": f"weights/{path.name}",
                     "num_classes": 2, "data_root": str(data), "id_domain": "id",
                     "ood_domain": "ood", "seed": i})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _deit_job(tmp: Path, *extra: str):
    from circuitray.job_config import load_job_config

    conf = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
    return load_job_config(conf, [f"manifest={_write_deit_zoo(tmp)}",
                                  f"output_dir={tmp / 'job'}", *extra])


def _check_deit_edges(edges) -> None:
    n = edge_count(DEIT_KWARGS["depth"], DEIT_KWARGS["num_heads"])
    per = edges.groupby(["checkpoint", "domain"]).size()
    assert (per == n).all(), per
    assert np.isfinite(edges.score).all() and (edges.score != 0).any()
    assert set(edges.dst[edges.dst_depth == DEIT_KWARGS["depth"] + 1]) == {"logits"}


def test_discover_writes_a_full_edge_table_for_a_deit_distilled_checkpoint(tmp_path):
    from circuitray.runtime.discover import discover_checkpoint
    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.plan import manifest_rows
    from circuitray.tables import read_parquet

    cfg = _deit_job(tmp_path, "data.shift_kinds=[]", "data.proxy_kinds=[]")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result.get("error")
    edges = read_parquet(JobLayout.of(cfg.output_dir).edges).to_pandas()
    assert set(edges.domain) == {"id", "ood"}
    _check_deit_edges(edges)


@pytest.mark.slow
def test_pipeline_job_runs_end_to_end_on_a_deit_distilled_zoo(tmp_path, local_ray):
    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.pipeline import run_pipeline
    from circuitray.tables import read_parquet

    cfg = _deit_job(tmp_path, "tracking.enabled=false")
    result = run_pipeline(cfg)
    assert sorted(result.discover.done) == ["deit0", "deit1"] and result.discover.failed == []
    layout = JobLayout.of(cfg.output_dir)
    _check_deit_edges(read_parquet(layout.edges).to_pandas())
    for name in ("depth", "shift", "baselines", "domains"):
        assert (layout.metrics / f"{name}.parquet").exists(), name
    assert "circuit.png" in {p.name for p in result.reduce.figures}
