"""A discover task decodes each image once and reuses the mean pass's plain runs, and what it
writes is what the old three-reads, reshuffling loaders computed (same images selected)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _families import FAMILY_MODELS
from _jobdata import write_checkpoints
from _tiny import images, tiny_vit

from circuitray.attribution import attribute
from circuitray.data import datasets
from circuitray.data.datasets import RememberedItems, make_loader, subset_indices
from circuitray.families import adapter_for
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime import discover
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import manifest_rows

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"


def _config(tmp: Path, manifest: Path, out: str) -> JobConfig:
    # 8 attributed images in batches of 4: two batches, each reusable once
    return load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp / out}",
                                  "data.limit=12", "data.attribution_limit=8",
                                  "data.batch_size=4", "data.shift_severities=[3]",
                                  "data.proxy_kinds=[]", "attribution.steps=2"])


def _old_loaders(spec, sources, cfg):
    """The loaders before: three reads of every attributed image, reshuffled between passes,
    each domain decoding its source afresh."""
    from circuitray.data.shifts import ShiftedDataset

    d = cfg.data
    data = datasets.DomainFolderDataset(sources.root, spec.source, transform=sources.transform,
                                        classes=sources.classes)
    if spec.kind is not None:
        data = ShiftedDataset(data, spec.kind, spec.severity, seed=d.seed, name=spec.name)
    n_att = min(d.attribution_limit, d.limit)
    out = make_loader(data, d.batch_size, limit=d.limit, shuffle=True, seed=d.seed)
    att = make_loader(data, d.batch_size, limit=n_att, shuffle=True, seed=d.seed)
    return out, att, RememberedItems(data, [], 0)


def _run(cfg: JobConfig) -> dict[str, object]:
    result = discover.discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done", result
    layout = JobLayout.of(cfg.output_dir)
    return {"marker": pq.read_table(layout.marker("ckpt0")).to_pandas(),
            "edges": pq.read_table(layout.edges).to_pandas(),
            "outputs": pq.read_table(layout.outputs).to_pandas()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, object]]:
    """One checkpoint (id, ood, one shift) run with the new loaders and the old ones."""
    tmp = tmp_path_factory.mktemp("reuse")
    manifest = write_checkpoints(tmp, 1)
    loads: list[int] = []
    real_load = datasets.DomainFolderDataset._source  # every decode, shifted domains' too
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.DomainFolderDataset, "_source",
               lambda self, i: (loads.append(1), real_load(self, i))[1])
    try:
        new = _run(_config(tmp, manifest, "new"))
        new["decodes"] = len(loads)
        loads.clear()
        mp.setattr(discover, "_loaders", _old_loaders)
        old = _run(_config(tmp, manifest, "old"))
        old["decodes"] = len(loads)
    finally:
        mp.undo()
    return {"new": new, "old": old}


def test_a_discover_task_reuses_every_plain_run_of_the_mean_pass(runs) -> None:
    new, old = runs["new"]["marker"], runs["old"]["marker"]
    assert len(new) == 3
    assert (new["plain_runs_reused"] == 2).all()  # both attribution batches, every domain
    assert (old["plain_runs_reused"] == 0).all()  # a reshuffling loader never hits


def test_each_image_is_decoded_once_per_task_and_corrupted_once_per_domain(runs) -> None:
    # 2 sources (id, ood) x data.limit: the shifted domain corrupts the id domain's images
    assert runs["new"]["decodes"] == 2 * 12
    assert runs["old"]["decodes"] == 3 * (12 + 8 + 8)  # outputs, mean pass, scoring pass


def test_outputs_are_unchanged_and_edges_equal_up_to_summation_order(runs) -> None:
    """Same images selected: outputs identical row by row; edges sum the same examples in
    another batch order (float32 within a batch), so they agree to rounding."""
    new, old = runs["new"], runs["old"]
    np.testing.assert_array_equal(new["outputs"]["logits"].explode().to_numpy(float),
                                  old["outputs"]["logits"].explode().to_numpy(float))
    cols = ["domain", "example", "label", "pred"]
    assert new["outputs"][cols].equals(old["outputs"][cols])
    key = ["domain", "src", "dst"]
    e_new = new["edges"].sort_values(key).reset_index(drop=True)
    e_old = old["edges"].sort_values(key).reset_index(drop=True)
    assert e_new[key].equals(e_old[key])
    assert (e_new["n_examples"] == 8).all() and (e_old["n_examples"] == 8).all()
    scale = np.abs(e_old["score"]).max()
    np.testing.assert_allclose(e_new["score"], e_old["score"], rtol=1e-4, atol=1e-5 * scale)


def test_fixed_order_loader_repeats_its_batches_over_the_shuffled_subset() -> None:
    ds = _Items(20)
    fixed = make_loader(ds, 3, limit=7, shuffle=True, seed=5, fixed_order=True)
    shuffled = make_loader(ds, 3, limit=7, shuffle=True, seed=5)
    first = [b[1].tolist() for b in fixed]
    assert first == [b[1].tolist() for b in fixed]  # the same batches on the second pass
    assert sorted(sum(first, [])) == sorted(subset_indices(20, 7, True, 5))
    assert sorted(sum(first, [])) == sorted(sum((b[1].tolist() for b in shuffled), []))
    everything = make_loader(ds, 3, shuffle=True, seed=5, fixed_order=True)
    assert [b[1].tolist() for b in everything] == [b[1].tolist() for b in everything]


class _Items(torch.utils.data.Dataset):
    """Item i: a 1x1 image of value i, label i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 1, 1), float(i)), i, "d"


def test_remembered_items_stay_within_their_byte_budget() -> None:
    ds = RememberedItems(_Items(10), keep=[1, 2, 3], max_bytes=2 * 3 * 4)  # two items fit
    for _ in range(2):
        for i in range(10):
            assert ds[i][1] == i
    assert sorted(ds.items) == [1, 2] and ds.decoded == 10 + 8
    ds.forget()
    assert not ds.items and ds.nbytes == 0


def test_attribute_counts_the_plain_runs_it_reused() -> None:
    model, x = tiny_vit(), images(n=8)
    batches = [x[:3], x[3:6], x[6:]]
    assert attribute(model, batches, steps=2).plain_runs_reused == 3
    assert attribute(model, batches, steps=2, cache_bytes=0).plain_runs_reused == 0
    assert attribute(model, batches, method="eap", ablation="zero").plain_runs_reused == 0


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("rows", [0, 1, 8, 10**6])
def test_summing_gradients_over_ig_points_changes_no_score(monkeypatch, rows, family) -> None:
    """Destinations whose gradients are summed over the IG points (within IG_SUM_BYTES: none,
    the logits, the last block (two for the smaller batch), all) score as when contracted
    point by point, for every family (the sums are of what its adapter's read-gradient methods give)."""
    import circuitray.attribution as attribution

    model, x = FAMILY_MODELS[family](depth=3), images(n=6)
    batches = [x[:4], x[4:]]
    # N·T·D float64 of the first batch (T = 4 patches + the family's extra tokens)
    row_bytes = 4 * (4 + len(adapter_for(model).extra_tokens)) * 16 * 8
    kw = dict(steps=3, dtype="fp64", per_example_norms=True)
    monkeypatch.setattr(attribution, "IG_SUM_BYTES", 0)
    ref = attribute(model, batches, **kw)
    monkeypatch.setattr(attribution, "IG_SUM_BYTES", rows * row_bytes)
    got = attribute(model, batches, **kw)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.example_norms, ref.example_norms, rtol=1e-10)


class _CountedUnits(datasets._ImageDataset):
    """Item i: a 1x2x2 image of value i/10, label i; counts how often it is decoded."""

    transform = datasets.ImageTransform(size=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    classes = ["a"]

    def __init__(self, n: int):
        self.n, self.decodes = n, 0

    def __len__(self) -> int:
        return self.n

    def unit(self, index: int):
        self.decodes += 1
        return torch.full((3, 2, 2), index / 10), index, "d"


def test_remembered_units_decode_once_within_their_byte_budget() -> None:
    base = _CountedUnits(6)
    ds = datasets.RememberedUnits(base, max_bytes=2 * 3 * 2 * 2 * 4)  # two images fit
    for _ in range(3):
        got = [ds.unit(i) for i in range(6)]
        assert [label for _, label, _ in got] == list(range(6))
        assert all(torch.equal(image, torch.full((3, 2, 2), i / 10))
                   for i, (image, _, _) in enumerate(got))
    assert sorted(ds.kept) == [0, 1] and base.decodes == 6 + 2 * 4  # the first two are kept


def test_a_batch_normalizes_as_one_tensor_what_items_normalize_one_by_one() -> None:
    ds = _CountedUnits(5)
    batch = ds.__getitems__([4, 0, 2])
    for (image, label, domain), i in zip(batch, [4, 0, 2], strict=True):
        assert torch.equal(image, ds[i][0]) and (label, domain) == (i, "d")


def test_a_task_keeps_a_sources_images_only_while_several_domains_still_read_it(tmp_path
                                                                                ) -> None:
    manifest = write_checkpoints(tmp_path, 1)
    root = str(manifest.parent / "data")
    sources = discover._Sources(root, None, ["0", "1"], ["id", "id", "ood"])
    shared, single = sources.get("id"), sources.get("ood")
    assert isinstance(shared, datasets.RememberedUnits) and sources.get("id") is shared
    assert isinstance(single, datasets.DomainFolderDataset)  # one reader: nothing to keep
    shared.unit(0)
    assert len(shared.kept) == 1
    sources.done("id")
    assert sources.get("id") is shared  # one reader left
    sources.done("id")
    sources.done("ood")
    assert sources.open == {}  # the last readers are done: their images are freed
