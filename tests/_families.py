"""Tiny random models of every supported family, for tests parametrized over families."""

from __future__ import annotations

import timm
import torch
from _tiny import tiny_vit

DEIT_ARCH = "deit_tiny_distilled_patch16_224"


def tiny_deit(*, depth: int = 2, heads: int = 2, dim: int = 16, img: int = 8, patch: int = 4,
              classes: int = 5, dtype: torch.dtype = torch.float64, **kw) -> torch.nn.Module:
    """A random-weight DeiT distilled (distillation token, two heads), sized like `tiny_vit`."""
    model = timm.create_model(DEIT_ARCH, pretrained=False, img_size=img, patch_size=patch,
                              embed_dim=dim, depth=depth, num_heads=heads, num_classes=classes,
                              **kw)
    with torch.no_grad():  # break the near-symmetric init; head and head_dist differ clearly
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


# family -> factory of a tiny float64 model of it (kwargs pass to timm)
FAMILY_MODELS = {"vit": tiny_vit, "deit-distilled": tiny_deit}
