"""One explicit class -> label map per task, so a stray folder can never shift the labels.

A DomainBed-style domain is `root/<domain>/<class>/<image>`; which index a class folder gets
must not depend on which other folders happen to exist (with the old "sorted union of class
folders over all domains", `mkdir root/ood/00` moved every label by one). The map comes from,
in this order:

1. the manifest's `classes` column: a JSON list of class names in label order
   (`["dog", "cat"]`: dog is label 0), or a list in YAML/Parquet manifests;
2. the text file the config key `data.class_map` names: one class name per line, in label
   order (blank lines are skipped);
3. the sorted class folders of the checkpoint's ID domain (for an image list, see
   `list_class_map`: "0".."n-1" for label indices, the sorted label names of the ID domain's
   rows for class names).

The data.class_map file is never guessed: no `classes.txt` beside the data is picked up by
itself, so a stray file cannot relabel a task (for the reason the map never follows whichever
folders happen to exist).

Every domain a checkpoint is run on must hold only class folders of the map, none of them
empty; the map must have as many classes as the model's head has outputs. The map used is
stored once per task (`<out>/classes/<task>.json`); a later checkpoint of the same task
with another map is an error, since their labels would not be comparable.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitray.data.image_list import (
    is_image_list,
    read_image_list,
    read_user_file,
    rows_message,
)
from circuitray.data.listing import IMAGE_SUFFIXES
from circuitray.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from circuitray.storage import AnyPath, ObjectPath


@dataclass(frozen=True)
class ClassMap:
    """Class names in label order (label i is `names[i]`), and where they came from."""

    names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.names:
            raise DataError(self.source, "class map lists no classes")
        bad = [n for n in self.names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise DataError(self.source, f"class names must be non-empty strings, got {bad}")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise DataError(self.source, f"class map lists {dupes} more than once")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The label of class `name` (ValueError if it is not in the map)."""
        return self.names.index(name)


def is_image(path: Path) -> bool:
    """A visible file with an image suffix (what a class folder must hold)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folders(domain_dir: Path) -> list[str]:
    """Names of the (visible) class folders of a domain, sorted."""
    return sorted(p.name for p in Path(domain_dir).iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def check_domain(domain_dir: str | os.PathLike, class_map: ClassMap) -> None:
    """Raise DataError naming the first class folder of `domain_dir` that is empty or unknown.

    An empty folder is what `mkdir <root>/<domain>/<name>` leaves behind; an unknown one would
    get no label. Both are refused before any model is run on the domain.
    """
    domain_dir = Path(domain_dir)
    if not domain_dir.is_dir():
        raise DataError(domain_dir, "no such domain folder")
    for name in class_folders(domain_dir):
        folder = domain_dir / name
        if not any(is_image(p) for p in folder.iterdir()):
            raise DataError(folder, "empty class folder (holds no images): remove it or add "
                                    "its images")
        if name not in class_map.names:
            raise DataError(folder, f"class folder '{name}' is not in the class map "
                                    f"{list(class_map.names)} (from {class_map.source})")


def folder_class_map(domain_dir: str | os.PathLike) -> ClassMap:
    """The sorted class folders of one domain (the ID domain) as a map, checked for empties."""
    domain_dir = Path(domain_dir)
    if not domain_dir.is_dir():
        raise DataError(domain_dir, "no such domain folder")
    names = class_folders(domain_dir)
    if not names:
        raise DataError(domain_dir, "ID domain holds no class folders, so no labels; give the "
                                    "classes in the manifest column 'classes' or the config key "
                                    "data.class_map")
    class_map = ClassMap(tuple(names), f"ID domain folders {domain_dir}")
    check_domain(domain_dir, class_map)
    return class_map


def parse_class_list(value: Any, where: str) -> tuple[str, ...] | None:
    """A manifest `classes` cell -> names; None when the cell is empty.

    Canonical form: a JSON list of strings (`["dog", "cat"]`). A list (YAML, Parquet) is
    taken as is. Anything else is an error naming `where`.
    """
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(where, f"classes must be a JSON list of names like "
                                   f"[\"dog\", \"cat\"], got {value!r}") from exc
    if hasattr(value, "tolist"):  # numpy array from a Parquet list column
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(where, f"classes must be a list of class names (strings), got {value!r}")
    return tuple(value)


def read_class_map_file(path: str | os.PathLike) -> ClassMap:
    """A text file with one class name per line, in label order (blank lines skipped)."""
    path = Path(path)
    text = read_user_file(path, "class-map file (config key data.class_map)").decode()
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    return ClassMap(names, f"class-map file {path}")


def _explicit_map(row: Mapping[str, Any], cfg_data: Any) -> ClassMap | None:
    """The manifest's `classes` cell or the data.class_map file (they must agree), or None."""
    cid = str(row.get("checkpoint_id", "?"))
    listed = parse_class_list(row.get("classes"), f"manifest column 'classes' of checkpoint "
                                                  f"'{cid}'")
    from_file = getattr(cfg_data, "class_map", None)
    file_map = read_class_map_file(from_file) if from_file else None
    if listed is None:
        return file_map
    class_map = ClassMap(listed, "manifest column classes")
    if file_map is not None and file_map.names != class_map.names:
        raise DataError(from_file, f"class-map file lists {list(file_map.names)}, but the "
                                   f"manifest column 'classes' of checkpoint '{cid}' lists "
                                   f"{list(class_map.names)}; give one of them")
    return class_map


def _check_head(row: Mapping[str, Any], class_map: ClassMap) -> None:
    expected = int(row["num_classes"])
    if len(class_map) != expected:
        raise CheckpointError(str(row.get("checkpoint_id", "?")), str(row.get("weights", "")),
                              f"{len(class_map)} classes {list(class_map.names)} (from "
                              f"{class_map.source}), but the model's head has {expected} "
                              "outputs (manifest num_classes)")


def resolve_class_map(row: Mapping[str, Any], cfg_data: Any, data_root: str | os.PathLike,
                      id_domain: str, domains: Iterable[str] = ()) -> ClassMap:
    """The class map of one checkpoint, validated against its data and its head.

    `cfg_data` is the job's DataConfig (its `class_map` key); `domains` are the other domain
    folders the checkpoint is run on (each must hold only known, non-empty class folders).
    When `data_root` is an image list, see `list_class_map`. Raises DataError naming the
    folder or file, and CheckpointError when the map's size is not the number of classes of
    the checkpoint.
    """
    if is_image_list(data_root):
        return list_class_map(row, cfg_data, data_root, id_domain, domains)
    root = Path(data_root)
    class_map = _explicit_map(row, cfg_data) or folder_class_map(root / id_domain)
    for domain in dict.fromkeys([id_domain, *domains]):
        check_domain(root / domain, class_map)
    _check_head(row, class_map)
    return class_map


def list_class_map(row: Mapping[str, Any], cfg_data: Any, source: str | os.PathLike,
                   id_domain: str, domains: Iterable[str] = ()) -> ClassMap:
    """The class map of a checkpoint whose domains are rows of an image list.

    The manifest's `classes` or data.class_map when given; else, for label indices, "0".."n-1"
    over the head's n outputs, and for class names the sorted distinct names of the ID
    domain's rows. Every label of every domain run must then be in the map (a name) or
    below the head's size (an index): the error names the list and the row.
    """
    image_list = read_image_list(source)
    class_map = _explicit_map(row, cfg_data)
    if class_map is None and image_list.indices:
        class_map = ClassMap(tuple(str(k) for k in range(int(row["num_classes"]))),
                             f"label indices of image list {image_list.source}")
    elif class_map is None:
        names = sorted({r.label for r in image_list.domain_rows(id_domain)
                        if isinstance(r.label, str)})
        if not names:
            raise DataError(image_list.source, f"ID domain '{id_domain}' has no labelled rows, "
                                               "so no classes; give them in the manifest column "
                                               "'classes' or the config key data.class_map")
        class_map = ClassMap(tuple(names), f"labels of ID domain '{id_domain}' in image list "
                                           f"{image_list.source}")
    _check_head(row, class_map)
    bad = []
    for domain in dict.fromkeys([id_domain, *domains]):
        for r in image_list.domain_rows(domain):
            if isinstance(r.label, int) and r.label >= len(class_map):
                bad.append(f"row {r.row}: label index {r.label} is out of range for the "
                           f"model's head ({len(class_map)} outputs: 0..{len(class_map) - 1})")
            elif isinstance(r.label, str) and r.label not in class_map.names:
                bad.append(f"row {r.row}: unknown label '{r.label}'; the class map is "
                           f"{list(class_map.names)} (from {class_map.source})")
    if bad:
        raise DataError(image_list.source, rows_message(bad))
    return class_map


def store_class_map(path: str | os.PathLike, task: str, class_map: ClassMap) -> AnyPath:
    """Write the task's map once; a different map for the same task later is a DataError.

    The first writer wins atomically, so two checkpoints of a task finishing together cannot
    both think they wrote it: a hard link of a complete temporary file on a filesystem, a
    conditional PUT (`storage.create_if_absent`) on an object store that has one.
    """
    from circuitray import storage

    record = {"task": task, "classes": list(class_map.names), "source": class_map.source}
    if storage.is_remote(path):
        path = storage.as_path(path)
        data = json.dumps(record, indent=1)
        if storage.create_if_absent(path, data.encode()) is None and not storage.exists(path):
            storage.write_text(path, data)  # no conditional write on this store: best effort
    elif _link_once(Path(path), json.dumps(record, indent=1)):
        return Path(path)
    stored = read_stored_class_map(path)
    if stored.names != class_map.names:
        raise DataError(path, f"task '{task}' was labelled with {list(stored.names)} (from "
                              f"{stored.source}), now {list(class_map.names)} (from "
                              f"{class_map.source}); labels of its checkpoints would not agree. "
                              "Fix the data, or delete this file and the task's outputs to "
                              "relabel")
    return path


def _link_once(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists (hard link of a complete temporary file,
    or a rename where links are not supported); True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: rename, then compare
            if not path.exists():
                os.replace(tmp, path)
                return True
            return False
    finally:
        tmp.unlink(missing_ok=True)


def read_stored_class_map(path: str | os.PathLike | ObjectPath) -> ClassMap:
    """The map `store_class_map` wrote (a local file or an object)."""
    from circuitray import storage

    try:
        record = json.loads(storage.read_text(path))
        return ClassMap(tuple(record["classes"]), str(record["source"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"unreadable stored class map: {exc}") from exc


def as_names(classes: ClassMap | Sequence[str]) -> list[str]:
    """Class names in label order from a ClassMap or a plain list."""
    return list(classes.names if isinstance(classes, ClassMap) else classes)
