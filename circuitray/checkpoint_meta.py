"""A torch checkpoint's metadata (epoch, args, metric, tensor shapes) without its tensors.

`torch.load(weights_only=True)` rebuilds every tensor of a training checkpoint (model, EMA and
optimizer state) in a Python-level unpickler: ~55 ms per small timm checkpoint, so a
manifest scan of 1,000 checkpoints took a minute. A scan only needs shapes, so this reader
parses the zip archive's `data.pkl` alone with the C unpickler, under an allowlist of the
globals a torch state dict uses; every tensor comes back as a `TensorInfo` (shape, dtype)
and its bytes are never read. Anything outside the allowlist raises `NotPlainMetadata` —
nothing is ever called that the allowlist does not name — and the caller falls back to the
safe full load.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class NotPlainMetadata(Exception):
    """The file holds something this reader does not allow (or is not a zip checkpoint)."""


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor would be, without its data."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _StorageType:
    dtype: str


class _Namespace(SimpleNamespace):
    """Stands in for argparse.Namespace (timm train.py's `args`): attributes only."""


def _rebuild_tensor(storage: _StorageType, offset: int, size: tuple[int, ...], *rest: Any
                    ) -> TensorInfo:
    return TensorInfo(tuple(int(s) for s in size), storage.dtype)


def _rebuild_parameter(data: TensorInfo, *rest: Any) -> TensorInfo:
    return data


_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte",
             "Bool")
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): _Namespace,
    **{("torch", f"{k}Storage"): _StorageType(k.lower()) for k in _STORAGES},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise NotPlainMetadata(f"'{module}.{name}' is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" \
                and isinstance(pid[1], _StorageType):
            return pid[1]
        raise NotPlainMetadata(f"unexpected persistent id {pid!r:.60}")


def read_metadata(path: str | Path) -> Any:
    """The checkpoint's object tree with each tensor as a TensorInfo; argparse Namespaces
    come back as SimpleNamespace. Raises NotPlainMetadata when the fast path cannot be used
    (legacy non-zip file, a global outside the allowlist)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise NotPlainMetadata("no single data.pkl in the archive")
            data = archive.read(names[0])
    except zipfile.BadZipFile as exc:
        raise NotPlainMetadata("not a zip-format torch file") from exc
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except NotPlainMetadata:
        raise
    except Exception as exc:  # a malformed pickle: let the safe full load say what it is
        raise NotPlainMetadata(f"{type(exc).__name__}: {exc}") from exc
