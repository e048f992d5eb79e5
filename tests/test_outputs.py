"""The outputs table: one row per example, statistics that agree with torch's own."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from circuitray.errors import InputError
from circuitray.outputs import model_outputs, softmax_stats
from circuitray.tables import OUTPUT_SCHEMA


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()


def test_outputs_match_forward_and_softmax(tiny_vit: torch.nn.Module) -> None:
    images = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 0, -1])
    batches = [(images[:5], labels[:5], ["d"] * 5), (images[5:], labels[5:], ["d"] * 3)]
    table = model_outputs(tiny_vit, batches, task="t", checkpoint="c", domain="d")
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.num_rows == 8
    assert table.column("example").to_pylist() == list(range(8))
    assert table.column("label").to_pylist() == [0, 1, 2, 3, 4, None, 0, None]
    with torch.no_grad():
        ref = tiny_vit(images).double()
        feats = tiny_vit.forward_head(tiny_vit.forward_features(images), pre_logits=True)
    logits = np.array(table.column("logits").to_pylist())
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(table.column("features").to_pylist()), feats.numpy(),
                               rtol=1e-6, atol=1e-6)
    p = torch.softmax(ref, dim=1)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), ref.argmax(1).numpy())
    np.testing.assert_allclose(table.column("max_prob").to_numpy(), p.max(1).values.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(table.column("neg_entropy").to_numpy(),
                               (p * p.log()).sum(1).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table.column("energy").to_numpy(),
                               (-torch.logsumexp(ref, 1)).numpy(), rtol=1e-5)


def test_softmax_stats_are_stable_for_huge_logits() -> None:
    stats = softmax_stats(np.array([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(stats["max_prob"], [1.0, 1 / 3])
    np.testing.assert_allclose(stats["neg_entropy"], [0.0, -np.log(3)], atol=1e-12)
    np.testing.assert_allclose(stats["energy"], [-1000.0, -np.log(3)])


def test_features_can_be_left_out(tiny_vit: torch.nn.Module) -> None:
    table = model_outputs(tiny_vit, [torch.randn(3, 3, 16, 16)], task="t", checkpoint="c",
                          domain="d", features=False)
    assert table.column("features").to_pylist() == [[], [], []]
    assert table.column("label").null_count == 3


def test_empty_domain_and_bad_batch_name_the_checkpoint(tiny_vit: torch.nn.Module) -> None:
    with pytest.raises(InputError, match="checkpoint 'c', domain 'd'"):
        model_outputs(tiny_vit, [], task="t", checkpoint="c", domain="d")
    with pytest.raises(InputError, match="batch"):
        model_outputs(tiny_vit, [{"x": 1}], task="t", checkpoint="c", domain="d")
