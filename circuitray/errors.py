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


class TrackingError(CircuitrayError):
    """The MLflow store could not record the job's runs (names the store and why)."""


class StaleResultError(CircuitrayError):
    """Stored results do not match the current config or are damaged (names them)."""


# errno -> what a user should read; anything else falls back to the system's own words
_OS_REASONS = {
    "ENOSPC": "disk full (no space left on the device)",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "permission denied",
    "ENOTDIR": "a part of the path is a file, not a folder",
    "EEXIST": "is a file, not a folder",
    "EISDIR": "is a folder, not a file",
    "ENAMETOOLONG": "name too long",
}


def os_error_reason(exc: OSError) -> str:
    """A few words on why a write failed ("disk full", "read-only file system", ...)."""
    import errno

    name = errno.errorcode.get(exc.errno or -1)
    return _OS_REASONS.get(name or "", exc.strerror or str(exc) or type(exc).__name__)


def os_error_is_permanent(exc: OSError) -> bool:
    """A full disk or a read-only folder stays so: retrying cannot help (unlike EIO, ESTALE)."""
    import errno

    return errno.errorcode.get(exc.errno or -1, "") in _OS_REASONS


class OutputError(CircuitrayError):
    """The job cannot write where it was told to (names the path and why, in words)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {path}: {reason}")

    @classmethod
    def from_os_error(cls, path: str | object, exc: OSError) -> OutputError:
        """`path` is what the user asked for (not a temporary name the OS may report)."""
        return cls(str(path), os_error_reason(exc))


class JobLockedError(CircuitrayError):
    """Another job holds the output folder's lock (names the holder and the lock file)."""

    def __init__(self, path: str, holder: str, hint: str):
        self.path, self.holder = str(path), holder
        super().__init__(f"output folder is in use: {path} is held by {holder}; {hint}")
