"""Tiny timm ViTs for the engine's tests: random float64 ones, and one trained on digits."""

from __future__ import annotations

import functools

import numpy as np
import timm
import torch


def tiny_vit(*, depth: int = 2, heads: int = 2, dim: int = 16, img: int = 8, patch: int = 4,
             classes: int = 5, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    """A random-weight VisionTransformer small enough for finite differences in float64."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img,
                              patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                              num_classes=classes, **kw)
    with torch.no_grad():  # break the near-symmetric init so heads/positions differ clearly
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def images(n: int = 8, img: int = 8, dtype: torch.dtype = torch.float64,
           seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, img, img, generator=gen, dtype=dtype)


@functools.lru_cache(maxsize=1)
def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits upsampled to 16x16, 3 channels, standardized (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict, float]:
    torch.manual_seed(0)
    model = tiny_vit(depth=2, heads=2, dim=32, img=16, patch=4, classes=10, dtype=torch.float32)
    x, y = digits_data()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 1500, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[1500:]).argmax(-1) == y[1500:]).float().mean())
    return {k: v.clone() for k, v in model.state_dict().items()}, acc


def trained_vit() -> tuple[torch.nn.Module, float]:
    """The digits ViT (trained once per session, ~seconds), in float64, and its held-out acc."""
    state, acc = _trained_state()
    model = tiny_vit(depth=2, heads=2, dim=32, img=16, patch=4, classes=10, dtype=torch.float32)
    model.load_state_dict(state)
    return model.double().eval(), acc


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
