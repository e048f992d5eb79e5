"""One exception hierarchy for circuitray: every error names the thing that is wrong.

Jobs catch `CircuitrayError` per checkpoint, record it in the failures table and go on.
"""

from __future__ import annotations


class CircuitrayError(Exception):
    """Base of every error circuitray raises on purpose."""


class ConfigError(CircuitrayError):
    """A config key is unknown, missing or of the wrong type (names the key)."""


class UnsupportedModelError(CircuitrayError):
    """A model whose computation graph circuitray cannot represent."""

    def __init__(self, model_name: str, part: str, reason: str):
        self.model_name, self.part, self.reason = model_name, part, reason
        super().__init__(f"model '{model_name}': unsupported {part}: {reason}")


class InputError(CircuitrayError):
    """Data handed to the engine is malformed (wrong image size, NaN activations, ...)."""


class DataError(CircuitrayError):
    """A dataset on disk is unreadable or malformed (names the path)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(CircuitrayError):
    """A checkpoint cannot be loaded or does not fit its architecture."""

    def __init__(self, checkpoint_id: str, path: str, reason: str):
        self.checkpoint_id, self.path, self.reason = checkpoint_id, str(path), reason
        super().__init__(f"checkpoint '{checkpoint_id}' ({path}): {reason}")


class TableError(CircuitrayError):
    """A table misses columns, has the wrong types, or two tables do not line up."""


class MetricError(CircuitrayError):
    """A metric cannot be computed from what it was given (names why)."""


class StaleResultError(CircuitrayError):
    """Stored results do not match the current config or are damaged (names them)."""
