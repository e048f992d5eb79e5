"""Tiny job fixtures for the pipeline tests: a DomainBed-style folder, checkpoints, manifest.

Written by the tests themselves (no zoo training): random-weight 2-block ViTs saved with
safetensors, 2 classes of coloured 16 px images in an `id` and an `ood` domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

ARCH = "vit_tiny_patch16_224"
ARCH_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def write_domains(root: Path, n_per_class: int = 8, seed: int = 0, size: int = 16) -> Path:
    """root/{id,ood}/{0,1}/*.png: class = dominant colour; OOD swaps in noisier images."""
    rng = np.random.default_rng(seed)
    for domain, noise in (("id", 20), ("ood", 90)):
        for label in (0, 1):
            folder = root / domain / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = np.full((size, size, 3), 60, np.float64)
                img[..., label] = 200
                img += rng.normal(0, noise, img.shape)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_checkpoints(root: Path, n: int = 2, corrupt: tuple[str, ...] = (),
                      arch_kwargs: dict | None = None, n_per_class: int = 8) -> Path:
    """n random-weight checkpoints (+ truncated ones named in `corrupt`) and a manifest.csv."""
    arch_kwargs = dict(arch_kwargs or ARCH_KWARGS)
    data = write_domains(root / "data", n_per_class, size=arch_kwargs["img_size"])
    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    rows = []
    ids = [f"ckpt{i}" for i in range(n)] + list(corrupt)
    for i, cid in enumerate(ids):
        torch.manual_seed(i)
        model = timm.create_model(ARCH, pretrained=False, num_classes=2, **arch_kwargs)
        path = weights / f"{cid}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        if cid in corrupt:
            path.write_bytes(path.read_bytes()[:200])  # truncated download
        rows.append({"checkpoint_id": cid, "task": "toy", "arch": ARCH,
                     "arch_kwargs": json.dumps(arch_kwargs), "weights": f"weights/{path.name}",
                     "num_classes": 2, "data_root": str(data), "id_domain": "id",
                     "ood_domain": "ood", "lr": 10.0 ** -(i + 2), "seed": i})
    import pandas as pd

    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
