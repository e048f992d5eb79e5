"""The DeiT distilled family (timm `VisionTransformerDistilled`, `deit_*_distilled_*`).

What differs from the plain ViT family, and how the graph of DESIGN §1 reads it:

- Extra tokens: a distillation token sits at position 1, after the class token. Like the
  class and register tokens it is part of the residual stream from the start, so it belongs
  to the `input` node (timm's `_pos_embed` adds it, with its position embedding).
- Readout: two linear heads, `head` on token 0 and `head_dist` on token 1, both after the
  final norm. In eval timm returns their mean, logits = (head(x̂[:, 0]) + head_dist(x̂[:, 1])) / 2
  (the pair of logits only exists in training with `distilled_training`). Both heads are
  linear reads of the same normalized final residual stream, so ONE `logits` destination
  reading that stream is exact: the gradient of M at the final residual carries both heads,
  and every edge into `logits` is scored through both. The graph, its node names, depths and
  edge count are therefore those of a ViT with the same L and H.
- Everything else (pre-norm blocks, norms and their backward, q/k/v weights) is the ViT
  family's, inherited unchanged.
"""

from __future__ import annotations

import torch

from circuitray.families.base import register
from circuitray.families.vit import ViTAdapter


@register
class DeiTDistilledAdapter(ViTAdapter):
    """Reads a timm `VisionTransformerDistilled`: a distillation token and a second head."""

    family = "deit-distilled"
    model_class = "timm.models.deit.VisionTransformerDistilled"

    def _validate_model(self) -> None:
        """Class token, distillation token and both heads present; token readout only."""
        from timm.models.deit import VisionTransformerDistilled

        m = self.model
        if not isinstance(m, VisionTransformerDistilled):
            self._refuse("architecture",
                         f"{type(m).__name__} is not a timm VisionTransformerDistilled")
        if getattr(m, "cls_token", None) is None or getattr(m, "dist_token", None) is None:
            self._refuse("tokens", "the distilled readout needs a class and a distillation "
                                   "token")
        if not hasattr(m, "head_dist"):
            self._refuse("head_dist", "the distilled readout needs its second head")
        if m.global_pool != "token":
            self._refuse(f"global_pool={m.global_pool!r}",
                         "the distilled heads read tokens 0 and 1 ('token' pooling)")
        if getattr(m, "num_reg_tokens", 0):
            self._refuse(f"reg_tokens={m.num_reg_tokens}",
                         "timm's distilled model never adds its register tokens to the "
                         "stream (its _pos_embed has class and distillation tokens only)")

    @property
    def extra_tokens(self) -> tuple[str, ...]:
        return ("cls", "dist")

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Eval-mode logits: the mean of the class head on token 0 and the distillation head
        on token 1, both after the final norm (timm's `fc_norm` is not applied by its
        distilled head, so not here either)."""
        m = self.model
        x = m.norm(resid)
        return (m.head(m.head_drop(x[:, 0])) + m.head_dist(m.head_drop(x[:, 1]))) / 2
