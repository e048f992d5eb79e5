"""The fast PNG decode path gives PIL's pixels exactly, and leaves everything else to PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from circuitray.data import datasets
from circuitray.data.datasets import ImageTransform, ParquetImageDataset
from circuitray.errors import DataError

SIZE = (8, 8)


def _png(mode: str, size: tuple[int, int] = SIZE, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    (img.convert(mode) if mode != "P" else img.convert("RGB").quantize(16)).save(buf, "PNG")
    return buf.getvalue()


def _dataset(tmp_path, blobs: list[bytes]) -> ParquetImageDataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": blobs, "label": list(range(len(blobs))),
                             "domain": ["d"] * len(blobs)}), path)
    return ParquetImageDataset(path, transform=ImageTransform(SIZE, (0.5,) * 3, (0.25,) * 3))


@pytest.mark.parametrize(("mode", "size", "fast"), [
    ("RGB", SIZE, True), ("RGB", (12, 10), False), ("RGBA", SIZE, False),
    ("L", SIZE, False), ("P", SIZE, False)])
def test_unit_matches_pil_and_takes_the_fast_path_only_for_rgb8_at_size(
        tmp_path, monkeypatch, mode, size, fast) -> None:
    blob = _png(mode, size)
    ds = _dataset(tmp_path, [blob])
    pil = ds.transform.to_unit(datasets._decode(blob, "ref"))
    calls = []
    real = datasets._decode
    monkeypatch.setattr(datasets, "_decode", lambda d, w: (calls.append(w), real(d, w))[1])
    got, label, domain = ds.unit(0)
    assert (label, domain) == (0, "d")
    assert got.dtype == torch.float32 and got.shape == (3, *SIZE)
    assert torch.equal(got, pil)
    assert (not calls) == fast  # PIL decoded it exactly when the fast path does not apply
    if fast:
        assert torch.equal(got, TF.to_tensor(Image.open(io.BytesIO(blob)).convert("RGB")))


def test_truncated_png_is_reported_with_its_row(tmp_path) -> None:
    blob = _png("RGB")
    ds = _dataset(tmp_path, [blob[:60]])
    with pytest.raises(DataError, match=r"images\.parquet row 0"):
        ds.unit(0)
