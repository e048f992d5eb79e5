"""Model families behind one adapter interface (`base.FamilyAdapter`).

`adapter_for(model)` / `graph_of(model)` pick a model's family by its class. Adding a family
means one new module here, registered with `@register`; the engine and the graph are
untouched. Importing this package registers the built-in families.
"""

from __future__ import annotations

from circuitray.families.base import (
    FamilyAdapter,
    Record,
    adapter_for,
    families,
    family_of,
    graph_of,
    model_name,
    register,
)
from circuitray.families.deit_distilled import DeiTDistilledAdapter
from circuitray.families.vit import ViTAdapter

__all__ = ["DeiTDistilledAdapter", "FamilyAdapter", "Record", "ViTAdapter", "adapter_for",
           "families", "family_of", "graph_of", "model_name", "register"]
