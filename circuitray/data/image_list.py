"""Image lists: a CSV or Parquet file with columns `path, label, domain`, for data that does
not live in per-class folders (the config key `data.image_list`).

- `path`: the image file, absolute or relative to the folder holding the list.
- `label`: the column's type decides. Integers are label indices (into the class map, i.e.
  the model's head outputs); text is class names (mapped by the class map; without one, the
  sorted distinct names of the ID domain's rows). In a CSV a column whose every non-empty
  cell is an integer is an integer column, so class names that are numbers need a Parquet
  string column. An empty (null) cell is an unlabeled image (label −1).
- `domain`: which domain the row belongs to; `data.id_domain`, `data.ood_domains` and the
  manifest's `id_domain`/`ood_domain` name these values instead of folders.

"Row N" in every message is the N-th data row, 1-based, the header not counted (in a CSV
without quoted line breaks: line N + 1). A path listed twice in one domain is an error (it
would count one image twice in every mean); the same path in two domains is allowed. Each
domain's rows (path as written, label, file size and mtime) make its listing digest, so
editing the list re-runs exactly the domains whose rows changed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path

from circuitray.errors import DataError

LIST_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})
COLUMNS = ("path", "label", "domain")
_INTEGER = re.compile(r"[+-]?\d+")
_MAX_NAMED = 10  # rows named in one message; the count says how many more
_PARSED: dict[tuple[str, str], ImageList] = {}  # (path, content sha256) -> parsed list

Label = int | str | None


def is_image_list(path: str | os.PathLike | None) -> bool:
    """Whether a data source names an image list (by suffix) rather than a folder."""
    return path is not None and Path(path).suffix.lower() in LIST_SUFFIXES


@dataclass(frozen=True)
class ListRow:
    """One data row: its 1-based number, the path as written and resolved, label, domain."""

    row: int
    path: str
    file: Path
    label: Label
    domain: str


@dataclass(frozen=True)
class ImageList:
    """A parsed image list; `indices` says whether its labels are indices or class names."""

    source: Path
    rows: tuple[ListRow, ...]
    indices: bool

    @functools.cached_property
    def _by_domain(self) -> dict[str, list[ListRow]]:
        grouped: dict[str, list[ListRow]] = {}
        for r in self.rows:
            grouped.setdefault(r.domain, []).append(r)
        return grouped

    @property
    def domains(self) -> list[str]:
        return sorted(self._by_domain)

    def domain_rows(self, domain: str) -> list[ListRow]:
        """The rows of `domain` in file order, or a DataError listing the domains there are."""
        rows = list(self._by_domain.get(domain, ()))
        if not rows:
            raise DataError(self.source, f"no rows with domain '{domain}' (column 'domain'); "
                                         f"domains in the list: {self.domains}")
        return rows

    def where(self, row: ListRow) -> str:
        return f"{self.source} row {row.row}"


def rows_message(problems: list[str]) -> str:
    """Problems of several rows in one message: the first ten, then how many more."""
    more = len(problems) - _MAX_NAMED
    return "; ".join(problems[:_MAX_NAMED]) + (f"; and {more} more" if more > 0 else "")


def _read_columns(path: Path, content: bytes) -> tuple[dict[str, list], bool]:
    """The list's three columns as Python lists, and whether `label` holds integers."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(io.BytesIO(content), dtype=str, keep_default_na=False)
            table = pa.Table.from_pandas(frame, preserve_index=False)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(content))
    except Exception as exc:  # parser errors of pandas/pyarrow: name the file
        raise DataError(path, f"unreadable image list: {str(exc).splitlines()[0]}") from exc
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(path, f"image list misses column(s) {missing}; has "
                              f"{table.column_names} (needs {list(COLUMNS)})")
    columns = {c: table.column(c).to_pylist() for c in COLUMNS}
    labels, kind = columns["label"], table.schema.field("label").type
    if suffix == ".csv":
        cells = [v.strip() for v in labels if v.strip()]
        indices = bool(cells) and all(_INTEGER.fullmatch(v) for v in cells)
        columns["label"] = [None if not v.strip() else int(v) if indices else v
                            for v in labels]
    elif pa.types.is_integer(kind) or pa.types.is_null(kind):
        indices = pa.types.is_integer(kind)
    elif pa.types.is_floating(kind):  # pandas turns an int column with nulls into floats
        bad = [i for i, v in enumerate(labels, 1) if v is not None and v == v and v != int(v)]
        if bad:
            raise DataError(path, f"row {bad[0]}: label {labels[bad[0] - 1]} is not an integer "
                                  "index (column 'label' holds numbers)")
        columns["label"] = [None if v is None or v != v else int(v) for v in labels]
        indices = True
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        columns["label"] = [None if v is None or v == "" else v for v in labels]
        indices = False
    else:
        raise DataError(path, f"column 'label' has type {kind}; use integer indices or class "
                              "names (text)")
    return columns, indices


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _parse(source: Path, content: bytes) -> ImageList:
    columns, indices = _read_columns(source, content)
    base = source.parent
    rows, problems = [], []
    first: dict[tuple[str, str], int] = {}
    for i, (p, label, domain) in enumerate(zip(*(columns[c] for c in COLUMNS), strict=True), 1):
        p, domain = _text(p), _text(domain)
        if not p:
            problems.append(f"row {i}: empty path")
            continue
        if not domain:
            problems.append(f"row {i}: empty domain ({p})")
            continue
        if indices and label is not None and label < 0:
            problems.append(f"row {i}: label {label} is not a class index (0 or more; leave "
                            "the cell empty for an unlabeled image)")
            continue
        file = Path(p) if os.path.isabs(p) else base / p
        key = (domain, os.path.normpath(file))
        if key in first:
            problems.append(f"rows {first[key]} and {i}: '{p}' listed twice in domain "
                            f"'{domain}'")
            continue
        first[key] = i
        if not indices and label is not None:
            label = str(label).strip() or None
        rows.append(ListRow(i, p, file, label, domain))
    if problems:
        raise DataError(source, rows_message(problems))
    if not rows:
        raise DataError(source, "image list has no rows")
    return ImageList(source, tuple(rows), indices)


def read_user_file(path: Path, what: str) -> bytes:
    """The bytes of a file the user named in the config; `what` ("image list (config key
    data.image_list)") says which, so an unreadable one is named with its key."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"unreadable {what}: {exc.strerror or exc}") from exc


def read_image_list(path: str | os.PathLike) -> ImageList:
    """Parse and check an image list (remembered by content: an edit within the same mtime
    tick is still seen)."""
    path = Path(path)
    content = read_user_file(path, "image list (config key data.image_list)")
    key = (str(path), hashlib.sha256(content).hexdigest())
    if key not in _PARSED:
        if len(_PARSED) >= 16:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = _parse(path, content)
    return _PARSED[key]


@dataclass(frozen=True)
class ListedDomain:
    """One domain's rows of an image list with each file's (size, mtime): a listing.

    Same interface as `circuitray.data.listing.Listing` (digest, images, folder, describe),
    so validation and its cache treat both alike.
    """

    source: Path
    domain: str
    rows: tuple[ListRow, ...]
    stats: tuple[tuple[int, int], ...]

    @property
    def folder(self) -> str:  # what the validation message names
        return f"{self.source} domain '{self.domain}'"

    @functools.cached_property  # planning asks once per checkpoint of the list's task
    def digest(self) -> str:
        h = hashlib.sha256(b"image-list\n")
        for r, (size, mtime) in zip(self.rows, self.stats, strict=True):
            h.update(f"{r.path}\0{json.dumps(r.label)}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()[:32]

    @property
    def images(self) -> list[Path]:
        return [r.file for r in self.rows]

    def describe(self, path: Path) -> str:
        """'list row N (path)' for an image of this domain."""
        rows = [r for r in self.rows if r.file == path]
        return f"{self.source} row {rows[0].row} ({rows[0].path})" if rows else str(path)


def list_listed_domain(source: str | os.PathLike, domain: str) -> ListedDomain:
    """Stat every image of `domain` in the list; a missing one is an error naming its row."""
    image_list = read_image_list(source)
    rows = image_list.domain_rows(domain)
    stats, missing = [], []
    for r in rows:
        try:
            st = r.file.stat()
        except OSError as exc:
            missing.append(f"row {r.row}: image file '{r.path}' ({r.file}): "
                           f"{exc.strerror or exc}")
            continue
        if not stat_mod.S_ISREG(st.st_mode):  # (the stat in hand, not a second one)
            missing.append(f"row {r.row}: '{r.path}' ({r.file}) is not a file")
            continue
        stats.append((st.st_size, st.st_mtime_ns))
    if missing:
        raise DataError(image_list.source, rows_message(missing))
    return ListedDomain(image_list.source, domain, tuple(rows), tuple(stats))
