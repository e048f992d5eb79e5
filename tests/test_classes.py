"""One explicit class map per task: stray folders are errors, never a silent label shift."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from circuitray.data.classes import (
    ClassMap,
    read_stored_class_map,
    resolve_class_map,
    store_class_map,
)
from circuitray.errors import CheckpointError, DataError

NO_CFG = SimpleNamespace(class_map=None)


def _domain(root: Path, domain: str, classes: dict[str, int]) -> None:
    for name, n in classes.items():
        folder = root / domain / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (10 * i, 80, 160)).save(folder / f"{i}.png")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _domain(root, "id", {"cat": 2, "dog": 2})
    _domain(root, "ood", {"cat": 1, "dog": 1})
    return root


def _row(**extra) -> dict:
    return {"checkpoint_id": "c0", "weights": "/zoo/c0.safetensors", "num_classes": 2, **extra}


def test_map_comes_from_the_id_domain_folders(data) -> None:
    cm = resolve_class_map(_row(), NO_CFG, data, "id", ["ood"])
    assert cm.names == ("cat", "dog") and cm.index("dog") == 1
    assert cm.source == f"ID domain folders {data / 'id'}"


def test_empty_extra_folder_in_ood_is_an_error_naming_it(data) -> None:
    """`mkdir <root>/ood/00` used to shift every label by one (ID accuracy 1.0 -> 0.5)."""
    (data / "ood" / "00").mkdir()
    with pytest.raises(DataError, match=r"ood/00: empty class folder"):
        resolve_class_map(_row(), NO_CFG, data, "id", ["ood"])


def test_extra_class_folder_in_ood_not_in_the_id_map_is_an_error(data) -> None:
    _domain(data, "ood", {"bird": 1})
    with pytest.raises(DataError, match=r"ood/bird: class folder 'bird' is not in the class map "
                                        r"\['cat', 'dog'\] \(from ID domain folders"):
        resolve_class_map(_row(), NO_CFG, data, "id", ["ood"])


def test_empty_class_folder_in_the_id_domain_is_an_error(data) -> None:
    (data / "id" / "emu").mkdir()
    with pytest.raises(DataError, match=r"id/emu: empty class folder"):
        resolve_class_map(_row(num_classes=3), NO_CFG, data, "id")


@pytest.mark.parametrize("cell", ['["dog", "cat"]', ["dog", "cat"]])
def test_manifest_classes_column_sets_the_label_order(data, cell) -> None:
    cm = resolve_class_map(_row(classes=cell), NO_CFG, data, "id", ["ood"])
    assert cm.names == ("dog", "cat") and cm.source == "manifest column classes"


def test_bad_manifest_classes_cell_names_the_checkpoint(data) -> None:
    with pytest.raises(DataError, match=r"'classes' of checkpoint 'c0'.*JSON list"):
        resolve_class_map(_row(classes="dog|cat"), NO_CFG, data, "id")
    with pytest.raises(DataError, match=r"\['dog'\] more than once"):
        resolve_class_map(_row(classes='["dog", "dog"]'), NO_CFG, data, "id")


def test_class_map_file_from_the_config(data, tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("dog\n\ncat\n")
    cm = resolve_class_map(_row(), SimpleNamespace(class_map=str(path)), data, "id", ["ood"])
    assert cm.names == ("dog", "cat") and cm.source == f"class-map file {path}"
    with pytest.raises(DataError, match=r"classes.txt: class-map file lists \['dog', 'cat'\], "
                                        r"but the manifest column"):
        resolve_class_map(_row(classes='["cat", "dog"]'), SimpleNamespace(class_map=str(path)),
                          data, "id")
    with pytest.raises(DataError, match=r"missing.txt: unreadable class-map file"):
        resolve_class_map(_row(), SimpleNamespace(class_map=str(tmp_path / "missing.txt")),
                          data, "id")


def test_number_of_classes_must_match_the_head(data) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint 'c0' \(/zoo/c0.safetensors\): 2 "
                                              r"classes \['cat', 'dog'\].*head has 3 outputs"):
        resolve_class_map(_row(num_classes=3), NO_CFG, data, "id", ["ood"])


def test_stored_map_is_written_once_and_a_different_one_is_refused(tmp_path) -> None:
    path = tmp_path / "classes" / "toy.json"
    first = ClassMap(("cat", "dog"), "ID domain folders /d/id")
    store_class_map(path, "toy", first)
    store_class_map(path, "toy", ClassMap(("cat", "dog"), "manifest column classes"))
    assert read_stored_class_map(path) == first
    with pytest.raises(DataError, match=r"toy.json: task 'toy' was labelled with \['cat', 'dog'\]"
                                        r".*now \['dog', 'cat'\] \(from manifest column classes"):
        store_class_map(path, "toy", ClassMap(("dog", "cat"), "manifest column classes"))
    assert not list(path.parent.glob(".*.tmp"))
