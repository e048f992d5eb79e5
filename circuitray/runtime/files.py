"""What a finished output file looked like, and whether it still does.

A domain's edges and outputs files are recorded in the checkpoint's marker (row count, size,
mtime, checksum) when the checkpoint completes. Planning re-checks them cheaply (size always;
the checksum only when the mtime moved, the way make and rsync trust a file), and reduce
checks the checksum of the very bytes it parses, so a truncated, rewritten or deleted file is
named and recomputed instead of read as if it were what the marker describes.

All of it goes through circuitray.storage, so the same rules hold on an object store:
there the mtime is the time of the PUT (an object is never modified in place, a rewrite is a
new PUT with a new mtime), and the checksum reduce verifies is the one that always decides.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from circuitray import storage
from circuitray.errors import OutputError, StaleResultError
from circuitray.storage import AnyPath, ObjectPath

_CHUNK = 1 << 20
# Parquet key-value metadata of a domain file: the fingerprint of what produced it.
FINGERPRINT_KEY = b"circuitray.fingerprint"


def checksum_bytes(data: bytes) -> str:
    """The checksum markers store: BLAKE2b-128 of the file's bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def checksum_file(path: str | os.PathLike) -> str:
    """`checksum_bytes` of a file, streamed (weights files can be GBs)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """A file as it was when its checkpoint completed."""

    rows: int
    size: int
    mtime_ns: int
    checksum: str

    @classmethod
    def of(cls, path: str | os.PathLike | ObjectPath) -> FileRecord:
        """Record a Parquet file just written: its bytes are read once (one GET on an object
        store) for the checksum and the footer's row count."""
        data = storage.read_bytes(path)
        found = storage.stat(path)
        if found is None:  # deleted between the two calls: nothing to record
            raise FileNotFoundError(str(path))
        return cls(rows=pq.read_metadata(pa.BufferReader(data)).num_rows, size=len(data),
                   mtime_ns=found[1], checksum=checksum_bytes(data))


def check_file(path: AnyPath, record: FileRecord,
               listed: Mapping[AnyPath, tuple[int, int]] | None = None) -> str | None:
    """None when `path` still is the recorded file, else what is wrong with it, in words.
    `listed`: (size, mtime_ns) by path from one listing (storage.stat_tree) instead of a
    stat (a HEAD request on an object store) per file."""
    found = storage.stat(path) if listed is None else listed.get(path)
    if found is None:
        return f"{path}: missing"
    size, mtime_ns = found
    if size != record.size:
        return f"{path}: damaged ({size} bytes, the marker recorded {record.size})"
    if mtime_ns != record.mtime_ns and checksum_bytes(storage.read_bytes(path)) != \
            record.checksum:
        return f"{path}: damaged (checksum differs from the marker's)"
    return None


def read_verified(path: str | os.PathLike | ObjectPath, checksum: str,
                  columns: list[str] | None = None) -> pa.Table:
    """Parse a Parquet file from the bytes whose checksum matches its marker, or fail naming it."""
    path = storage.as_path(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as exc:
        raise StaleResultError(f"{path}: missing (run discover to recompute it)") from exc
    if checksum_bytes(data) != checksum:
        # size and mtime matched (check_file passed), so only the bytes tell: discover's
        # resume would trust the file, hence the explicit delete in the advice
        raise StaleResultError(f"{path}: damaged: checksum differs from its checkpoint marker's "
                               "(delete it and run discover to recompute it)")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def write_text_atomic(path: str | os.PathLike | ObjectPath, text: str) -> AnyPath:
    """Write `text` whole: locally to a temporary sibling, then renamed; on an object store
    in one PUT under the final name. A reader (or a re-run after a kill) sees the old file
    or the new one, never half of one. Errors name the path."""
    path = storage.as_path(path)
    try:
        return storage.write_text(path, text)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc


def remove_temporaries(folders: Iterable[AnyPath]) -> None:
    """Delete the `.<name>.<uuid>.tmp` files a killed writer left in `folders` (the names
    `storage.write_bytes` and `tables.write_parquet_atomic` write to before renaming). Call
    it only where no other writer can be at work (one task attempt, or under the job lock).
    An object store has none (nothing is renamed there): nothing is listed."""
    for folder in folders:
        if isinstance(folder, Path):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)
