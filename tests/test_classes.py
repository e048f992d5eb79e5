"""One explicit class map per task: stray folders are errors, never a silent label shift."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints
from PIL import Image

from circuitray.data.classes import (
    ClassMap,
    read_stored_class_map,
    resolve_class_map,
    store_class_map,
)
from circuitray.errors import CheckpointError, DataError
from circuitray.job_config import load_job_config
from circuitray.runtime.discover import discover_checkpoint
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import manifest_rows

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
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


# ------------------------------------------------------------- through discover (inline)


def _job(tmp_path: Path, *extra: str):
    manifest = write_checkpoints(tmp_path, 1)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "data.shift_kinds=[]", "data.proxy_kinds=[]", *extra])
    return manifest, cfg


def test_discover_refuses_an_empty_extra_ood_folder_instead_of_shifting_labels(
        tmp_path: Path) -> None:
    _, cfg = _job(tmp_path)
    data = Path(manifest_rows(cfg)[0]["data_root"])
    (data / "ood" / "00").mkdir()
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed" and result["stage"] == "data"
    assert result["error_type"] == "DataError" and "ood/00: empty class folder" in result["error"]
    assert not JobLayout.of(cfg.output_dir).marker("ckpt0").exists()


def test_discover_refuses_an_ood_class_the_id_domain_lacks(tmp_path: Path) -> None:
    _, cfg = _job(tmp_path)
    data = Path(manifest_rows(cfg)[0]["data_root"])
    _domain(data, "ood", {"2": 1})
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed"
    assert "ood/2: class folder '2' is not in the class map ['0', '1']" in result["error"]


def test_discover_honours_a_non_sorted_manifest_class_order(tmp_path: Path) -> None:
    import pandas as pd

    manifest, cfg = _job(tmp_path, "data.limit=null", "data.attribution_limit=4")
    df = pd.read_csv(manifest)
    df["classes"] = json.dumps(["1", "0"])
    df.to_csv(manifest, index=False)
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result
    layout = JobLayout.of(cfg.output_dir)
    out = pq.read_table(layout.outputs_file("toy", "ckpt0", "id")).to_pandas()
    # data/id/0/*.png sort before data/id/1/*.png; with classes ["1", "0"] they are label 1
    assert out.label.tolist() == [1] * 8 + [0] * 8
    assert json.loads(layout.class_map_file("toy").read_text())["classes"] == ["1", "0"]
    marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
    assert set(marker.class_source) == {"manifest column classes"}


def test_discover_honours_a_non_sorted_class_map_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("1\n\n0\n")
    _, cfg = _job(tmp_path, "data.limit=null", "data.attribution_limit=4",
                  f"data.class_map={path}")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result
    layout = JobLayout.of(cfg.output_dir)
    out = pq.read_table(layout.outputs_file("toy", "ckpt0", "ood")).to_pandas()
    assert out.label.tolist() == [1] * 8 + [0] * 8  # data/ood/0/*.png first, now label 1
    marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
    assert set(marker.class_source) == {f"class-map file {path}"}


def test_discover_checks_the_class_count_against_the_head(tmp_path: Path) -> None:
    import pandas as pd

    manifest, cfg = _job(tmp_path)
    df = pd.read_csv(manifest)
    df["classes"] = json.dumps(["0", "1", "2"])
    df.to_csv(manifest, index=False)
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed" and result["error_type"] == "CheckpointError"
    assert "checkpoint 'ckpt0'" in result["error"] and "head has 2 outputs" in result["error"]


@pytest.mark.slow
def test_pipeline_records_a_stray_ood_folder_as_a_failure_naming_it(tmp_path: Path) -> None:
    import ray

    from circuitray.runtime.pipeline import run_pipeline
    from circuitray.runtime.plan import read_failures

    manifest, cfg = _job(tmp_path, "stages=[discover]")
    (Path(manifest_rows(cfg)[0]["data_root"]) / "ood" / "00").mkdir()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_pipeline(cfg)
    finally:
        ray.shutdown()
    assert result.discover.failed == ["ckpt0"] and result.discover.done == []
    failure = read_failures(JobLayout.of(cfg.output_dir)).to_dict("records")[0]
    assert failure["stage"] == "data" and "ood/00: empty class folder" in failure["error"]
