"""Compatibility names: the timm adapters now live in `circuitray.families` (one module per
model family, behind `families.base.FamilyAdapter`). New code imports from there."""

from __future__ import annotations

from circuitray.families import Record, ViTAdapter, adapter_for, graph_of, model_name

__all__ = ["Record", "ViTAdapter", "adapter_for", "graph_of", "model_name"]
