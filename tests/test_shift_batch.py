"""Shifted domains are corrupted a batch at a time, with exactly the pixels of one at a time.

Each image draws its randomness from its own generator (seed * 1_000_003 + index), so a
batch of B is B one-image corruptions sharing the deterministic work. Measured bit-identical
(torch.equal) for every kind and severity at 32, 96 and 224 px, one and two torch threads;
the tests below assert exact equality. Speed: bench/shift_batch.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _jobdata import write_checkpoints, write_domains

from circuitray.data import shifts
from circuitray.data.datasets import (
    DomainFolderDataset,
    ImageTransform,
    RememberedItems,
    make_loader,
)
from circuitray.data.shifts import CORRUPTIONS, ShiftedDataset, corrupt
from circuitray.errors import InputError
from circuitray.job_config import load_job_config
from circuitray.runtime import discover
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import DomainSpec, manifest_rows

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
TRANSFORM = ImageTransform(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Twelve varied 32-px images (smooth colour noise, a sharp square): batched ops may
    change algorithm with the batch size (a batched einsum did at B > 5)."""
    g = torch.Generator().manual_seed(3)
    x = shifts._octave_noise(12 * 3, 32, 1.5, g).view(12, 3, 32, 32) * 0.8 + 0.1
    x[:, :, 9:21, 7:19] = torch.rand(12, 3, 1, 1, generator=g)
    return x


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("size", [32, 96])  # CIFAR-10-C's constants, ImageNet-C's
def test_batched_corruption_equals_image_by_image(photos, kind, size, monkeypatch) -> None:
    x = photos if size == 32 else torch.nn.functional.interpolate(photos[:3], size=size,
                                                                   mode="bilinear")
    seeds = [5 * 1_000_003 + i for i in range(len(x))]
    batched = corrupt(x, kind, 3, seeds=seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(batched[i:i + 1], corrupt(x[i:i + 1], kind, 3, seed=seed)), (kind, i)
    # an item's pixels do not depend on its batch-mates, its place in the batch, or the
    # slices `corrupt` cuts a batch into
    flipped = corrupt(x.flip(0), kind, 3, seeds=seeds[::-1])
    assert torch.equal(flipped, batched.flip(0))
    monkeypatch.setattr(shifts, "CHUNK_BYTES", 2 * x[0].numel() * 4)
    assert torch.equal(corrupt(x, kind, 3, seeds=seeds), batched)


def test_seeds_must_match_the_batch(photos) -> None:
    with pytest.raises(InputError, match="2 seeds for a batch of 12"):
        corrupt(photos, "fog", 1, seeds=[0, 1])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_domains(tmp_path_factory.mktemp("shift_batch") / "data", 6, size=32)


class _OneByOne(torch.utils.data.Dataset):
    """`base` without `__getitems__`: what a DataLoader did before, one item at a time."""

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_discover_loaders_give_each_image_its_own_corruption(data_root, kind, monkeypatch
                                                              ) -> None:
    """The outputs and attribution loaders of a shifted domain yield, batch by batch, what
    the per-image path yields for the same (seeded) subsets, and corrupt whole batches."""
    cfg = load_job_config(CONF, [f"manifest={data_root / 'none.csv'}", "data.limit=10",
                                 "data.attribution_limit=6", "data.batch_size=4"])
    spec = DomainSpec(name=f"shift:{kind}:3", role="shift", source="id", kind=kind, severity=3)
    calls: list[int] = []
    real = shifts.corrupt
    monkeypatch.setattr(shifts, "corrupt", lambda x, *a, **k: (calls.append(len(x)),
                                                               real(x, *a, **k))[1])
    sources = discover._Sources(str(data_root), TRANSFORM, ["0", "1"], ["id"])
    out, att, data = discover._loaders(spec, sources, cfg)
    assert isinstance(data, RememberedItems) and isinstance(data.base, ShiftedDataset)
    got = [list(out), list(att), list(att)]
    assert calls == [4, 4, 2]  # the outputs' batches only: the attribution subset is kept
    assert data.decoded == 10

    base = DomainFolderDataset(data_root, "id", TRANSFORM, classes=["0", "1"])
    one_by_one = _OneByOne(ShiftedDataset(base, kind, 3, seed=cfg.data.seed, name=spec.name))
    d = cfg.data
    want_out = list(make_loader(one_by_one, 4, limit=10, shuffle=True, seed=d.seed))
    want_att = list(make_loader(one_by_one, 4, limit=6, shuffle=True, seed=d.seed,
                                fixed_order=True))
    for batches, want in zip(got, [want_out, want_att, want_att], strict=True):
        assert len(batches) == len(want)
        for (x, y, dom), (wx, wy, wdom) in zip(batches, want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy) and dom == wdom


def test_remembered_batch_items_are_copies_counted_as_stored(data_root) -> None:
    """Items read as one batch are views of it; the kept ones are copied out, so the bytes
    counted are the bytes held (a view would pin the whole batch)."""
    base = DomainFolderDataset(data_root, "id", TRANSFORM, classes=["0", "1"])
    ds = RememberedItems(ShiftedDataset(base, "contrast", 2), keep=[1, 3], max_bytes=10**6)
    first = ds.__getitems__([0, 1, 2, 3])
    assert sorted(ds.items) == [1, 3] and ds.decoded == 4
    for i in (1, 3):
        kept = ds.items[i][0]
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
        assert torch.equal(kept, first[i][0])
    again = ds.__getitems__([3, 2, 1])
    assert ds.decoded == 5  # only item 2 read again
    assert again[0][0] is ds.items[3][0] and torch.equal(again[1][0], first[2][0])


def _tables(tmp: Path, manifest: Path, out: str) -> dict[str, object]:
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp / out}",
                                 "data.limit=12", "data.attribution_limit=8",
                                 "data.batch_size=4", "data.shift_severities=[4]",
                                 "data.shift_kinds=[shot_noise,glass_blur,frost,jpeg_compression]",
                                 "data.proxy_kinds=[]"])
    result = discover.discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result
    layout = JobLayout.of(cfg.output_dir)
    return {k: pq.read_table(getattr(layout, k)).to_pandas() for k in ("edges", "outputs")}


def test_a_tiny_jobs_tables_are_those_of_the_one_image_path(tmp_path, monkeypatch) -> None:
    manifest = write_checkpoints(tmp_path, 1)
    batched = _tables(tmp_path, manifest, "batched")
    monkeypatch.delattr(ShiftedDataset, "__getitems__")  # every item corrupted on its own
    alone = _tables(tmp_path, manifest, "alone")
    assert set(batched["edges"]["domain"]) >= {"shift:glass_blur:4", "shift:frost:4"}
    for key in ("edges", "outputs"):
        a, b = batched[key], alone[key]
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        for col in a.columns:
            if a[col].dtype == object and isinstance(a[col].iloc[0], np.ndarray):
                np.testing.assert_array_equal(np.stack(a[col]), np.stack(b[col]), err_msg=col)
            else:
                assert a[col].equals(b[col]), col
