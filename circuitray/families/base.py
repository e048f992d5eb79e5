"""What a model family decides, and how a model finds its family.

A family adapter reads one kind of model as the graph of DESIGN §1. Everything that differs
between families sits behind `FamilyAdapter`: which modules are the blocks, the norms and
their backward, where the q/k/v weights are, which extra tokens join the patches, and how
the final residual stream becomes logits (pooling and head). The engine (`attribution`,
`circuits`) talks to this interface only; `graph` knows nothing of models at all.

A model finds its family by its class: the nearest class in its MRO that a family is
registered for (`timm.models.deit.VisionTransformerDistilled` before its base
`VisionTransformer`), so a family for a subclass never has to be listed before its base.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from circuitray.errors import InputError, UnsupportedModelError
from circuitray.graph import ViTGraph


def model_name(model: Any) -> str:
    """The timm architecture name when known (for error messages), else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


@dataclass
class Record:
    """Tensors seen during one instrumented forward (per-block lists, forward order).

    The contract between a family's `instrument` and the engine: `input` and the raw parts
    of the source nodes (`z`, `mlp`, turned into node values by `expand_sources`), and the
    read points whose gradients the engine takes (`read_points`) with the residual streams
    the family needs to pull those gradients back to the destinations (`x_in`, `x_mid`).
    """

    input: torch.Tensor | None = None
    x_in: list[torch.Tensor] = field(default_factory=list)    # residual read by q/k/v
    qkv: list[torch.Tensor] = field(default_factory=list)     # q/k/v projection outputs
    z: list[torch.Tensor] = field(default_factory=list)       # head outputs (proj inputs)
    x_mid: list[torch.Tensor] = field(default_factory=list)   # residual read by the MLP
    n2: list[torch.Tensor] = field(default_factory=list)      # MLP-side norm outputs
    mlp: list[torch.Tensor] = field(default_factory=list)     # MLP outputs (bias included)
    final: torch.Tensor | None = None                          # final residual stream

    def read_points(self) -> list[torch.Tensor]:
        """Tensors to differentiate M by, in the order the adapter's `head_read_factors`,
        `mlp_read_grad` and `logits_read_grad` index their gradients."""
        return [*self.qkv, *self.n2, self.final]


@dataclass
class HeadFactors:
    """One point's q/k/v read gradients as G_h = gr_h·W'_h − m_h ⊗ xh, W' the family's own
    weights: gr [3H, N·T, dh], m [3H, N·T], xh [N·T, D] (see `FamilyAdapter.head_read_factors`)."""

    gr: torch.Tensor
    m: torch.Tensor
    xh: torch.Tensor


class FamilyAdapter(ABC):
    """Reads one model family as the graph of DESIGN §1; refuses what breaks that graph.

    Subclasses set `family` (a short name) and `model_class` (the qualified name of the
    model class they read, the key of the family lookup) and register with `@register`.
    """

    family: ClassVar[str]
    model_class: ClassVar[str]

    model: nn.Module
    name: str
    n_blocks: int
    n_heads: int
    head_dim: int
    dim: int
    graph: ViTGraph

    @abstractmethod
    def __init__(self, model: nn.Module) -> None:
        """Validate `model` (UnsupportedModelError naming model and part) and build `graph`."""

    # -- what the family decides ----------------------------------------------------------
    @property
    @abstractmethod
    def extra_tokens(self) -> tuple[str, ...]:
        """Names of the tokens before the patches in the residual stream (part of `input`)."""

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The `input` node [N, T, D]: patches, positions and extra tokens."""

    @abstractmethod
    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream (what the `logits` node reads)."""

    @abstractmethod
    def instrument(self, input_override: torch.Tensor | None = None
                   ) -> AbstractContextManager[Record]:
        """Record what attribution needs during the model's own forward (hooks return None)."""

    @abstractmethod
    def expand_sources(self, inp: torch.Tensor, zs: Sequence[torch.Tensor],
                       ms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Source node values in graph order [n_src, ..., T, D] from a Record's raw parts."""

    @abstractmethod
    def head_read_factors(self, rec: Record, grads: Sequence[torch.Tensor], layer: int,
                          dtype: torch.dtype) -> HeadFactors:
        """Block `layer`'s q/k/v destinations' gradients at one point, in factored form.

        The family owns the backward of whatever sits between the residual stream and the
        read point (norms, q/k/v weights): what comes out are the destinations' gradients as
        such, with nothing else in (the engine sums them over points).
        `grads` are the gradients of `rec.read_points()`. `head_read_grads` turns factors
        into the gradients; the engine may first sum `gr` over EAP-IG's points (it enters
        linearly) and stack the points' `m` and `xh`, so one expensive product per batch
        serves every point (exact: Δ is the same at every point).
        """

    @abstractmethod
    def head_read_grads(self, layer: int, gr: torch.Tensor, m: torch.Tensor,
                        xh: torch.Tensor) -> torch.Tensor:
        """The q/k/v destinations' ∂M/∂(residual) [3H (head-major, q/k/v within a head),
        N·T, D] from factors: `gr` [3H, N·T, dh] (one point's or a sum over points), `m`
        [K, 3H, N·T] and `xh` [K, N·T, D] (the K points' own)."""

    @abstractmethod
    def mlp_read_grad(self, rec: Record, grads: Sequence[torch.Tensor], layer: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """The MLP destination's ∂M/∂(residual) [N, T, D] as block `layer` reads it."""

    def logits_read_grad(self, rec: Record, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """∂M/∂(final residual stream) [N, T, D]: `final` is itself a read point."""
        return grads[-1]

    @abstractmethod
    def graph_forward(self, images: torch.Tensor, *,
                      mask: torch.Tensor | None = None,
                      ablated: torch.Tensor | None = None,
                      input_override: torch.Tensor | None = None,
                      dst_extra: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of a run where destination v reads Σ_u [m_uv a_u + (1−m_uv) ã_u] + biases."""

    @abstractmethod
    def check_images(self, images: torch.Tensor, where: str) -> None:
        """Fail early, naming the batch, on images the model cannot take."""

    # -- shared by every family -----------------------------------------------------------
    def check_finite(self, sources: torch.Tensor, logits: torch.Tensor, where: str) -> None:
        """Name the first node whose activations are NaN/inf (bad weights or overflow)."""
        if torch.isfinite(logits).all():
            return
        bad = (~torch.isfinite(sources)).flatten(1).any(1).nonzero()
        node = self.graph.src_names[int(bad[0])] if len(bad) else "final norm/head"
        raise InputError(f"{where}: non-finite activations in model '{self.name}', "
                         f"first at node '{node}'")


# -- family lookup ----------------------------------------------------------------------
_FAMILIES: dict[str, type[FamilyAdapter]] = {}
A = TypeVar("A", bound=type[FamilyAdapter])


def register(cls: A) -> A:
    """Class decorator: `cls` reads models whose class (or nearest registered base) is
    `cls.model_class`."""
    other = _FAMILIES.get(cls.model_class)
    if other is not None and other is not cls:
        raise ValueError(f"families {other.family!r} and {cls.family!r} both claim "
                         f"{cls.model_class}")
    _FAMILIES[cls.model_class] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def families() -> dict[str, type[FamilyAdapter]]:
    """Registered families by the model class they read (a copy)."""
    return dict(_FAMILIES)


def family_of(model: Any) -> type[FamilyAdapter]:
    """The family registered for the nearest class in `model`'s MRO; refuses unknown models."""
    for cls in type(model).__mro__:
        family = _FAMILIES.get(_qualname(cls))
        if family is not None:
            return family
    known = ", ".join(sorted(f"{f.family} ({c})" for c, f in _FAMILIES.items()))
    raise UnsupportedModelError(
        model_name(model), "architecture",
        f"{type(model).__name__} is not a timm VisionTransformer of a known family "
        f"(known: {known})")


def adapter_for(model: Any) -> FamilyAdapter:
    """The adapter of `model`'s family, which validates the model on construction."""
    return family_of(model)(model)


def graph_of(model: Any) -> ViTGraph:
    """The computation graph of `model` (DESIGN §1); refuses variants it cannot represent."""
    return adapter_for(model).graph
