"""Job planning, shared by both stages: which checkpoints × domains a job covers, what
determines each domain's result (its fingerprint), and what is on disk for it.

A domain's fingerprint hashes everything its two files depend on: the weights' content, the
architecture and preprocessing columns of its manifest row, the listing of the image folders
it reads, the data settings that change results (limits, seed, batching), its shift, the
attribution settings and the package version. Markers store the fingerprint and the inputs
it was made from, so a plan can say why a domain is recomputed
(`attribution.method changed (eap-ig-inputs -> eap)`). Discover runs exactly the domains that
are not complete; reduce reads exactly the planned domains, and refuses to run on any that
are stale, damaged or missing, instead of printing numbers from an older setting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import circuitray
from circuitray import storage
from circuitray.config import to_dict
from circuitray.data.listing import Listing, list_domain, validate_listing
from circuitray.errors import CircuitrayError, ConfigError, DataError
from circuitray.job_config import JobConfig
from circuitray.runtime.files import FileRecord, check_file, checksum_file
from circuitray.runtime.layout import JobLayout
from circuitray.tables import FAILURE_SCHEMA, read_parquet_or_empty

# Manifest columns that decide what a checkpoint computes (the rest are annotations).
MODEL_COLUMNS = ("arch", "arch_kwargs", "num_classes", "classes", "mean", "std", "input_size",
                 "interpolation", "crop_pct", "weights_key")
# data.* keys that choose WHICH domains run (each domain's own spec covers them), not how.
# An image list counts by each domain's rows (its listing digest), not by the whole file.
_DOMAIN_SELECTION = {"root", "image_list", "id_domain", "ood_domains", "shift_kinds",
                     "shift_severities", "proxy_kinds", "proxy_severities"}
_ATTRIBUTION_EXECUTION = {"device"}  # where it runs, not what it computes
FINGERPRINT_FORMAT = 1


@dataclass(frozen=True)
class DomainSpec:
    """One domain a checkpoint is run on, and where its images come from."""

    name: str
    role: str  # id | ood | shift | proxy
    source: str
    kind: str | None = None
    severity: int | None = None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def manifest_rows(cfg: JobConfig) -> list[dict[str, Any]]:
    """The manifest's checkpoints this job covers, as plain dicts (NaN -> None)."""
    from circuitray.models import read_manifest

    df = read_manifest(cfg.manifest)
    if cfg.checkpoints is not None:
        unknown = sorted(set(cfg.checkpoints) - set(df["checkpoint_id"]))
        if unknown:
            raise ConfigError(f"config key 'checkpoints': {unknown} not in {cfg.manifest}")
        df = df[df["checkpoint_id"].isin(cfg.checkpoints)]
    rows = [{k: _clean(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
    if not cfg.intermediate:
        rows = [r for r in rows if is_final(r)]
    return rows


def is_final(row: Mapping[str, Any]) -> bool:
    """Rows without a `final` column are final; intermediate ones say final = false."""
    value = row.get("final")
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no")
    return bool(value)


def domain_specs(row: Mapping[str, Any], cfg: JobConfig) -> list[DomainSpec]:
    """ID first (the reference circuit for CSS), then OOD, shifts and proxies (final only)."""
    d = cfg.data
    id_domain = d.id_domain or row.get("id_domain")
    if not id_domain:
        raise DataError(cfg.manifest, f"checkpoint '{row['checkpoint_id']}' has no id_domain "
                                      "(manifest column or data.id_domain)")
    specs = [DomainSpec(str(id_domain), "id", str(id_domain))]
    oods = list(d.ood_domains) or ([row["ood_domain"]] if row.get("ood_domain") else [])
    specs += [DomainSpec(str(o), "ood", str(o)) for o in oods]
    if not is_final(row):
        return specs
    for role, kinds, sevs in (("shift", d.shift_kinds, d.shift_severities),
                              ("proxy", d.proxy_kinds, d.proxy_severities)):
        specs += [DomainSpec(f"{role}:{k}:{s}", role, str(id_domain), k, s)
                  for k in kinds for s in sevs]
    return specs


def data_root(row: Mapping[str, Any], cfg: JobConfig) -> str:
    """Where a checkpoint's domains live: the image list data.image_list when set (domains are
    its `domain` values), else the row's data_root column, else data.root, else an error."""
    root = cfg.data.image_list or row.get("data_root") or cfg.data.root
    if not root:
        raise DataError(cfg.manifest, f"checkpoint '{row['checkpoint_id']}' has no data_root "
                                      "(manifest column, data.root or data.image_list)")
    return str(root)


# ------------------------------------------------------------------ fingerprints


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def weights_stat(weights: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a local weights file; None for a URI or a missing file."""
    if _is_uri(weights):
        return None
    try:
        st = os.stat(weights.removeprefix("file://"))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def weights_hash(weights: str) -> str:
    """Content hash of a weights file; for a URI, what the store says identifies the object."""
    if not _is_uri(weights):
        return checksum_file(weights.removeprefix("file://"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(weights)
    info = fs.info(path)
    ident = {k: str(info.get(k)) for k in ("size", "ETag", "etag", "md5Hash", "crc32c",
                                           "mtime", "LastModified", "last_modified", "created")
             if info.get(k) is not None}
    return "uri:" + hashlib.sha256(json.dumps([weights, ident], sort_keys=True).encode()
                                   ).hexdigest()[:32]


def _config_value(value: Any) -> Any:
    """A config value as it enters a fingerprint: a file it names counts by its content."""
    if isinstance(value, str) and value and os.path.isfile(value):
        return f"file:{checksum_file(value)}"
    return value


def _sibling_config_file(weights: str) -> Path | None:
    """The config.json that `models.read_checkpoint_preprocessing` reads beside local weights."""
    if not weights or _is_uri(weights):
        return None
    path = Path(weights).parent / "config.json"
    return path if path.is_file() else None


def domain_inputs(row: Mapping[str, Any], spec: DomainSpec, cfg: JobConfig, *, weights: str,
                  listings: Mapping[str, str]) -> dict[str, Any]:
    """Everything one domain's edges and outputs depend on, as a flat dict of short values.

    `weights` is the weights' content hash, `listings` the digests of the image folders
    (by folder name) the domain reads: its own source and the ID domain, whose class folders
    define the labels.
    """
    id_domain = cfg.data.id_domain or row.get("id_domain")
    inputs: dict[str, Any] = {"format": FINGERPRINT_FORMAT, "circuitray": circuitray.__version__,
                              "weights": weights}
    config = _sibling_config_file(str(row.get("weights") or ""))
    if config is not None:  # a hub-layout config.json can set the checkpoint's mean/std
        inputs["weights.config"] = f"file:{checksum_file(config)}"
    for col in MODEL_COLUMNS:
        if row.get(col) is not None:
            inputs[f"model.{col}"] = _clean(row[col])
    for key, value in sorted(to_dict(cfg.data).items()):
        if key not in _DOMAIN_SELECTION:
            inputs[f"data.{key}"] = _config_value(value)
    for key, value in sorted(to_dict(cfg.attribution).items()):
        if key not in _ATTRIBUTION_EXECUTION:
            inputs[f"attribution.{key}"] = value
    for folder in sorted({spec.source, str(id_domain)}):
        inputs[f"images.{folder}"] = listings[folder]
    inputs["domain.role"] = spec.role
    inputs["domain.source"] = spec.source
    if spec.kind is not None:
        from circuitray.data.shifts import implementation_id

        inputs["shift.kind"] = spec.kind
        inputs["shift.severity"] = spec.severity
        # what produced the pixels (e.g. frost from the reference photographs or procedural)
        inputs["shift.implementation"] = implementation_id(spec.kind)
    return inputs


def fingerprint(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()
                          ).hexdigest()[:32]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def explain_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Why two fingerprints differ, in words: 'attribution.method changed (eap-ig-inputs ->
    eap)', 'weights changed', 'images of ood changed', ..."""
    reasons = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "weights":
            reasons.append("weights changed")
        elif key.startswith("images."):
            reasons.append(f"images of {key.removeprefix('images.')} changed")
        elif key == "circuitray":
            reasons.append(f"circuitray version changed ({a} -> {b})")
        elif isinstance(a, str) and a.startswith("file:") or isinstance(b, str) and \
                b.startswith("file:"):
            reasons.append(f"{key} changed (file content)")
        else:
            reasons.append(f"{key} changed ({_short(a)} -> {_short(b)})")
    return ", ".join(reasons) or "fingerprint changed"


# ------------------------------------------------------------------ plans


@dataclass
class DomainPlan:
    """One planned domain: complete (its marker record verifies) or to compute, and why."""

    spec: DomainSpec
    complete: bool
    reason: str = ""
    fingerprint: str | None = None  # None until the weights are hashed (a new checkpoint)
    inputs: dict[str, Any] | None = None
    record: dict[str, Any] | None = None  # the marker row, when complete


@dataclass
class CheckpointPlan:
    """One checkpoint's domains, and what planning found about its inputs."""

    row: dict[str, Any]
    domains: list[DomainPlan] = field(default_factory=list)
    weights_hash: str | None = None
    listings: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # found before any model is loaded: the checkpoint fails at "data"
    error_path: str | None = None  # the file or folder the error is about
    dropped: list[str] = field(default_factory=list)  # marker domains no longer requested

    @property
    def checkpoint(self) -> str:
        return str(self.row["checkpoint_id"])

    @property
    def task(self) -> str:
        return str(self.row["task"])

    @property
    def complete(self) -> bool:
        return self.error is None and all(d.complete for d in self.domains)

    @property
    def todo(self) -> list[DomainPlan]:
        return [d for d in self.domains if not d.complete]

    def reason(self) -> str:
        """Why this checkpoint runs, summed over its domains (for the printed plan)."""
        if self.error is not None:
            return f"cannot run: {self.error_path}: {self.error.splitlines()[0]}"
        counts = Counter(d.reason for d in self.todo)
        if not counts:
            return "complete"
        if len(counts) == 1 and len(self.todo) == len(self.domains):
            return next(iter(counts))
        return "; ".join(f"{r} ({n} domain{'s' * (n > 1)})" for r, n in counts.items())


@dataclass
class JobPlan:
    checkpoints: list[CheckpointPlan]

    @property
    def todo(self) -> list[CheckpointPlan]:
        return [c for c in self.checkpoints if not c.complete]

    def summary(self) -> list[str]:
        """The lines printed before discover: counts, then checkpoints grouped by reason."""
        n_dom = sum(len(c.domains) for c in self.checkpoints)
        done = sum(d.complete for c in self.checkpoints for d in c.domains)
        lines = [f"{len(self.checkpoints)} checkpoints, {n_dom} domains: {done} domains "
                 f"complete, {len(self.todo)} checkpoints to run"]
        groups = Counter(c.reason() for c in self.todo)
        for reason, n in groups.most_common():
            lines.append(f"  {n} checkpoint{'s' * (n > 1)}: {reason}")
        dropped = sum(len(c.dropped) for c in self.checkpoints)
        if dropped:
            lines.append(f"  {dropped} earlier domain result(s) no longer requested: kept on "
                         "disk, left out of reduce")
        return lines


def read_marker(layout: JobLayout, checkpoint: str) -> dict[str, dict[str, Any]]:
    """The checkpoint's marker rows by domain: {} when there is none or it does not parse
    (recompute); a marker that cannot be read at all (permissions, the store) raises."""
    path = layout.marker(checkpoint)
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        return {}
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception:  # a damaged marker means: recompute, never trust
        return {}
    return {str(r["domain"]): r for r in rows}


def file_record(record: Mapping[str, Any], which: str) -> FileRecord:
    """The edges or outputs FileRecord stored in a marker row."""
    return FileRecord(rows=int(record[f"{which}_rows"]), size=int(record[f"{which}_size"]),
                      mtime_ns=int(record[f"{which}_mtime_ns"]),
                      checksum=str(record[f"{which}_checksum"]))


class _Listings:
    """Domain folder listings and image validation, each done once per job plan."""

    def __init__(self, cache_dir: Path | None, validate: bool):
        self.cache_dir, self.validate = cache_dir, validate
        self._seen: dict[tuple[str, str], Listing | DataError] = {}
        self._bad: dict[tuple[str, str], list[str]] = {}

    def get(self, root: str, folder: str) -> Listing:
        key = (root, folder)
        if key not in self._seen:
            try:
                self._seen[key] = list_domain(root, folder)
            except DataError as exc:
                self._seen[key] = exc
        found = self._seen[key]
        if isinstance(found, DataError):
            raise found
        return found

    def unreadable(self, root: str, folder: str) -> list[str]:
        key = (root, folder)
        if not self.validate:
            return []
        if key not in self._bad:
            self._bad[key] = validate_listing(self.get(root, folder), self.cache_dir)
        return self._bad[key]


def _marker_weights_hash(marker: Mapping[str, Mapping[str, Any]], weights: str) -> str | None:
    """The weights hash a marker recorded, if the file still has the recorded size and mtime."""
    rec = next(iter(marker.values()), None)
    stat = weights_stat(weights)
    if rec is None or stat is None or rec.get("weights_hash") is None:
        return None
    if (rec.get("weights_size"), rec.get("weights_mtime_ns")) == stat:
        return str(rec["weights_hash"])
    return None


def plan_checkpoint(row: Mapping[str, Any], cfg: JobConfig, layout: JobLayout,
                    listings: _Listings | None = None, *, hash_weights: bool = False,
                    listed: Mapping[Any, tuple[int, int]] | None = None) -> CheckpointPlan:
    """What is complete for one checkpoint and why the rest must run.

    The weights are hashed when a marker exists but the file's size or mtime moved (or when
    `hash_weights`); a checkpoint without a marker is hashed by its own task, which reads the
    file anyway. `listed`: the output's files with (size, mtime_ns) from one listing (an
    object store's LIST), else each file is stat'ed.
    """
    listings = listings or _Listings(layout.cache, validate=True)
    plan = CheckpointPlan(row=dict(row))
    try:
        specs = domain_specs(row, cfg)
        root = data_root(row, cfg)
        folders = sorted({s.source for s in specs})
        plan.listings = {f: listings.get(root, f).digest for f in folders}
        bad = [b for f in folders for b in listings.unreadable(root, f)]
    except CircuitrayError as exc:
        plan.error = getattr(exc, "reason", str(exc))
        plan.error_path = getattr(exc, "path", str(cfg.manifest))
        return plan
    if bad:
        plan.error = (f"{len(bad)} unreadable image(s): " + "; ".join(bad[:20])
                      + (" ..." if len(bad) > 20 else ""))
        plan.error_path = root
    marker = read_marker(layout, plan.checkpoint)
    weights = str(row["weights"])
    plan.weights_hash = _marker_weights_hash(marker, weights)
    if plan.weights_hash is None and (marker or hash_weights) and \
            (weights_stat(weights) is not None or _is_uri(weights)):
        try:
            plan.weights_hash = weights_hash(weights)
        except OSError:
            plan.weights_hash = None  # unreadable: the task fails at load, naming the file
    plan.dropped = sorted(set(marker) - {s.name for s in specs})
    for spec in specs:
        plan.domains.append(_plan_domain(spec, row, cfg, layout, plan, marker.get(spec.name),
                                         has_marker=bool(marker), listed=listed))
    return plan


def _plan_domain(spec: DomainSpec, row: Mapping[str, Any], cfg: JobConfig, layout: JobLayout,
                 plan: CheckpointPlan, record: Mapping[str, Any] | None, *,
                 has_marker: bool, listed: Mapping[Any, tuple[int, int]] | None = None
                 ) -> DomainPlan:
    inputs = fp = None
    if plan.weights_hash is not None:
        inputs = domain_inputs(row, spec, cfg, weights=plan.weights_hash,
                               listings=plan.listings)
        fp = fingerprint(inputs)
    dom = DomainPlan(spec, complete=False, fingerprint=fp, inputs=inputs)
    if record is None:
        dom.reason = "new domain" if has_marker else "not run yet"
        return dom
    if record.get("fingerprint") is None:
        dom.reason = "result written before fingerprints were recorded"
        return dom
    if fp is None:
        dom.reason = "weights file missing or unreadable"
        return dom
    if record["fingerprint"] != fp:
        dom.reason = explain_change(json.loads(record["inputs"]), inputs)
        return dom
    task, cid = plan.task, plan.checkpoint
    for which, path in (("edges", layout.edges_file(task, cid, spec.name)),
                        ("outputs", layout.outputs_file(task, cid, spec.name))):
        problem = check_file(path, file_record(record, which), listed)
        if problem is not None:
            dom.reason = problem
            return dom
    dom.complete, dom.record = True, dict(record)
    return dom


def plan_job(cfg: JobConfig, rows: Iterable[Mapping[str, Any]] | None = None, *,
             validate_images: bool = True) -> JobPlan:
    """The plan of every checkpoint the job covers (folder listings and validation shared)."""
    layout = JobLayout.of(cfg.output_dir)
    rows = list(manifest_rows(cfg) if rows is None else rows)
    listings = _Listings(layout.cache, validate=validate_images)
    listed = None
    if layout.remote:  # one LIST of each table folder, not a HEAD per file
        listed = storage.stat_tree(layout.edges) | storage.stat_tree(layout.outputs)
    return JobPlan([plan_checkpoint(r, cfg, layout, listings, listed=listed) for r in rows])


def read_failures(layout: JobLayout) -> pd.DataFrame:
    """The failures table (empty with FAILURE_SCHEMA columns if none)."""
    return read_parquet_or_empty(layout.failures, FAILURE_SCHEMA).to_pandas()


def domains_frame(plan: JobPlan) -> pd.DataFrame:
    """The marker records of every complete planned domain (what reduce reads)."""
    records = [d.record for c in plan.checkpoints if c.complete for d in c.domains]
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()
