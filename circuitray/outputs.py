"""Per-example model outputs (OUTPUT_SCHEMA): what every output-based baseline needs.

One forward pass per batch through timm's `forward_features`; `forward_head(pre_logits=True)`
on its tokens gives the penultimate pooled features (RankMe, MMD) and `forward_head` the
logits from which softmax statistics, energy, temperature-scaled variants and BBSD are
derived later, without running the model again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from circuitray.errors import InputError
from circuitray.tables import OUTPUT_SCHEMA
from circuitray.torch_utils import eval_mode, split_batch


def softmax_stats(logits: np.ndarray) -> dict[str, np.ndarray]:
    """pred, max softmax probability, negative entropy and energy (-logsumexp) per row."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    logp = z - lse[:, None]
    p = np.exp(logp)
    return {
        "pred": z.argmax(axis=1).astype(np.int64),
        "max_prob": p.max(axis=1),
        "neg_entropy": (p * logp).sum(axis=1),
        "energy": -lse,
    }


@torch.no_grad()
def model_outputs(model: torch.nn.Module, batches: Iterable[Any], *, task: str,
                  checkpoint: str, domain: str, device: str | torch.device = "cpu",
                  features: bool = True) -> pa.Table:
    """Run `model` over `batches` and return one OUTPUT_SCHEMA row per example.

    Labels < 0 (the unlabeled convention of the loaders) become nulls. `features=False`
    stores empty feature lists, for zoos where RankMe/MMD are not wanted and features
    would dominate the table's size.
    """
    logits_all, feats_all, labels_all = [], [], []
    with eval_mode(model):
        for i, batch in enumerate(batches):
            images, labels = split_batch(batch, f"checkpoint '{checkpoint}', domain "
                                                f"'{domain}', batch {i}")
            images = images.to(device)
            tokens = model.forward_features(images)
            pooled = model.forward_head(tokens, pre_logits=True)
            # not get_classifier()(pooled): a DeiT distilled has two heads on two tokens
            logits = model.forward_head(tokens)
            if not torch.isfinite(logits).all():
                raise InputError(f"checkpoint '{checkpoint}', domain '{domain}': non-finite "
                                 "logits")
            logits_all.append(logits.double().cpu().numpy())
            feats_all.append(pooled.float().cpu().numpy() if features
                             else np.zeros((len(images), 0), np.float32))
            n = len(images)
            labels_all.append(np.full(n, -1, np.int64) if labels is None
                              else labels.reshape(-1).cpu().numpy().astype(np.int64))
    if not logits_all:
        raise InputError(f"checkpoint '{checkpoint}', domain '{domain}': no examples")
    logits = np.concatenate(logits_all)
    feats = np.concatenate(feats_all).astype(np.float32)
    labels = np.concatenate(labels_all)
    stats = softmax_stats(logits)
    n, k, d = logits.shape[0], logits.shape[1], feats.shape[1]
    label_arr = pa.array(labels, mask=labels < 0, type=pa.int64())
    columns = {
        "task": pa.array([task] * n, pa.string()),
        "checkpoint": pa.array([checkpoint] * n, pa.string()),
        "domain": pa.array([domain] * n, pa.string()),
        "example": pa.array(np.arange(n, dtype=np.int64)),
        "label": label_arr,
        "pred": pa.array(stats["pred"]),
        "max_prob": pa.array(stats["max_prob"].astype(np.float32)),
        "neg_entropy": pa.array(stats["neg_entropy"].astype(np.float32)),
        "energy": pa.array(stats["energy"].astype(np.float32)),
        "logits": _fixed_lists(logits.astype(np.float32), k),
        "features": _fixed_lists(feats, d),
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def _fixed_lists(values: np.ndarray, width: int) -> pa.ListArray:
    """A [n, width] float32 array as a list<float32> column without a Python loop."""
    n = values.shape[0]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float32()))
