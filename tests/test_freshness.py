"""No stale or damaged result is ever reported: fingerprints, checksums and the printed plan.

Each test runs the tiny job, changes one thing a user would change (a setting, an image, the
weights, a damaged or deleted output file), runs again and checks that exactly the affected
domains are recomputed, that the tables say the new setting, and that reduce alone refuses
to report numbers from files that no longer match their markers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints
from PIL import Image

from circuitray.errors import StaleResultError
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.pipeline import run_pipeline
from circuitray.runtime.reduce import run_reduce
from circuitray.tables import read_parquet

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
FAST = ("tracking.enabled=false", "reduce.figures=false", "reduce.n_boot=10")


def _config(tmp: Path, manifest: Path, *extra: str) -> JobConfig:
    return load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp / 'job'}",
                                  *FAST, *extra])


def _mtimes(root: Path, folder: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for p in (root / folder).rglob("*.parquet")}


def _changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {k for k in after if before.get(k) != after[k]}


def test_settings_change_recomputes_every_affected_domain_and_the_tables_say_so(
        tmp_path: Path, local_ray, capsys) -> None:
    manifest = write_checkpoints(tmp_path, 2)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    capsys.readouterr()
    changed = _config(tmp_path, manifest, "attribution.method=eap", "attribution.metric=logit",
                      "data.limit=8", "data.shift_kinds=[contrast]")
    result = run_pipeline(changed)
    err = capsys.readouterr().err
    assert "2 checkpoints: attribution.method changed (eap-ig-inputs -> eap)" in err
    assert "attribution.metric changed (kl -> logit)" in err and "data.limit changed" in err
    assert sorted(result.discover.done) == ["ckpt0", "ckpt1"]
    assert not result.reduce.skipped, "reduce must not call stale tables up to date"
    layout = JobLayout.of(cfg.output_dir)
    domains = read_parquet(layout.metrics / "domains.parquet").to_pandas()
    assert not domains.domain.str.contains("gaussian_noise").any(), "dropped domains reduced"
    assert domains.domain.str.contains("contrast").any()
    assert (domains.n_examples == 8).all()
    for cid in ("ckpt0", "ckpt1"):
        for dom in domains[domains.checkpoint == cid].domain:
            edges = pq.read_table(layout.edges_file("toy", cid, dom)).to_pandas()
            assert set(edges.method) == {"eap"}, (cid, dom)


def test_new_shift_kind_computes_only_the_new_domains(tmp_path: Path, local_ray,
                                                       capsys) -> None:
    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    root = Path(cfg.output_dir)
    before = _mtimes(root, "edges") | _mtimes(root, "outputs")
    capsys.readouterr()
    result = run_pipeline(_config(tmp_path, manifest, "data.shift_kinds=[gaussian_noise, contrast]"))
    assert "new domain (2 domains)" in capsys.readouterr().err
    changed = _changed(before, _mtimes(root, "edges") | _mtimes(root, "outputs"))
    assert len(changed) == 4 and all("contrast" in k for k in changed), changed  # 2 x 2 files
    assert not result.reduce.skipped


def test_changed_image_recomputes_only_the_domains_that_read_its_folder(
        tmp_path: Path, local_ray) -> None:
    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    root = Path(cfg.output_dir)
    before = _mtimes(root, "edges")
    img = tmp_path / "data" / "ood" / "0" / "0.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    result = run_pipeline(cfg)
    assert result.discover.done == ["ckpt0"]
    assert {Path(k).stem for k in _changed(before, _mtimes(root, "edges"))} == {"ood"}
    assert not result.reduce.skipped


def test_weights_rewritten_recompute_but_touched_weights_do_not(tmp_path: Path,
                                                                local_ray) -> None:
    import os

    manifest = write_checkpoints(tmp_path, 2)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    weights = tmp_path / "weights"
    os.utime(weights / "ckpt0.safetensors")  # same bytes, new mtime: nothing to recompute
    again = run_pipeline(cfg)
    assert sorted(again.discover.skipped) == ["ckpt0", "ckpt1"] and again.reduce.skipped
    (weights / "ckpt0.safetensors").write_bytes((weights / "ckpt1.safetensors").read_bytes())
    third = run_pipeline(cfg)
    assert third.discover.done == ["ckpt0"] and third.discover.skipped == ["ckpt1"]
    assert not third.reduce.skipped


def test_changed_config_json_beside_the_weights_recomputes_with_the_new_normalization(
        tmp_path: Path, local_ray, capsys) -> None:
    """A hub-layout config.json sets the checkpoints' mean/std: editing it is a change of
    input, like the weights themselves."""
    import json

    manifest = write_checkpoints(tmp_path, 2)
    config = tmp_path / "weights" / "config.json"
    config.write_text(json.dumps({"pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    config.write_text(json.dumps({"pretrained_cfg": {"mean": [0.2] * 3, "std": [0.3] * 3}}))
    capsys.readouterr()
    again = run_pipeline(cfg)
    assert "weights.config changed" in capsys.readouterr().err
    assert sorted(again.discover.done) == ["ckpt0", "ckpt1"] and not again.reduce.skipped
    marker = pq.read_table(JobLayout.of(cfg.output_dir).marker("ckpt0")).to_pandas()
    assert marker["mean"].map(lambda m: list(np.round(m, 6))).tolist() == [[0.2] * 3] * len(marker)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_or_missing_domain_file_is_named_by_reduce_and_recomputed_by_run(
        tmp_path: Path, local_ray, capsys, damage: str) -> None:
    from circuitray import cli

    manifest = write_checkpoints(tmp_path, 2)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    layout = JobLayout.of(cfg.output_dir)
    victim = layout.edges_file("toy", "ckpt0", "ood")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim.unlink()
    with pytest.raises(StaleResultError, match=str(victim)):
        run_reduce(cfg)
    args = ["reduce", str(CONF), f"manifest={manifest}", f"output_dir={cfg.output_dir}", *FAST]
    capsys.readouterr()
    assert cli.main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "run discover" in err
    before = _mtimes(layout.root, "edges")
    result = run_pipeline(cfg)
    assert ("damaged" if damage == "truncate" else "missing") in capsys.readouterr().err
    assert result.discover.done == ["ckpt0"] and result.discover.computed == 1
    changed = _changed(before, _mtimes(layout.root, "edges"))
    assert changed == {str(victim.relative_to(layout.root))}
    # the recomputed file is byte-identical (discover is deterministic), so reduce may
    # rightly find its inputs unchanged; either way its tables cover ckpt0 again
    models = read_parquet(layout.metrics / "models.parquet").to_pandas()
    assert models.set_index("checkpoint").loc["ckpt0"].filter(like="ddb_").notna().all()


def test_bytes_changed_under_the_same_size_and_mtime_stop_reduce_naming_the_file(
        tmp_path: Path, local_ray, capsys) -> None:
    """Bit rot keeps size and mtime, so only the checksum of the bytes reduce parses (in a
    Ray task) catches it: the driver stops with the file's name, not a worker traceback."""
    import os

    from circuitray import cli

    manifest = write_checkpoints(tmp_path, 2)
    cfg = _config(tmp_path, manifest)
    run_pipeline(cfg)
    victim = JobLayout.of(cfg.output_dir).outputs_file("toy", "ckpt1", "id")
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StaleResultError, match=rf"{victim}: damaged.*delete it and run discover"):
        run_reduce(cfg, force=True)
    capsys.readouterr()
    args = ["reduce", str(CONF), f"manifest={manifest}", f"output_dir={cfg.output_dir}", *FAST]
    assert cli.main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "Traceback" not in err and "RayTaskError" not in err
    victim.unlink()
    result = run_pipeline(cfg)
    assert result.discover.done == ["ckpt1"] and result.discover.computed == 1
    assert not run_reduce(cfg, force=True).skipped  # the recomputed bytes verify again


def test_unreadable_image_is_reported_once_for_every_checkpoint_before_any_model_loads(
        tmp_path: Path, local_ray, capsys, monkeypatch) -> None:
    manifest = write_checkpoints(tmp_path, 2)
    bad = tmp_path / "data" / "ood" / "1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = _config(tmp_path, manifest, "stages=[discover]")
    result = run_pipeline(cfg)
    assert sorted(result.discover.failed) == ["ckpt0", "ckpt1"]
    failures = pq.read_table(JobLayout.of(cfg.output_dir).failures).to_pandas()
    assert set(failures.stage) == {"data"}
    assert failures.error.str.contains(str(bad), regex=False).all()
    err = capsys.readouterr().err
    assert err.count(str(bad)) >= 1 and "cannot run" in err


def test_weights_key_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    """The EMA and the raw weights of one training checkpoint are different models."""
    from circuitray.runtime.plan import domain_inputs, domain_specs, fingerprint, manifest_rows

    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest)
    row = manifest_rows(cfg)[0]
    spec = domain_specs(row, cfg)[0]
    listings = {"id": "a", "ood": "b"}

    def fp(r: dict) -> str:
        return fingerprint(domain_inputs(r, spec, cfg, weights="w", listings=listings))

    assert fp(row) != fp({**row, "weights_key": "state_dict_ema"})


def test_the_corruption_implementation_is_part_of_a_shift_domains_fingerprint(
        tmp_path: Path, monkeypatch) -> None:
    """Frost from the reference photographs and the procedural fallback give other pixels:
    a switch between them (installing or removing the reference) recomputes."""
    from circuitray.data import shifts
    from circuitray.runtime.plan import domain_inputs, domain_specs, fingerprint, manifest_rows

    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest, "data.shift_kinds=[frost]")
    row = manifest_rows(cfg)[0]
    spec = next(s for s in domain_specs(row, cfg) if s.kind == "frost")

    def fp() -> str:
        return fingerprint(domain_inputs(row, spec, cfg, weights="w",
                                         listings={"id": "a", "ood": "b"}))

    before = fp()
    monkeypatch.setattr(shifts, "implementation_id", lambda kind: f"{kind}:other")
    assert fp() != before
