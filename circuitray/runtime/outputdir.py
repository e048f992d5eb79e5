"""Preflight of a job's output folder, before Ray starts or anything else is written.

Workers write their tables with local file I/O (atomic rename included), so `output_dir` must
be a folder this machine and every worker node can write: a URI such as `s3://bucket/run`
would otherwise become the relative local folder `s3:/bucket/run` and the job would "succeed"
into the driver's throwaway working directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from circuitray.errors import OutputError

log = logging.getLogger(__name__)

LOW_SPACE_BYTES = 256 * 2**20  # below this a warning is printed; a full disk fails on write


def uri_scheme(path: str) -> str | None:
    """'s3' for 's3://bucket/run'; None for local paths and file:// URIs."""
    if "://" not in path or path.startswith("file://"):
        return None
    return path.split("://", 1)[0] or "?"


def local_path(path: str | os.PathLike) -> str:
    """`file:///abs/run` -> `/abs/run`; other text unchanged."""
    text = os.fspath(path)
    return text.removeprefix("file://")


def check_output_dir(path: str | os.PathLike) -> Path:
    """The absolute output folder, created and proven writable (a probe file is written and
    deleted); raises OutputError naming the path for a URI, a file, or an unwritable folder."""
    text = os.fspath(path)
    scheme = uri_scheme(text)
    if scheme is not None:
        raise OutputError(text, f"'{scheme}://' is not a folder circuitray can write: workers "
                                "write with local file I/O; use a path every node mounts "
                                "(e.g. the bucket mounted at /mnt/...)")
    root = Path(local_path(text)).expanduser().resolve()
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
