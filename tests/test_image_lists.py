"""Image lists (data.image_list: CSV/Parquet of path,label,domain) instead of domain folders.

The same images as a list or as DomainBed folders give the same tables; editing the list
re-runs exactly the domains whose rows changed; every error names the list and the row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints

from circuitray.data.classes import list_class_map
from circuitray.data.datasets import ImageListDataset
from circuitray.data.image_list import list_listed_domain, read_image_list
from circuitray.errors import DataError
from circuitray.job_config import load_job_config
from circuitray.runtime.discover import discover_checkpoint
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import manifest_rows, plan_job

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
SMALL = ["data.shift_kinds=[gaussian_noise]", "data.shift_severities=[3]",
         "data.proxy_kinds=[brightness]", "data.proxy_severities=[2]", "tracking.enabled=false",
         "reduce.figures=false"]


def _folder_rows(data: Path) -> list[dict]:
    """The folder layout's images in DomainFolderDataset's order, as list rows."""
    rows = []
    for domain in ("id", "ood"):
        for label in ("0", "1"):
            for img in sorted((data / domain / label).iterdir()):
                rows.append({"path": f"{domain}/{label}/{img.name}", "label": label,
                             "domain": domain})
    return rows


def _write_list(rows: list[dict], path: Path, *, string_labels: bool = False) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df["label"] = df["label"].astype(str) if string_labels else df["label"].astype("Int64")
        df.to_parquet(path, index=False)
    return path


@pytest.fixture
def job(tmp_path: Path) -> dict:
    manifest = write_checkpoints(tmp_path, 1)
    data = tmp_path / "data"
    return {"manifest": manifest, "data": data, "rows": _folder_rows(data), "tmp": tmp_path}


def _cfg(job: dict, out: str, *extra: str):
    return load_job_config(CONF, [f"manifest={job['manifest']}",
                                  f"output_dir={job['tmp'] / out}", *SMALL, *extra])


def _tables(cfg) -> dict[tuple[str, str], pd.DataFrame]:
    layout = JobLayout.of(cfg.output_dir)
    marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
    out = {}
    for domain in marker.domain:
        for which, path in (("edges", layout.edges_file("toy", "ckpt0", domain)),
                            ("outputs", layout.outputs_file("toy", "ckpt0", domain))):
            out[which, domain] = pq.read_table(path).to_pandas()
    return out


# ------------------------------------------------------------ same tables as folders


@pytest.mark.parametrize("kind", ["csv", "parquet-names"])
def test_a_list_of_the_folder_images_gives_the_folder_tables(job: dict, kind: str) -> None:
    from circuitray.runtime.reduce import run_reduce

    folders = _cfg(job, "folders")
    assert discover_checkpoint(manifest_rows(folders)[0], folders)["status"] == "done"
    # CSV: integer labels are indices; Parquet string labels are names (sorted "0" < "1")
    suffix = ".csv" if kind == "csv" else ".parquet"
    listed = _write_list(job["rows"], job["data"] / f"images{suffix}",
                         string_labels=kind != "csv")
    cfg = _cfg(job, "list", f"data.image_list={listed}")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result
    want, got = _tables(folders), _tables(cfg)
    assert sorted(got) == sorted(want) and len(got) == 8  # id, ood, 1 shift, 1 proxy
    for key in want:
        pd.testing.assert_frame_equal(got[key], want[key], obj=str(key))
    stored = json.loads(JobLayout.of(cfg.output_dir).class_map_file("toy").read_text())
    assert stored["classes"] == ["0", "1"]
    a, b = run_reduce(folders), run_reduce(cfg)
    assert set(a.frames) == set(b.frames)
    for name in a.frames:
        pd.testing.assert_frame_equal(b.frames[name], a.frames[name], obj=name)


# ------------------------------------------------------------ freshness


def _stale(cfg) -> dict[str, str]:
    plan = plan_job(cfg).checkpoints[0]
    assert plan.error is None, plan.error
    return {d.spec.name: d.reason for d in plan.todo}


def test_editing_the_list_reruns_exactly_the_domains_whose_rows_changed(job: dict) -> None:
    listed = _write_list(job["rows"], job["data"] / "images.csv")
    cfg = _cfg(job, "list", f"data.image_list={listed}")
    assert discover_checkpoint(manifest_rows(cfg)[0], cfg)["status"] == "done"
    assert _stale(cfg) == {}
    # the ood rows moved to the top: row numbers change, no domain's rows do
    rows = [r for r in job["rows"] if r["domain"] == "ood"] + \
           [r for r in job["rows"] if r["domain"] == "id"]
    _write_list(rows, listed)
    assert _stale(cfg) == {}
    # one ood label changed: only ood is stale (shifts and proxies are corruptions of id)
    rows[0] = {**rows[0], "label": "1"}
    _write_list(rows, listed)
    assert _stale(cfg) == {"ood": "images of ood changed"}
    assert discover_checkpoint(manifest_rows(cfg)[0], cfg)["computed"] == 1
    # one id image rewritten: every domain reads id (the reference circuit, the corruptions)
    rows[0] = {**rows[0], "label": "0"}
    _write_list(rows, listed)
    first_id = job["data"] / job["rows"][0]["path"]
    st = first_id.stat()
    os.utime(first_id, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert set(_stale(cfg)) == {"id", "ood", "shift:gaussian_noise:3", "proxy:brightness:2"}


# ------------------------------------------------------------ errors name the file and row


def _rows(n: int = 3) -> list[dict]:
    return [{"path": f"id/{'01'[i % 2]}/{i // 2}.png", "label": i % 2, "domain": "id"}
            for i in range(n)]


@pytest.mark.parametrize("case, edit, expected", [
    ("missing column", lambda rows: [{"path": r["path"], "domain": r["domain"]} for r in rows],
     "misses column(s) ['label']"),
    ("empty path", lambda rows: [rows[0], {**rows[1], "path": ""}, rows[2]], "row 2: empty path"),
    ("empty domain", lambda rows: [rows[0], rows[1], {**rows[2], "domain": ""}],
     "row 3: empty domain"),
    ("duplicate", lambda rows: [rows[0], rows[1], {**rows[2], "path": rows[0]["path"]}],
     "rows 1 and 3: 'id/0/0.png' listed twice in domain 'id'"),
    ("negative index", lambda rows: [rows[0], {**rows[1], "label": -1}, rows[2]],
     "row 2: label -1 is not a class index"),
])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_malformed_list_is_an_error_naming_the_file_and_row(job: dict, case: str, edit,
                                                            expected: str, suffix: str) -> None:
    path = job["data"] / f"bad{suffix}"
    pd.DataFrame(edit(_rows())).to_csv(path, index=False) if suffix == ".csv" else \
        pd.DataFrame(edit(_rows())).to_parquet(path, index=False)
    with pytest.raises(DataError) as err:
        read_image_list(path)
    assert err.value.path == str(path) and expected in str(err.value), case


def test_unknown_label_and_out_of_range_index_name_the_row(job: dict) -> None:
    row = manifest_rows(_cfg(job, "x"))[0]
    names = job["data"] / "names.csv"
    _write_list([{"path": "id/0/0.png", "label": "0", "domain": "id"},
                 {"path": "id/1/0.png", "label": "1", "domain": "id"},
                 {"path": "ood/1/0.png", "label": "cat", "domain": "ood"}], names)
    with pytest.raises(DataError) as err:
        list_class_map(row, None, names, "id", ["ood"])
    assert str(names) in str(err.value) and "row 3: unknown label 'cat'" in str(err.value)
    indices = _write_list([{"path": "id/0/0.png", "label": 0, "domain": "id"},
                           {"path": "id/0/1.png", "label": 2, "domain": "id"}],
                          job["data"] / "idx.csv")
    with pytest.raises(DataError) as err:
        list_class_map(row, None, indices, "id")
    assert str(indices) in str(err.value)
    assert "row 2: label index 2 is out of range for the model's head (2 outputs" in \
        str(err.value)
    with pytest.raises(DataError, match=r"idx.csv row 2: label index 2 is out of range"):
        ImageListDataset(indices, "id", classes=["0", "1"])


def test_missing_image_and_unknown_domain_name_the_list(job: dict) -> None:
    path = _write_list([*_rows(2), {"path": "id/0/nope.png", "label": 0, "domain": "id"}],
                       job["data"] / "l.csv")
    with pytest.raises(DataError) as err:
        list_listed_domain(path, "id")
    assert err.value.path == str(path) and "row 3: image file 'id/0/nope.png'" in str(err.value)
    with pytest.raises(DataError) as err:
        list_listed_domain(path, "sketch")
    assert err.value.path == str(path)
    assert "no rows with domain 'sketch' (column 'domain'); domains in the list: ['id']" in \
        str(err.value)


def test_bad_list_data_is_that_checkpoints_failure_naming_the_row(job: dict) -> None:
    """An unreadable image is found while planning (decoded once) and fails the checkpoint at
    stage data, with the list, the row and the path; the job goes on."""
    (job["data"] / "id" / "1" / "broken.png").write_bytes(b"not a png")
    rows = [*job["rows"], {"path": "id/1/broken.png", "label": "1", "domain": "id"}]
    listed = _write_list(rows, job["data"] / "images.csv")
    cfg = _cfg(job, "list", f"data.image_list={listed}")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed" and result["stage"] == "data", result
    assert f"{listed} row {len(rows)} (id/1/broken.png): " in result["error"]
    # a list naming an unknown ID domain: the same kind of failure, naming the list
    cfg = _cfg(job, "list2", f"data.image_list={listed}", "data.id_domain=photo")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed" and result["stage"] == "data"
    assert f"{listed}: no rows with domain 'photo'" in result["error"]


def test_image_list_key_must_name_a_csv_or_parquet_file(tmp_path: Path) -> None:
    from circuitray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.image_list': '.*images.txt' is not a "):
        load_job_config(CONF, [f"manifest={tmp_path / 'm.csv'}",
                               f"data.image_list={tmp_path / 'images.txt'}"])
    cfg = load_job_config(CONF, [f"manifest={tmp_path / 'm.csv'}", "data.image_list=l.csv"],
                          base=tmp_path)
    assert cfg.data.image_list == str(tmp_path / "l.csv")  # relative to where the job starts


def test_label_column_type_decides_indices_or_names(tmp_path: Path) -> None:
    """CSV: all-integer cells are indices (a blank cell is unlabeled); one non-integer cell
    makes every cell a name. Parquet: the column's type decides, "0" text is a name."""
    csv = tmp_path / "a.csv"
    csv.write_text("path,label,domain\na.png,0,d\nb.png,  ,d\nc.png,1,d\n")
    got = read_image_list(csv)
    assert got.indices and [r.label for r in got.rows] == [0, None, 1]
    csv.write_text("path,label,domain\na.png,0,d\nb.png,cat,d\n")
    assert [r.label for r in read_image_list(csv).rows] == ["0", "cat"]
    pq_path = tmp_path / "a.parquet"
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["0", None], "domain": "d"}
                 ).to_parquet(pq_path)
    got = read_image_list(pq_path)
    assert not got.indices and [r.label for r in got.rows] == ["0", None]


def test_an_edit_keeping_size_and_mtime_is_still_read(tmp_path: Path) -> None:
    """Parsed lists are remembered by content: a same-size edit in the same mtime tick (a
    coarse filesystem clock) must not return the old rows."""
    path = tmp_path / "l.csv"
    path.write_text("path,label,domain\na.png,0,d\n")
    st = path.stat()
    assert read_image_list(path).rows[0].label == 0
    path.write_text("path,label,domain\na.png,1,d\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_image_list(path).rows[0].label == 1


def test_each_checkpoint_can_read_its_own_list_from_the_manifest(job: dict) -> None:
    """The manifest's data_root column may name an image list per row (one list per task or
    per checkpoint), relative to the manifest like every path in it."""
    manifest = pd.read_csv(job["manifest"])
    write_checkpoints(job["tmp"] / "second", 2)  # ckpt1's weights
    renamed = [{**r, "domain": {"id": "photos", "ood": "sketches"}[r["domain"]],
                "path": f"../data/{r['path']}"} for r in job["rows"]]
    (job["tmp"] / "lists").mkdir()
    _write_list(job["rows"], job["data"] / "images.csv")
    _write_list(renamed, job["tmp"] / "lists" / "other.parquet", string_labels=True)
    second = pd.read_csv(job["tmp"] / "second" / "manifest.csv").iloc[[1]]
    second = second.assign(weights=f"second/{second.weights.iloc[0]}", task="other",
                           data_root="lists/other.parquet", id_domain="photos",
                           ood_domain="sketches")
    manifest = pd.concat([manifest.assign(data_root="data/images.csv"), second])
    manifest.to_csv(job["manifest"], index=False)
    cfg = _cfg(job, "per-row")
    rows = manifest_rows(cfg)
    results = [discover_checkpoint(row, cfg) for row in rows]
    assert [r["status"] for r in results] == ["done", "done"], results
    layout = JobLayout.of(cfg.output_dir)
    domains = {cid: sorted(pq.read_table(layout.marker(cid)).column("domain").to_pylist())
               for cid in ("ckpt0", "ckpt1")}
    assert domains["ckpt0"] == sorted(["id", "ood", "shift:gaussian_noise:3",
                                       "proxy:brightness:2"])
    assert domains["ckpt1"] == sorted(["photos", "sketches", "shift:gaussian_noise:3",
                                       "proxy:brightness:2"])
    folders = _cfg(job, "folders")
    folder_row = {**rows[0], "data_root": str(job["data"])}
    assert discover_checkpoint(folder_row, folders)["status"] == "done"
    want = pq.read_table(JobLayout.of(folders.output_dir).outputs_file(
        "toy", "ckpt0", "ood")).to_pandas()
    got = pq.read_table(layout.outputs_file("toy", "ckpt0", "ood")).to_pandas()
    pd.testing.assert_frame_equal(got, want)
