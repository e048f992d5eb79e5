"""Typed configuration of the whole job (discover -> reduce -> MLflow), loaded from conf/*.yaml.

Validated by `circuitray.config.load_config` before any work starts: an unknown key or a
wrong type fails naming the dotted key. `check_job_config` adds the cross-field checks
(overlapping corruption kinds, a fraction of a GPU above 1, ...) that a type cannot express.
Paths are made absolute at load time because under `ray job submit` the driver's working
directory is a throwaway copy of the repository.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from circuitray.config import load_config
from circuitray.errors import ConfigError


@dataclass
class DataConfig:
    """Which domains every checkpoint is run on, and how many examples each gets."""

    root: str | None = None  # data root for manifest rows without a data_root column
    # CSV/Parquet of path,label,domain rows, instead of folders (circuitray/data/image_list.py)
    image_list: str | None = None
    id_domain: str | None = None  # overrides the manifest's id_domain (reference circuit)
    ood_domains: list[str] = field(default_factory=list)  # empty: the manifest's ood_domain
    limit: int | None = 256  # examples per domain for the outputs table (None: all)
    attribution_limit: int | None = 64  # examples per domain for circuits (None: = limit)
    batch_size: int = 32
    # Post-deployment domains: corruptions of the ID split (CSS vs accuracy, alarm targets).
    shift_kinds: list[str] = field(
        default_factory=lambda: ["gaussian_noise", "defocus_blur", "contrast", "jpeg_compression"])
    shift_severities: list[int] = field(default_factory=lambda: [1, 3, 5])
    # Proxy domains for the alarm's threshold: other corruption kinds of the ID split.
    proxy_kinds: list[str] = field(default_factory=lambda: ["shot_noise", "brightness"])
    proxy_severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: int = 0
    # Labels and normalization when neither the checkpoint nor the manifest says (see
    # circuitray/data/classes.py and preprocess.py for the order of sources).
    class_map: str | None = None  # text file: one class name per line, in label order
    mean: list[float] | None = None  # 3 floats for images in [0, 1]
    std: list[float] | None = None


@dataclass
class AttributionConfig:
    """Arguments of `circuitray.attribute` (DESIGN §2), field for keyword.

    The allowed values are `circuitray.attribution`'s METHODS, DATASET_ABLATIONS, METRICS
    and DTYPES, checked by `check_job_config`: one source for the API and the job, and this
    module stays importable without torch. 'corrupted' is not a job ablation: it needs a
    paired corrupted image per example.
    """

    method: str = "eap-ig-inputs"
    ablation: str = "mean-positional"
    metric: str = "kl"
    steps: int = 5
    dtype: str = "fp32"
    device: str | None = None  # None: cuda when a GPU share is requested, else cpu


@dataclass
class ResourcesConfig:
    """Ray resources per discover task; fractional GPUs pack small models on one device."""

    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else local Ray
    local_num_cpus: int | None = None  # CPUs of an embedded local Ray (None: all)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3  # re-runs after a worker/node dies (not after our own errors)
    torch_threads: int = 1


@dataclass
class TrackingConfig:
    """MLflow: a local sqlite store in the output folder unless `uri` names a server."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "circuitray"
    run_name: str | None = None
    git_commit: str | None = None  # else $CIRCUITRAY_GIT_COMMIT, else `git rev-parse HEAD`


@dataclass
class ReduceConfig:
    """What the reduce stage computes and draws."""

    taus: list[float] = field(default_factory=lambda: [0.3])
    targets: list[Literal["out", "deep", "global"]] = field(
        default_factory=lambda: ["out", "deep", "global"])
    css_variants: list[str] = field(default_factory=lambda: ["srcc", "pearson", "cosine", "l2"])
    top_n: int = 200
    deltas: list[float] = field(default_factory=lambda: [0.8, 0.85, 0.9])
    n_boot: int = 1000
    seed: int = 0
    group_column: str | None = None  # manifest column for within-group correlations
    figures: bool = True
    # Python modules imported before reduce: each registers its metrics (registry.register)
    plugins: list[str] = field(default_factory=list)


@dataclass
class JobConfig:
    """The whole job: a manifest of checkpoints in, Parquet tables + MLflow runs out."""

    manifest: str
    output_dir: str = "runs/job"
    name: str = "circuitray"
    checkpoints: list[str] | None = None  # subset of checkpoint_ids (None: all rows)
    intermediate: bool = True  # also discover non-final checkpoints (ID+OOD only)
    stages: list[Literal["discover", "reduce"]] = field(
        default_factory=lambda: ["discover", "reduce"])
    data: DataConfig = field(default_factory=DataConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)


def _positive(value: float | int | None, key: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': must be {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value!r}")


def check_job_config(cfg: JobConfig) -> JobConfig:
    """Cross-field checks a type annotation cannot express; raises ConfigError naming the key."""
    d, r, a = cfg.data, cfg.resources, cfg.attribution
    _positive(d.limit, "data.limit")
    _positive(d.attribution_limit, "data.attribution_limit")
    _positive(d.batch_size, "data.batch_size")
    _positive(a.steps, "attribution.steps")
    _positive(r.num_cpus, "resources.num_cpus", allow_zero=True)
    _positive(r.num_gpus, "resources.num_gpus", allow_zero=True)
    _positive(r.max_retries, "resources.max_retries", allow_zero=True)
    _positive(r.torch_threads, "resources.torch_threads")
    _positive(cfg.reduce.top_n, "reduce.top_n")
    _positive(cfg.reduce.n_boot, "reduce.n_boot")
    if r.num_gpus > 1 and r.num_gpus != int(r.num_gpus):
        raise ConfigError(f"config key 'resources.num_gpus': a share above 1 must be whole, "
                          f"got {r.num_gpus}")
    for i, s in enumerate(d.shift_severities):
        if not 1 <= s <= 5:
            raise ConfigError(f"config key 'data.shift_severities[{i}]': severity {s} not in 1..5")
    for i, s in enumerate(d.proxy_severities):
        if not 1 <= s <= 5:
            raise ConfigError(f"config key 'data.proxy_severities[{i}]': severity {s} not in 1..5")
    both = sorted(set(d.shift_kinds) & set(d.proxy_kinds))
    if both:
        raise ConfigError(f"config key 'data.proxy_kinds': {both} also in data.shift_kinds; the "
                          "alarm must be calibrated on corruptions it is not tested on")
    from circuitray.data.shifts import CORRUPTIONS  # torch-backed, but names only

    for key, kinds in (("data.shift_kinds", d.shift_kinds), ("data.proxy_kinds", d.proxy_kinds)):
        for i, kind in enumerate(kinds):
            if kind not in CORRUPTIONS:
                raise ConfigError(f"config key '{key}[{i}]': unknown corruption '{kind}'; "
                                  f"known: {list(CORRUPTIONS)}")
    if d.image_list is not None:
        from circuitray.data.image_list import LIST_SUFFIXES, is_image_list

        if not is_image_list(d.image_list):
            raise ConfigError(f"config key 'data.image_list': {d.image_list!r} is not a "
                              f"{'/'.join(sorted(LIST_SUFFIXES))} file")
    if (d.mean is None) != (d.std is None):
        raise ConfigError(f"config key 'data.{'std' if d.std is None else 'mean'}': data.mean "
                          "and data.std go together; give both or neither")
    from circuitray.data.preprocess import norm_values_problem

    for key in ("mean", "std"):
        values = getattr(d, key)
        problem = norm_values_problem(key, values) if values is not None else None
        if problem:
            raise ConfigError(f"config key 'data.{key}': {problem}")
    for i, tau in enumerate(cfg.reduce.taus):
        if not 0 < tau <= 0.5:
            raise ConfigError(f"config key 'reduce.taus[{i}]': tau {tau} not in (0, 0.5]")
    for i, delta in enumerate(cfg.reduce.deltas):
        if not 0 < delta < 1:
            raise ConfigError(f"config key 'reduce.deltas[{i}]': {delta} not in (0, 1)")
    from circuitray import attribution  # torch-backed, but names only: one source of values

    if a.ablation == "corrupted":
        raise ConfigError("config key 'attribution.ablation': 'corrupted' needs paired corrupted "
                          "images for every example, which a job does not have; use one of "
                          f"{list(attribution.DATASET_ABLATIONS)} (or circuitray.attribute "
                          "with corrupted_batches)")
    for key, allowed in (("method", attribution.METHODS),
                         ("ablation", attribution.DATASET_ABLATIONS),
                         ("metric", attribution.METRICS), ("dtype", attribution.DTYPES)):
        if getattr(a, key) not in allowed:
            raise ConfigError(f"config key 'attribution.{key}': {getattr(a, key)!r} is not one "
                              f"of {list(allowed)}")
    return cfg


def _absolute(path: str | None, base: Path) -> str | None:
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _output_dir(path: str, base: Path) -> str:
    """The absolute local output folder, or an object-store URI (circuitray.storage.SCHEMES:
    s3://, gs://, abfs://, ...) kept as written; another scheme is refused, since it would
    silently become the relative local folder `ftp:/host/run`."""
    from circuitray.storage import SCHEMES, uri_scheme

    scheme = uri_scheme(path)
    if scheme is not None:
        if scheme not in SCHEMES:
            raise ConfigError(f"config key 'output_dir': {path!r} is a '{scheme}://' URI; "
                              f"circuitray writes to a local folder or to {list(SCHEMES)}")
        return path.rstrip("/")
    return str(_absolute(path.removeprefix("file://"), base))


# The object-store schemes (storage.SCHEMES) MLflow has an artifact repository for; it knows
# the stores pyarrow also calls `gcs://` and `abfs://` only as `gs://` and `abfss://`.
MLFLOW_ARTIFACT_SCHEMES = ("s3", "gs", "abfss", "hdfs", "viewfs")
_MLFLOW_SPELLING = {"gcs": "gs", "abfs": "abfss"}


def check_tracking_target(output_dir: str, tracking: bool) -> None:
    """MLflow logs a job's artifacts to `<output_dir>/mlartifacts`, in the store itself for
    an object-store output: refuse the URI schemes MLflow has no artifact repository for
    (`gcs://`, `abfs://`: MLflow knows the same stores as `gs://`, `abfss://`)."""
    from circuitray.storage import uri_scheme

    scheme = uri_scheme(output_dir)
    if not tracking or scheme is None or scheme in MLFLOW_ARTIFACT_SCHEMES:
        return
    fix = _MLFLOW_SPELLING.get(scheme)
    hint = (f"write output_dir as '{fix}://{output_dir.split('://', 1)[1]}' (the same store "
            "for pyarrow)" if fix else "set tracking.enabled=false")
    raise ConfigError(
        f"config key 'tracking.enabled': output_dir {output_dir!r} is a '{scheme}://' URI, "
        f"where MLflow cannot log the job's artifacts (it knows {list(MLFLOW_ARTIFACT_SCHEMES)}"
        f"); {hint}")


def load_job_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                    base: str | Path | None = None) -> JobConfig:
    """Load, validate and absolutize a job config; relative paths resolve against `base` (cwd)."""
    cfg = load_config(JobConfig, path, overrides)
    base = Path(base or Path.cwd())
    try:
        check_job_config(cfg)
        output_dir = _output_dir(cfg.output_dir, base)
        check_tracking_target(output_dir, cfg.tracking.enabled)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from exc
    data = dataclasses.replace(cfg.data, root=_absolute(cfg.data.root, base),
                               class_map=_absolute(cfg.data.class_map, base),
                               image_list=_absolute(cfg.data.image_list, base))
    return dataclasses.replace(cfg, manifest=_absolute(cfg.manifest, base),
                               output_dir=output_dir, data=data)
