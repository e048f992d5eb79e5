"""Where a job's files live, a local folder or an object store, behind one small interface.

Every read and write of a job's output folder goes through these functions, so the stages
have one code path whether `output_dir` is `/data/run` or `s3://bucket/run` (also `gs://`,
`abfs://`, `hdfs://`: pyarrow's filesystems, `FileSystem.from_uri`). A local path is a
`pathlib.Path`; a URI is an `ObjectPath`, which only knows names (no I/O of its own).

The one difference the stages must respect is rename. A local write goes to a temporary
sibling and is renamed over the final name (readers see all of a file or none of it, and a
killed writer leaves only a `.<name>.<uuid>.tmp`). An object store has no rename, but a PUT
is atomic: the object appears whole under its final name when the upload completes, or not
at all. So `write_bytes` writes remote files under their final name in one PUT (pyarrow's
delayed open: one PutObject for a small file, a multipart upload, also invisible until it
completes, for a large one). Either way there is no half-written file to read, and what a
file *means* (complete, and for which setting) is decided by the checkpoint's marker,
written last.

Local I/O uses the os module directly rather than pyarrow's LocalFileSystem: its OSErrors
keep their errno, which the guardrails turn into "disk full" / "read-only" messages.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat as stat_mod
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

# Schemes pyarrow can open; any other "scheme://" is refused by name (a typo such as
# "s3:/bucket" or an unsupported store must not become a local folder).
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


class ObjectPath:
    """A file or folder in an object store, `s3://bucket/run/edges/t/c/id.parquet`.

    The few pathlib operations the layout and the stages use (`/`, name, parent, stem,
    suffix, with_name); equal and hashable by URI, picklable (a Ray task resolves the
    filesystem itself, from its own credentials)."""

    __slots__ = ("uri",)

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    def __truediv__(self, other: str | os.PathLike) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{os.fspath(other).strip('/')}")

    @property
    def name(self) -> str:
        rest = self.uri.split("://", 1)[1]
        return rest.rsplit("/", 1)[-1] if "/" in rest else ""

    @property
    def parent(self) -> ObjectPath:
        scheme, rest = self.uri.split("://", 1)
        return ObjectPath(f"{scheme}://{rest.rsplit('/', 1)[0]}") if "/" in rest else self

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name.lstrip(".") else ""

    @property
    def stem(self) -> str:
        return self.name[:len(self.name) - len(self.suffix)] if self.suffix else self.name

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def relative_to(self, other: ObjectPath) -> str:
        prefix = other.uri + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self} is not under {other}")
        return self.uri[len(prefix):]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __lt__(self, other: ObjectPath) -> bool:
        return self.uri < other.uri

    def __hash__(self) -> int:
        return hash(self.uri)


AnyPath = Path | ObjectPath  # what the layout hands out: local folder or object store


def uri_scheme(text: str) -> str | None:
    """'s3' for 's3://bucket/run'; None for local paths and file:// URIs."""
    if "://" not in text or text.startswith("file://"):
        return None
    return text.split("://", 1)[0] or "?"


def as_path(path: str | os.PathLike | ObjectPath) -> AnyPath:
    """A Path for local text (`file://` stripped), an ObjectPath for a URI."""
    if isinstance(path, (Path, ObjectPath)):
        return path
    text = os.fspath(path)
    return ObjectPath(text) if uri_scheme(text) else Path(text.removeprefix("file://"))


def is_remote(path: str | os.PathLike | ObjectPath) -> bool:
    return isinstance(as_path(path), ObjectPath)


@functools.lru_cache(maxsize=16)
def _store(scheme: str, netloc: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for one bucket (container, namenode) and the bucket's path in it;
    one per process (a Ray worker builds its own from its environment's credentials)."""
    query = "?allow_delayed_open=true" if scheme == "s3" else ""  # one PUT per small file
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}{query}")


def _remote(path: ObjectPath) -> tuple[pafs.FileSystem, str]:
    scheme, rest = path.uri.split("://", 1)
    netloc, _, key = rest.partition("/")
    fs, base = _store(scheme, netloc)
    return fs, f"{base.rstrip('/')}/{key}" if key else base


def filesystem(path: str | os.PathLike | ObjectPath) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it): for readers that take a `filesystem=` argument."""
    p = as_path(path)
    if isinstance(p, Path):
        return pafs.LocalFileSystem(), str(p)
    return _remote(p)


# ------------------------------------------------------------------ reads


def read_bytes(path: str | os.PathLike | ObjectPath) -> bytes:
    """The file's bytes; FileNotFoundError when there is no such file."""
    p = as_path(path)
    if isinstance(p, Path):
        return p.read_bytes()
    fs, key = _remote(p)
    try:
        with fs.open_input_stream(key) as fh:
            return fh.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if stat(p) is None:
            raise FileNotFoundError(str(p)) from exc
        raise


def read_text(path: str | os.PathLike | ObjectPath) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def open_input(path: str | os.PathLike | ObjectPath) -> Iterator[pa.NativeFile]:
    """A random-access file (Parquet footer reads fetch only the footer's bytes)."""
    fs, key = filesystem(path)
    with fs.open_input_file(key) as fh:
        yield fh


def stat(path: str | os.PathLike | ObjectPath) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it does not exist. On an object store the mtime
    is the time of the PUT that wrote the object (objects are immutable: a rewrite is a new
    PUT and a new mtime)."""
    p = as_path(path)
    if isinstance(p, Path):
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_size, st.st_mtime_ns) if stat_mod.S_ISREG(st.st_mode) else None
    fs, key = _remote(p)
    info = fs.get_file_info(key)
    if info.type != pafs.FileType.File:
        return None
    return int(info.size), int(info.mtime_ns or 0)


def exists(path: str | os.PathLike | ObjectPath) -> bool:
    """A file is there (folders do not count: on an object store they are only prefixes)."""
    return stat(path) is not None


def list_files(folder: str | os.PathLike | ObjectPath, suffix: str = "",
               hidden: bool = False) -> list[AnyPath]:
    """Every file under `folder` (recursive) whose name ends with `suffix`, sorted; names
    starting with '.' (temporaries, the lock) only with `hidden`. [] for no folder."""
    p = as_path(folder)
    if isinstance(p, Path):
        found = [f for f in p.rglob(f"*{suffix}") if f.is_file()] if p.is_dir() else []
    else:
        fs, key = _remote(p)
        infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
        found = [p / info.path[len(key):].lstrip("/") for info in infos
                 if info.type == pafs.FileType.File and info.path.endswith(suffix)]
    return sorted(f for f in found if hidden or not f.name.startswith("."))


def stat_tree(folder: str | os.PathLike | ObjectPath) -> dict[AnyPath, tuple[int, int]]:
    """(size, mtime_ns) of every file under `folder`, from one listing: on an object store
    one LIST call per 1,000 objects instead of a HEAD per file (planning a zoo of thousands
    of checkpoints checks every domain file)."""
    p = as_path(folder)
    if isinstance(p, Path):
        return {f: found for f in list_files(p, hidden=True)
                if (found := stat(f)) is not None}
    fs, key = _remote(p)
    infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    return {p / info.path[len(key):].lstrip("/"): (int(info.size), int(info.mtime_ns or 0))
            for info in infos if info.type == pafs.FileType.File}


# ------------------------------------------------------------------ writes


def write_bytes(path: str | os.PathLike | ObjectPath, data: bytes | pa.Buffer) -> AnyPath:
    """Write a whole file atomically: locally a temporary sibling renamed over `path`,
    remotely one PUT under `path` itself (no rename; the object appears only when complete).
    OSErrors propagate (locally with their errno); no temporary is left behind."""
    p = as_path(path)
    if isinstance(p, ObjectPath):
        fs, key = _remote(p)
        with fs.open_output_stream(key) as fh:
            fh.write(data)
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(p)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return p


def write_text(path: str | os.PathLike | ObjectPath, text: str) -> AnyPath:
    return write_bytes(path, text.encode("utf-8"))


def create_if_absent(path: ObjectPath, data: bytes) -> bool | None:
    """Create an object only if no object has its name, atomically (a conditional PUT,
    If-None-Match: *): True when created, False when it existed, None when this store (or
    this installation: S3 through boto3 only) offers no such write."""
    if path.scheme != "s3":
        return None
    try:
        import boto3
        from botocore.exceptions import ClientError
    except ImportError:
        return None
    bucket, _, key = path.uri.split("://", 1)[1].partition("/")
    try:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return False
        if code in ("NotImplemented", "501"):
            return None
        raise OSError(f"{path}: {exc}") from exc
    return True


def temporary_name(path: Path) -> Path:
    """Where a local write goes before its rename: `.<name>.<uuid>.tmp` beside it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def delete(path: str | os.PathLike | ObjectPath) -> None:
    """Remove a file; nothing happens when it is not there."""
    p = as_path(path)
    if isinstance(p, Path):
        p.unlink(missing_ok=True)
        return
    fs, key = _remote(p)
    with contextlib.suppress(FileNotFoundError):
        if fs.get_file_info(key).type == pafs.FileType.File:
            fs.delete_file(key)


@contextlib.contextmanager
def local_copies(paths: list[AnyPath]) -> Iterator[list[Path]]:
    """Local files for tools that take only local paths (MLflow's `log_artifact`): a local
    path as it is, an object-store file downloaded into a temporary folder (same name, kept
    apart by index) that is removed on exit."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="circuitray-local-") as tmp:
        out = []
        for i, path in enumerate(paths):
            if isinstance(path, Path):
                out.append(path)
                continue
            local = Path(tmp) / str(i) / path.name
            local.parent.mkdir()
            local.write_bytes(read_bytes(path))
            out.append(local)
        yield out

