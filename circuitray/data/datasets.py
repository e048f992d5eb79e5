"""Image domains a user brings: DomainBed-style folders, image lists and Parquet image tables.

Every dataset yields ``(image, label, domain)`` with label −1 for unlabeled images. Images go
through an `ImageTransform` in two steps — `to_unit` (decode, resize/crop to the model's
resolution, float in [0, 1]) then `normalize` (the model's mean/std) — so that corruptions
(`circuitray.data.shifts.ShiftedDataset`) can act in between, on the [0, 1] image a camera
would have produced, exactly as ImageNet-C/CIFAR-10-C define them.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from circuitray.data.classes import ClassMap, as_names, class_folders, is_image
from circuitray.data.image_list import is_image_list, read_image_list
from circuitray.errors import DataError

UNLABELED = -1

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
           "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}


@dataclass(frozen=True)
class ImageTransform:
    """A model's eval preprocessing, split so corruptions can act on the [0, 1] image.

    `crop_pct` resize-then-center-crop follows timm; an image that already has the model's
    resolution is left unresized (resizing 32 px demo images to 35 and cropping back would
    only blur them and cut the corner cue).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def to_unit(self, image: Image.Image) -> torch.Tensor:
        """Decoded PIL image -> float [3, H, W] in [0, 1] at the model's resolution."""
        image = image.convert("RGB")
        h, w = self.size
        if (image.height, image.width) != (h, w):
            interp = INTERPOLATIONS.get(self.interpolation, InterpolationMode.BICUBIC)
            scale = (int(h / self.crop_pct), int(w / self.crop_pct))
            image = TF.resize(image, list(scale) if h != w else scale[0], interpolation=interp)
            image = TF.center_crop(image, [h, w])
        return TF.to_tensor(image)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[.., 3, H, W] in [0, 1] -> the model's normalized input (works batched too)."""
        mean = torch.tensor(self.mean, dtype=images.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(3, 1, 1)
        return (images - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_unit(image))


def eval_transform(model: torch.nn.Module) -> ImageTransform:
    """The eval preprocessing timm declares for `model` (resolution, mean/std, crop)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    # the pretrained config says 224 even for a model built with img_size=32; the patch
    # embedding knows the resolution the model actually accepts
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        h, w = (built, built) if isinstance(built, int) else tuple(built)
    return ImageTransform(size=(int(h), int(w)), mean=tuple(float(m) for m in cfg["mean"]),
                          std=tuple(float(s) for s in cfg["std"]),
                          crop_pct=float(cfg.get("crop_pct", 1.0)),
                          interpolation=str(cfg.get("interpolation", "bicubic")))


def _decode(data: bytes, where: str) -> Image.Image:
    """Open and fully decode an image, or raise DataError naming where it came from."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(where, f"unreadable image: {exc}") from exc


def _png_rgb8_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an 8-bit RGB PNG, from its header; None for anything else."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    if data[24] != 8 or data[25] != 2:  # bit depth 8, colour type 2 (RGB, no palette/alpha)
        return None
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def _fast_unit(data: bytes, size: tuple[int, int] | None) -> torch.Tensor | None:
    """[3, H, W] in [0, 1] decoded by libpng straight into a tensor, or None to take PIL's path.

    Only for 8-bit RGB PNGs already at `size` (None: any size), where the pixels are exactly
    PIL's (no mode conversion, no resize): PIL's open/load/copy/convert/to_tensor was ~3x the
    time for the small images of a demo job. Anything else, or any failure, goes to PIL,
    which reports unreadable files with their location.
    """
    shape = _png_rgb8_size(data)
    if shape is None or (size is not None and shape != tuple(size)):
        return None
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_png

            pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                ImageReadMode.RGB)
        except (ImportError, RuntimeError):  # gone in a later torchvision, or unreadable
            return None
    return pixels.to(torch.get_default_dtype()).div(255)


class _ImageDataset(Dataset):
    """Shared item logic: decode -> to_unit -> normalize, plus `unit()` for shifts."""

    transform: ImageTransform | None
    classes: list[str]

    def _source(self, index: int) -> tuple[bytes | Path, int, str, str]:
        """The item's encoded image (bytes or a file), label, domain and where it is from."""
        raise NotImplementedError

    def unit(self, index: int) -> tuple[torch.Tensor, int, str]:
        """The item as a [0, 1] image at the model's resolution, before normalization."""
        data, label, domain, where = self._source(index)
        if not isinstance(data, (bytes, bytearray)):  # read once, for both decoders
            try:
                with open(data, "rb") as fh:  # (a Path(path) would parse the path again)
                    data = fh.read()
            except OSError as exc:
                raise DataError(where, f"unreadable image: {exc}") from exc
        fast = _fast_unit(data, self.transform.size if self.transform else None)
        if fast is not None:
            return fast, label, domain
        image = _decode(data, where)
        tensor = self.transform.to_unit(image) if self.transform else TF.to_tensor(
            image.convert("RGB"))
        return tensor, label, domain

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform.normalize(images) if self.transform else images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        tensor, label, domain = self.unit(index)
        return self.normalize(tensor), label, domain

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, str]]:
        """A DataLoader's batch, normalized as one tensor (items are views of it); without a
        transform the images may differ in size, so they are normalized one by one."""
        if self.transform is None:
            return [self[i] for i in indices]
        items = [self.unit(i) for i in indices]
        images = self.normalize(torch.stack([item[0] for item in items]))
        return [(images[k], item[1], item[2]) for k, item in enumerate(items)]


class RememberedUnits(_ImageDataset):
    """`base` whose decoded [0, 1] images are kept once read, up to `max_bytes`.

    One discover task reads a source several times: the ID split for the ID domain, then for
    each of its corruptions and the alarm's proxies, which corrupt the same decoded images.
    Decoding is pure, so later readers take the first read's tensor (never modified in
    place: batches stack and normalization makes new tensors). Images beyond the budget are
    simply decoded again.
    """

    def __init__(self, base: _ImageDataset, max_bytes: int):
        self.base, self.max_bytes = base, max_bytes
        self.transform, self.classes = base.transform, base.classes
        self.kept: dict[int, tuple[torch.Tensor, int, str]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.base)

    def _source(self, index: int) -> tuple[bytes | Path, int, str, str]:
        return self.base._source(index)

    def unit(self, index: int) -> tuple[torch.Tensor, int, str]:
        item = self.kept.get(index)
        if item is None:
            item = self.base.unit(index)
            size = item[0].numel() * item[0].element_size()
            if self.nbytes + size <= self.max_bytes:
                self.kept[index] = item
                self.nbytes += size
        return item


def list_domains(root: str | os.PathLike) -> list[str]:
    """Domain folder names under `root` (hidden folders skipped), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such dataset folder")
    domains = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise DataError(root, "holds no domain folders")
    return domains


class DomainFolderDataset(_ImageDataset):
    """root/<domain>/<class>/<image> (PACS, OfficeHome, TerraIncognita; the demo tasks).

    Labels index `classes`, given explicitly (a `ClassMap` or names in label order; see
    `circuitray.data.classes.resolve_class_map`): a default derived from whichever folders
    exist would let one stray folder shift every label. A class folder not in `classes`, or
    one without images, is an error naming it. A domain folder holding images directly (no
    class folders) is unlabeled: label −1.
    """

    def __init__(self, root: str | os.PathLike, domain: str,
                 transform: ImageTransform | None = None, *,
                 classes: ClassMap | Sequence[str]):
        self.root, self.domain, self.transform = Path(root), domain, transform
        domain_dir = self.root / domain
        if not domain_dir.is_dir():
            have = list_domains(self.root)
            raise DataError(domain_dir, f"no such domain; domains under {self.root}: {have}")
        self.classes = as_names(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in class_folders(domain_dir):
            if c not in index:
                raise DataError(domain_dir / c, f"unknown class folder; classes are {self.classes}")
            images = [(p, index[c]) for p in sorted((domain_dir / c).iterdir()) if is_image(p)]
            if not images:
                raise DataError(domain_dir / c, "empty class folder (holds no images): remove "
                                                "it or add its images")
            self.samples += images
        self.samples += [(p, UNLABELED) for p in sorted(domain_dir.iterdir()) if is_image(p)]
        if not self.samples:
            raise DataError(domain_dir, "domain holds no images")

    def __len__(self) -> int:
        return len(self.samples)

    def _source(self, index: int) -> tuple[bytes | Path, int, str, str]:
        path, label = self.samples[index]
        return path, label, self.domain, str(path)


class ImageListDataset(_ImageDataset):
    """One domain of an image list (`circuitray.data.image_list`): its rows in file order.

    Labels: a class name indexes `classes`, an integer is the index itself, an empty cell is
    −1. A label outside `classes` is an error naming the list and the row (discover checks
    them all before any model runs; this check guards direct use).
    """

    def __init__(self, source: str | os.PathLike, domain: str,
                 transform: ImageTransform | None = None, *,
                 classes: ClassMap | Sequence[str]):
        self.image_list = read_image_list(source)
        self.domain, self.transform = domain, transform
        self.classes = as_names(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.rows = self.image_list.domain_rows(domain)
        self.samples: list[tuple[Path, int]] = []
        for r in self.rows:
            if r.label is None:
                label = UNLABELED
            elif isinstance(r.label, str):
                if r.label not in index:
                    raise DataError(self.image_list.where(r), f"unknown label '{r.label}'; "
                                                              f"classes are {self.classes}")
                label = index[r.label]
            elif r.label >= len(self.classes):
                raise DataError(self.image_list.where(r), f"label index {r.label} is out of "
                                                          f"range for {len(self.classes)} classes")
            else:
                label = r.label
            self.samples.append((r.file, label))

    def __len__(self) -> int:
        return len(self.samples)

    def _source(self, index: int) -> tuple[bytes | Path, int, str, str]:
        path, label = self.samples[index]
        where = f"{self.image_list.where(self.rows[index])} ({self.rows[index].path})"
        return path, label, self.domain, where


def open_domain(root: str | os.PathLike, domain: str, transform: ImageTransform | None = None,
                *, classes: ClassMap | Sequence[str]) -> _ImageDataset:
    """A job's base dataset for one domain: the domain's rows when `root` is an image list
    (.csv/.parquet), else the DomainBed folder root/domain."""
    if is_image_list(root):
        return ImageListDataset(root, domain, transform, classes=classes)
    return DomainFolderDataset(root, domain, transform, classes=classes)


class ParquetImageDataset(_ImageDataset):
    """A Parquet table with columns image (encoded bytes), label (nullable int), domain.

    Rows are filtered to `domain` when given. Null labels become −1 (unlabeled).
    `classes` is the label range as strings ("0".."max"). The table is read into memory.
    """

    def __init__(self, path: str | os.PathLike, domain: str | None = None,
                 transform: ImageTransform | None = None):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.path, self.domain, self.transform = Path(path), domain, transform
        try:
            table = pq.read_table(self.path)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise DataError(self.path, f"not a readable Parquet table: {exc}") from exc
        missing = [c for c in ("image", "label", "domain") if c not in table.column_names]
        if missing:
            raise DataError(self.path, f"missing column(s) {missing}; has {table.column_names}")
        all_labels = [v for v in table.column("label").to_pylist() if v is not None]
        self.classes = [str(k) for k in range(max(all_labels) + 1)] if all_labels else []
        if domain is not None:
            table = table.filter(pc.equal(table.column("domain"), domain))
            if table.num_rows == 0:
                have = sorted(set(pq.read_table(self.path, columns=["domain"])
                                  .column("domain").to_pylist()))
                raise DataError(self.path, f"domain '{domain}' has no rows; domains: {have}")
        if table.num_rows == 0:
            raise DataError(self.path, "table holds no images")
        self._images = table.column("image").to_pylist()
        self._labels = [UNLABELED if v is None else int(v) for v in table.column("label").to_pylist()]
        self._domains = [str(v) for v in table.column("domain").to_pylist()]

    def __len__(self) -> int:
        return len(self._images)

    def _source(self, index: int) -> tuple[bytes | Path, int, str, str]:
        where = f"{self.path} row {index}"
        return self._images[index], self._labels[index], self._domains[index], where


def collate(batch: Sequence[tuple[torch.Tensor, int, str]]
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(image, label, domain) items -> (images [B,3,H,W], labels [B] long, domains list)."""
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    return images, labels, [b[2] for b in batch]


def subset_indices(n: int, limit: int | None, shuffle: bool, seed: int) -> list[int] | None:
    """Which items a capped loader reads: the first `limit`, or (with `shuffle`) the first
    `limit` of a seeded permutation; None when it reads them all. The selection depends only
    on (n, limit, shuffle, seed), so two loaders with the same seed pick nested subsets.
    """
    if limit is None or limit >= n:
        return None
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=g)[:limit].tolist()
    return list(range(limit))


def make_loader(dataset: Dataset, batch_size: int, *, limit: int | None = None,
                shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                fixed_order: bool = False, **kwargs: Any) -> DataLoader:
    """A DataLoader over `dataset` yielding (images, labels, domains).

    `limit` keeps the first `limit` items (a seeded random `limit` items when `shuffle`), so
    a capped run sees the same examples every time. `shuffle` also reshuffles every pass;
    with `fixed_order` every pass instead yields the same items in the same order and the
    same batches (the selection order, itself seeded-random when `shuffle`): a reader that
    goes over the data twice (attribution's mean pass, then its scoring pass) sees each
    batch again and can reuse what it computed for it.
    """
    idx = subset_indices(len(dataset), limit, shuffle, seed)
    if fixed_order and shuffle and idx is None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(dataset), generator=g).tolist()
    if idx is not None:
        dataset = Subset(dataset, idx)
    reshuffle = shuffle and not fixed_order
    generator = torch.Generator().manual_seed(seed) if reshuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=reshuffle, generator=generator,
                      num_workers=num_workers, collate_fn=collate, **kwargs)


class RememberedItems(Dataset):
    """`base` whose items at `keep` are kept in memory once read, up to `max_bytes` of images.

    Discover reads a domain's attribution subset three times (outputs, attribution's mean
    pass, its scoring pass); decoding and corrupting an image is pure, so the later reads take
    the first one's tensor. Items beyond the budget are simply decoded again.
    """

    def __init__(self, base: Dataset, keep: Sequence[int] | None, max_bytes: int):
        self.base, self.max_bytes = base, max_bytes
        self.keep = set(range(len(base)) if keep is None else keep)
        self.items: dict[int, Any] = {}
        self.nbytes = 0
        self.decoded = 0  # items read from `base` (each costs a decode, maybe a corruption)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        item = self.items.get(index)
        if item is not None:
            return item
        item = self.base[index]
        self.decoded += 1
        self._remember(index, item)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch: remembered items from memory, the rest read from `base` together (one
        `__getitems__` call where `base` has one, e.g. a shifted domain corrupting a batch)."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.items]
        batched = getattr(self.base, "__getitems__", None)
        read = batched(missing) if callable(batched) and missing else \
            [self.base[i] for i in missing]
        fresh = dict(zip(missing, read, strict=True))
        self.decoded += len(missing)
        for i, item in fresh.items():
            self._remember(i, item, copy=callable(batched))
        return [fresh[i] if i in fresh else self.items[i] for i in indices]

    def _remember(self, index: int, item: Any, copy: bool = False) -> None:
        """Keep `item` if it is in `keep` and fits; `copy` detaches an image that is a view
        of a whole batch, so what is kept is what is counted."""
        size = item[0].numel() * item[0].element_size()
        if index in self.keep and self.nbytes + size <= self.max_bytes:
            self.items[index] = (item[0].clone(), *item[1:]) if copy else item
            self.nbytes += size

    def forget(self) -> None:
        """Drop what is remembered (the domain is done)."""
        self.items.clear()
        self.nbytes = 0


def load_all(dataset: Dataset, batch_size: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every item of a small dataset as tensors (training the demo zoo keeps data in memory)."""
    images, labels, domains = [], [], []
    for x, y, d in make_loader(dataset, batch_size):
        images.append(x)
        labels.append(y)
        domains += d
    return torch.cat(images), torch.cat(labels), domains
