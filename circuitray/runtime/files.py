"""What a finished output file looked like, and whether it still does.

A domain's edges and outputs files are recorded in the checkpoint's marker (row count, size,
mtime, checksum) when the checkpoint completes. Planning re-checks them cheaply (size always;
the checksum only when the mtime moved, the way make and rsync trust a file), and reduce
checks the checksum of the very bytes it parses, so a truncated, rewritten or deleted file is
named and recomputed instead of read as if it were what the marker describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from circuitray.errors import OutputError, StaleResultError

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
    def of(cls, path: str | os.PathLike) -> FileRecord:
        """Record a Parquet file just written (reads its footer and its bytes once)."""
        st = os.stat(path)
        return cls(rows=pq.read_metadata(path).num_rows, size=st.st_size,
                   mtime_ns=st.st_mtime_ns, checksum=checksum_file(path))


def check_file(path: Path, record: FileRecord) -> str | None:
    """None when `path` still is the recorded file, else what is wrong with it, in words."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path}: missing"
    if st.st_size != record.size:
        return f"{path}: damaged ({st.st_size} bytes, the marker recorded {record.size})"
    if st.st_mtime_ns != record.mtime_ns and checksum_file(path) != record.checksum:
        return f"{path}: damaged (checksum differs from the marker's)"
    return None


def read_verified(path: str | os.PathLike, checksum: str,
                  columns: list[str] | None = None) -> pa.Table:
    """Parse a Parquet file from the bytes whose checksum matches its marker, or fail naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise StaleResultError(f"{path}: missing (run discover to recompute it)") from exc
    if checksum_bytes(data) != checksum:
        # size and mtime matched (check_file passed), so only the bytes tell: discover's
        # resume would trust the file, hence the explicit delete in the advice
        raise StaleResultError(f"{path}: damaged: checksum differs from its checkpoint marker's "
                               "(delete it and run discover to recompute it)")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary sibling, then rename: a reader (or a re-run after a kill)
    sees the old file or the new one, never half of one. Errors name the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def remove_temporaries(folders: Iterable[Path]) -> None:
    """Delete the `.<name>.<uuid>.tmp` files a killed writer left in `folders` (the names
    `write_text_atomic` and `tables.write_parquet_atomic` write to before renaming). Call it
    only where no other writer can be at work (one task attempt, or under the job lock)."""
    for folder in folders:
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
