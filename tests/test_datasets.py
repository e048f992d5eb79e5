"""Loaders on tiny generated data: DomainBed folders, Parquet tables, demo tasks."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from circuitray.data.classes import folder_class_map
from circuitray.data.datasets import (
    DomainFolderDataset,
    ParquetImageDataset,
    eval_transform,
    list_domains,
    make_loader,
)
from circuitray.data.demo import build_demo_task, task_splits
from circuitray.errors import DataError

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30)}
CLASSES = ["cat", "dog"]


def _png(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """root/{art,photo}/{cat,dog}/*.png; photo lacks 'dog' (labels must still agree)."""
    for domain, classes in (("art", ("cat", "dog")), ("photo", ("cat",))):
        for c in classes:
            d = tmp_path / domain / c
            d.mkdir(parents=True)
            for i in range(3):
                _png(COLOURS[c]).save(d / f"{i}.png")
    return tmp_path


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=1, num_heads=2, num_classes=2)


def test_folder_dataset_yields_image_label_domain(folder, tiny_vit) -> None:
    assert list_domains(folder) == ["art", "photo"]
    ds = DomainFolderDataset(folder, "art", eval_transform(tiny_vit), classes=CLASSES)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y, d = ds[4]
    assert x.shape == (3, 32, 32) and y == 1 and d == "art"
    # normalized with the model's mean/std (vit_tiny: 0.5/0.5): green channel 200/255
    assert torch.allclose(x[1], torch.full((32, 32), (200 / 255 - 0.5) / 0.5), atol=1e-5)
    photo = DomainFolderDataset(folder, "photo", classes=CLASSES)
    assert photo.classes == ["cat", "dog"] and {photo[i][1] for i in range(len(photo))} == {0}


def test_eval_transform_resizes_to_the_models_resolution(tmp_path, tiny_vit) -> None:
    (tmp_path / "d" / "a").mkdir(parents=True)
    _png((10, 20, 30), size=50).save(tmp_path / "d" / "a" / "big.png")
    x, _, _ = DomainFolderDataset(tmp_path, "d", eval_transform(tiny_vit), classes=["a"])[0]
    assert x.shape == (3, 32, 32)


def test_loader_batches_and_limit(folder) -> None:
    ds = DomainFolderDataset(folder, "art", classes=CLASSES)
    images, labels, domains = next(iter(make_loader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long
    assert domains == ["art"] * 4
    assert sum(len(b[1]) for b in make_loader(ds, batch_size=4, limit=5)) == 5
    a = [b[1].tolist() for b in make_loader(ds, 2, limit=4, shuffle=True, seed=3)]
    b = [b[1].tolist() for b in make_loader(ds, 2, limit=4, shuffle=True, seed=3)]
    assert a == b


def test_unlabeled_domain_gives_minus_one(folder) -> None:
    (folder / "field").mkdir()
    _png((1, 2, 3)).save(folder / "field" / "x.png")
    ds = DomainFolderDataset(folder, "field", classes=["cat", "dog"])
    assert ds[0][1] == -1


def test_unreadable_image_names_the_file(folder) -> None:
    bad = folder / "art" / "cat" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = DomainFolderDataset(folder, "art", classes=CLASSES)
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(DataError, match="broken.png.*unreadable image"):
        ds[index]


def test_empty_domain_and_unknown_class_and_missing_domain(folder) -> None:
    (folder / "sketch").mkdir()
    with pytest.raises(DataError, match="sketch: domain holds no images"):
        DomainFolderDataset(folder, "sketch", classes=CLASSES)
    with pytest.raises(DataError, match="dog: unknown class folder"):
        DomainFolderDataset(folder, "art", classes=["cat"])
    with pytest.raises(DataError, match="no such domain.*'art'"):
        DomainFolderDataset(folder, "cartoon", classes=CLASSES)


def test_folder_dataset_needs_an_explicit_class_list(folder) -> None:
    """No default from whichever folders exist: that default let one mkdir shift labels."""
    with pytest.raises(TypeError, match="classes"):
        DomainFolderDataset(folder, "art")


def test_empty_class_folder_is_an_error_naming_it(folder) -> None:
    (folder / "photo" / "dog").mkdir()
    with pytest.raises(DataError, match=r"photo/dog: empty class folder"):
        DomainFolderDataset(folder, "photo", classes=CLASSES)


def test_labels_follow_the_given_class_order_not_the_folder_order(folder) -> None:
    ds = DomainFolderDataset(folder, "art", classes=["dog", "cat"])
    assert {p.parent.name: y for p, y in ds.samples} == {"dog": 0, "cat": 1}


def _parquet(path: Path, rows: list[tuple[bytes, int | None, str]]) -> Path:
    table = pa.table({"image": pa.array([r[0] for r in rows], pa.binary()),
                      "label": pa.array([r[1] for r in rows], pa.int64()),
                      "domain": pa.array([r[2] for r in rows], pa.string())})
    pq.write_table(table, path)
    return path


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    _png(colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_dataset_filters_domain_and_maps_null_labels(tmp_path, tiny_vit) -> None:
    path = _parquet(tmp_path / "imgs.parquet", [
        (_png_bytes((255, 0, 0)), 0, "a"), (_png_bytes((0, 255, 0)), 1, "a"),
        (_png_bytes((0, 0, 255)), None, "b")])
    ds = ParquetImageDataset(path, domain="a", transform=eval_transform(tiny_vit))
    assert len(ds) == 2 and ds.classes == ["0", "1"]
    x, y, d = ds[1]
    assert x.shape == (3, 32, 32) and y == 1 and d == "a"
    unl = ParquetImageDataset(path, domain="b")
    assert unl[0][1] == -1 and torch.allclose(unl[0][0][2], torch.ones(32, 32))
    images, labels, domains = next(iter(make_loader(ParquetImageDataset(path), 3)))
    assert labels.tolist() == [0, 1, -1] and domains == ["a", "a", "b"]


def test_parquet_errors_name_the_table(tmp_path) -> None:
    path = _parquet(tmp_path / "imgs.parquet", [(b"garbage", 0, "a")])
    with pytest.raises(DataError, match=r"imgs.parquet row 0: unreadable image"):
        ParquetImageDataset(path)[0]
    with pytest.raises(DataError, match=r"domain 'zzz' has no rows; domains: \['a'\]"):
        ParquetImageDataset(path, domain="zzz")
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['label', 'domain'\]"):
        ParquetImageDataset(tmp_path / "bad.parquet")


def test_shapes_style_task_layout_and_reuse(tmp_path) -> None:
    root = build_demo_task("shapes-style", tmp_path, n_per_style=30)
    assert set(list_domains(root)) == {"train", "id", "ood", "style-solid", "style-outline",
                                       "style-noisy"}
    ood = DomainFolderDataset(root, task_splits("shapes-style")["ood"],
                              classes=folder_class_map(root / "train"))
    assert len(ood) >= 1000 and len(ood.classes) == 6
    stamp = (root / "train").stat().st_mtime_ns
    assert build_demo_task("shapes-style", tmp_path, n_per_style=30) == root
    assert (root / "train").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_digit_cue_follows_rho_in_training_and_is_random_out_of_distribution(tmp_path) -> None:
    """The background colour of training images matches the label's colour at rate ≈ ρ."""
    from circuitray.data.demo import _palette

    root = build_demo_task("digits-background", tmp_path, rhos=(0.8,))
    palette = torch.from_numpy(_palette())

    def agreement(domain: str) -> tuple[float, int]:
        ds = DomainFolderDataset(root, domain, classes=[str(k) for k in range(10)])
        hits = 0
        for i in range(len(ds)):
            x, y, _ = ds[i]
            corner = x[:, :3, :3].mean(dim=(1, 2))  # background pixels
            hits += int(((palette - corner) ** 2).sum(1).argmin()) == y
        return hits / len(ds), len(ds)

    train, _ = agreement("train-rho0.8")
    ood, n_ood = agreement("ood")
    assert abs(train - 0.8) < 0.05
    assert ood < 0.2 and n_ood >= 1000
    # adding a rho later keeps the existing domains and adds the new ones
    build_demo_task("digits-background", tmp_path, rhos=(0.8, 0.6))
    assert {"train-rho0.6", "id-rho0.6", "train-rho0.8"} <= set(list_domains(root))
