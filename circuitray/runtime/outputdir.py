"""Preflight of a job's output folder, before Ray starts or anything else is written.

`output_dir` is a local folder every worker node sees, or an object-store URI
(`s3://bucket/run`, `gs://`, `abfs://`, `hdfs://`; circuitray.storage). Either way a probe file
is written and deleted here, so a read-only folder, a missing bucket or absent credentials stop
the job naming the path before any model loads. An unknown scheme is refused: it would
otherwise become a relative local folder (`ftp:/host/run`) in the driver's throwaway working
directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

from circuitray import storage
from circuitray.errors import OutputError
from circuitray.storage import SCHEMES, AnyPath, ObjectPath

log = logging.getLogger(__name__)

LOW_SPACE_BYTES = 256 * 2**20  # below this a warning is printed; a full disk fails on write


def check_remote_output_dir(root: ObjectPath) -> ObjectPath:
    """An object-store output proven writable and deletable (one probe object), naming the
    URI and pyarrow's reason (no such bucket, access denied, no credentials) otherwise."""
    if root.scheme not in SCHEMES:
        raise OutputError(str(root), f"'{root.scheme}://' is not a store circuitray can write: "
                                     f"use a local folder or one of {list(SCHEMES)}")
    probe = root / f".write-probe-{uuid.uuid4().hex}"
    try:
        storage.write_bytes(probe, b"circuitray write probe\n")
        storage.delete(probe)
    except (OSError, ValueError) as exc:  # pyarrow: ValueError for an unusable URI
        raise OutputError(str(root), f"{type(exc).__name__}: {exc}") from exc
    return root


def check_output_dir(path: str | os.PathLike | ObjectPath) -> AnyPath:
    """The absolute output folder (or the URI), created and proven writable (a probe file
    is written and deleted); raises OutputError naming the path for an unknown scheme, a
    file, or an unwritable folder or store."""
    where = storage.as_path(path)
    if isinstance(where, ObjectPath):
        return check_remote_output_dir(where)
    root = where.expanduser().resolve()  # as_path already took off a file:// prefix
    for part in (root, *root.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "is a file, not a folder" if part == root else \
                    f"its parent {part} is a file, not a folder"
                raise OutputError(root, where)
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os_error(root, exc) from exc
    probe = root / f".write-probe-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"circuitray write probe\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError.from_os_error(root, exc) from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    free = shutil.disk_usage(root).free
    if free < LOW_SPACE_BYTES:
        log.warning(f"[circuitray] WARNING {root}: only {free / 2**20:.0f} MiB free; a full "
                    "disk stops the job (re-run after freeing space to resume)")
    return root
