"""circuitray: read a ViT's circuits to tell which checkpoints generalize (Inside-Out, CVPR 2026).

`attribute` is imported lazily so that `import circuitray` (and the torch-free metrics
layer) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["attribute", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "attribute":
        from circuitray.attribution import attribute

        return attribute
    raise AttributeError(f"module 'circuitray' has no attribute {name!r}")
