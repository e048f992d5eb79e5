"""Scan checkpoints on disk into a manifest: `circuitray manifest PATH... -o manifest.csv`.

Three layouts are recognised, folders searched recursively:

- a timm training run (what timm's `train.py` / `timm.utils.CheckpointSaver` writes):
  `checkpoint-<epoch>.pth.tar`, `milestone-<n>.pth.tar`, `last.pth.tar`, `model_best.pth.tar`,
  `args.yaml`, `summary.csv`. One row per distinct epoch, all with the run as `parent_id`;
  `final` marks the last epoch (or `model_best`'s, with final="best"). Architecture, kwargs
  and hyperparameters come from the checkpoint's `args` (else `args.yaml`), the logged
  accuracy from `summary.csv`. Recovery and `tmp` files (mid-epoch states) are skipped.
- a hub-layout folder (a timm / Hugging Face hub download): `config.json` (`architecture`,
  `num_classes`, `model_args`, `pretrained_cfg`, `label_names`) beside `model.safetensors`
  or `pytorch_model.bin`; or `hf-hub:<org>/<name>` resolved through the local HF cache.
- plain weights files (`*.safetensors`, `*.pth`, `*.pt`, `*.bin`) with the architecture
  given once (`arch`, `arch_kwargs`).

Nothing executes code: torch files are read with `weights_only` (tensors memory-mapped, so
the optimizer state is never read), safetensors by their header. Every checkpoint's tensor
names and shapes are checked against its architecture (built on the meta device, no memory);
what cannot be read or does not fit is listed with the reason and the scan goes on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from circuitray.checkpoint_meta import NotPlainMetadata, read_metadata
from circuitray.errors import CircuitrayError, DataError
from circuitray.models import (
    HF_HUB_PREFIX,
    HUB_WEIGHTS_FILES,
    NORM_KEYS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    parse_hub_weights,
    read_checkpoint_preprocessing,
    read_error_reason,
    read_manifest,
    read_training_checkpoint,
    read_weights_shapes,
    resolve_hub_weights,
    shape_kwargs,
    shape_problems,
    state_dict_in,
)

Final = Literal["last", "best"]

RUN_CHECKPOINT = re.compile(r"^(checkpoint|milestone)-(\d+)\.pth\.tar$")
RUN_NAMED = ("last.pth.tar", "model_best.pth.tar")
RUN_SKIPPED = re.compile(r"^(recovery-.*|tmp)\.pth\.tar$")  # mid-epoch states, not models
PLAIN_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
EMA_KEY = "state_dict_ema"
# train.py arguments recorded as hyperparameter columns (scalars only; None is left out).
HYPERPARAMETER_ARGS = (
    "lr", "weight_decay", "epochs", "opt", "momentum", "batch_size", "grad_accum_steps",
    "sched", "warmup_epochs", "warmup_lr", "min_lr", "layer_decay", "clip_grad", "mixup",
    "cutmix", "mixup_prob", "smoothing", "drop", "drop_path", "aa", "reprob", "color_jitter",
    "hflip", "model_ema", "model_ema_decay", "seed", "dataset", "amp")
# train.py arguments it passes to timm.create_model, by their create_model name.
ARGS_TO_ARCH = {"drop": "drop_rate", "drop_path": "drop_path_rate", "in_chans": "in_chans",
                "gp": "global_pool"}
# Which file of a run stands for an epoch when several hold it (they are hard links).
_RUN_FILE_RANK = {"checkpoint": 0, "milestone": 1, "last": 2, "model_best": 3}


@dataclass
class RunSummary:
    """One source the scan found: a training run, a hub folder or a plain file."""

    name: str
    kind: str  # timm-run | hub | file
    path: str
    checkpoints: int = 0
    note: str = ""


@dataclass
class ScanResult:
    """The manifest rows, what could not be used (path, reason), and the sources found."""

    rows: pd.DataFrame
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Checkpoints per run (or hub folder, or file), by name."""
        return {r.name: r.checkpoints for r in self.runs}


@dataclass(frozen=True)
class _Options:
    task: str
    columns: dict[str, str]  # data_root, id_domain, ood_domain when given
    ema: bool
    final: Final
    arch: str | None
    arch_kwargs: dict[str, Any]


@dataclass
class _Source:
    kind: str  # timm-run | hub | file | hf-hub
    path: Path
    files: list[str] = field(default_factory=list)  # the run's checkpoint files
    hub_id: str | None = None
    name: str = ""


class _Unusable(Exception):
    """A checkpoint or source that cannot become a manifest row (the message says why)."""


# ------------------------------------------------------------------ public API


def scan(paths: Sequence[str | os.PathLike], *, task: str | None = None,
         data_root: str | os.PathLike | None = None, id_domain: str | None = None,
         ood_domain: str | None = None, ema: bool = False, final: Final = "last",
         arch: str | None = None, arch_kwargs: Mapping[str, Any] | str | None = None
         ) -> ScanResult:
    """Find the checkpoints under `paths` (folders searched recursively, files, or
    `hf-hub:<org>/<name>`) and describe each as a manifest row.

    `task` names the task of every row (default: the data root's folder name, else
    "default"); `data_root`, `id_domain`, `ood_domain` fill the columns of the same name;
    `ema` loads timm's EMA weights (`state_dict_ema`) of training checkpoints; `final` picks
    each run's final checkpoint: its last epoch or its `model_best`; `arch`/`arch_kwargs`
    describe plain weights files (and anything else that does not name its architecture).
    """
    if final not in ("last", "best"):
        raise ValueError(f"final must be 'last' or 'best', got {final!r}")
    root = str(Path(data_root).resolve()) if data_root else None
    columns = {k: v for k, v in (("data_root", root), ("id_domain", id_domain),
                                 ("ood_domain", ood_domain)) if v}
    kwargs = _parse_arch_kwargs(arch_kwargs)
    opts = _Options(task or (Path(root).name if root else "default"), columns, ema, final,
                    arch, kwargs)
    unreadable: list[tuple[str, str]] = []
    sources = _find_sources(paths, unreadable)
    _name_sources(sources)
    rows: list[dict[str, Any]] = []
    runs: list[RunSummary] = []
    for src in sources:
        summary = RunSummary(src.name, "hub" if src.kind == "hf-hub" else src.kind,
                             src.hub_id or str(src.path))
        try:
            found = _SCANNERS[src.kind](src, opts, unreadable, summary)
        except Exception as exc:  # unreadable, refused, misfit: listed, the scan goes on
            unreadable.append((src.hub_id or str(src.path), read_error_reason(exc)))
            continue
        summary.checkpoints = len(found)
        rows += [{"checkpoint_id": r.pop("checkpoint_id"), "task": opts.task, **opts.columns,
                  **r} for r in found]
        runs.append(summary)
    return ScanResult(_frame(rows), unreadable, runs)


def write_manifest(result: ScanResult, path: str | os.PathLike) -> Path:
    """Write the rows as CSV, Parquet or YAML (by suffix), then read them back with
    `read_manifest`, so a manifest the job cannot read is never left behind."""
    path = Path(path)
    if result.rows.empty:
        raise DataError(path, "no usable checkpoint to write")
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same folder: same relative paths
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".csv":
            result.rows.to_csv(tmp, index=False)
        elif suffix in (".parquet", ".pq"):
            result.rows.to_parquet(tmp, index=False)
        elif suffix in (".yaml", ".yml"):
            import yaml

            records = [{k: v for k, v in r.items() if not _missing(v)}
                       for r in result.rows.to_dict(orient="records")]
            tmp.write_text(yaml.safe_dump({"checkpoints": records}, sort_keys=False))
        else:
            raise DataError(path, f"unknown manifest format '{suffix}' "
                                  "(use .csv, .parquet, .yaml)")
        read_manifest(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def format_summary(result: ScanResult) -> str:
    """What the scan found, per run, and what it could not read and why."""
    n = len(result.rows)
    lines = [f"found {len(result.runs)} source(s), {n} checkpoint(s):"]
    for r in result.runs:
        note = f" ({r.note})" if r.note else ""
        lines.append(f"  {r.kind:8s} {r.name}: {r.checkpoints} checkpoint(s){note}  [{r.path}]")
    if result.unreadable:
        lines.append(f"could not use {len(result.unreadable)}:")
        lines += [f"  {path}: {reason}" for path, reason in result.unreadable]
    return "\n".join(lines)


# ------------------------------------------------------------------ finding sources


def _find_sources(paths: Sequence[str | os.PathLike], unreadable: list[tuple[str, str]]
                  ) -> list[_Source]:
    sources: list[_Source] = []
    for raw in paths:
        text = str(raw)
        if text.startswith(HF_HUB_PREFIX):
            try:
                parse_hub_weights(text)
            except ValueError as exc:
                unreadable.append((text, str(exc)))
            else:
                sources.append(_Source("hf-hub", Path(text), hub_id=text))
            continue
        path = Path(text).resolve()
        before = len(sources), len(unreadable)
        if path.is_file():
            sources += _classify_file(path, unreadable)
        elif path.is_dir():
            for folder, files in _walk(path):
                sources += _classify_folder(folder, files)
        else:
            unreadable.append((text, "no such file or folder"))
            continue
        if (len(sources), len(unreadable)) == before:
            unreadable.append((text, "no checkpoints found (timm run files, a hub config.json "
                                     f"with {' or '.join(HUB_WEIGHTS_FILES)}, or "
                                     f"{', '.join('*' + s for s in PLAIN_SUFFIXES)} files)"))
    return sources


def _walk(root: Path) -> Iterable[tuple[Path, list[str]]]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(f for f in files if not f.startswith("."))


def _classify_file(path: Path, unreadable: list[tuple[str, str]]) -> list[_Source]:
    name = path.name
    if name.endswith(".pth.tar"):
        return [_Source("timm-run", path.parent, files=[name])]
    if path.suffix in PLAIN_SUFFIXES:
        return [_Source("file", path)]
    unreadable.append((str(path), f"not a weights file (expected .pth.tar or "
                                  f"{', '.join(PLAIN_SUFFIXES)})"))
    return []


def _classify_folder(folder: Path, files: list[str]) -> list[_Source]:
    if "config.json" in files and any(w in files for w in HUB_WEIGHTS_FILES):
        return [_Source("hub", folder)]
    run_files = [f for f in files if RUN_CHECKPOINT.match(f) or f in RUN_NAMED]
    run = [_Source("timm-run", folder, files=run_files)] if run_files else []
    return run + [_Source("file", folder / f) for f in files
                  if Path(f).suffix in PLAIN_SUFFIXES and not f.endswith(".pth.tar")]


def _name_sources(sources: list[_Source]) -> None:
    """Checkpoint-id-safe names, unique: the folder's (or file's) name, then its parent's."""
    def base(src: _Source, depth: int) -> str:
        if src.hub_id:
            org, name = parse_hub_weights(src.hub_id)[0].split("/")
            parts = [org, name] if depth else [name]
        else:
            stem = src.path.name.removesuffix(src.path.suffix) if src.kind == "file" \
                else src.path.name
            parts = [p.name for p in list(src.path.parents)[:depth]][::-1] + [stem]
        return _safe("-".join(p for p in parts if p))

    for src in sources:
        src.name = base(src, 0)
    for depth in (1, 2, 3):
        names = [s.name for s in sources]
        clashes = {n for n in names if names.count(n) > 1}
        for src in sources:
            if src.name in clashes:
                src.name = base(src, depth)
    seen: dict[str, int] = {}
    for src in sources:  # still equal (same folder names all the way up): number them
        seen[src.name] = seen.get(src.name, 0) + 1
        if seen[src.name] > 1:
            src.name = f"{src.name}-{seen[src.name]}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "checkpoint"


# ------------------------------------------------------------------ timm training runs


@dataclass
class _TrainFile:
    path: Path
    kind: str  # checkpoint | milestone | last | model_best
    epoch: int | None
    args: dict[str, Any] | None
    shapes: dict[str, tuple[int, ...]]


def _read_train_file(path: Path, key: str | None) -> _TrainFile:
    """A CheckpointSaver file's epoch, args and tensor shapes (nothing else is read)."""
    try:  # shapes and metadata from data.pkl alone; anything unusual: the safe full load
        obj = read_metadata(path)
    except NotPlainMetadata:
        obj = read_training_checkpoint(str(path))
    if not isinstance(obj, Mapping):
        raise _Unusable("not a training checkpoint (no dict at the top level)")
    if key is not None and key not in obj:
        have = sorted(k for k, v in obj.items() if isinstance(v, Mapping) and k.startswith("state"))
        raise _Unusable(f"no '{key}' in the checkpoint (EMA weights were not saved; it has "
                        f"{have}); drop --ema to use the model's own weights")
    shapes = {k: tuple(v.shape) for k, v in state_dict_in(obj, key).items()}
    args = obj.get("args")
    if args is not None and not isinstance(args, Mapping):
        args = vars(args) if hasattr(args, "__dict__") else None
    epoch = obj.get("epoch")
    match = RUN_CHECKPOINT.match(path.name)
    kind = match.group(1) if match else path.name.removesuffix(".pth.tar")
    return _TrainFile(path, kind, int(epoch) if isinstance(epoch, int) else None,
                      dict(args) if args else None, shapes)


def _scan_run(src: _Source, opts: _Options, unreadable: list[tuple[str, str]],
              summary: RunSummary) -> list[dict[str, Any]]:
    key = EMA_KEY if opts.ema else None
    read: list[_TrainFile] = []
    for name in sorted(src.files):
        try:
            read.append(_read_train_file(src.path / name, key))
        except _Unusable as exc:
            unreadable.append((str(src.path / name), str(exc)))
        except Exception as exc:  # refused pickle, truncated or foreign file: list it
            reason = read_error_reason(exc)
            if not reason.startswith("refused"):
                reason = f"unreadable (truncated, or not written by torch.save): {reason}"
            unreadable.append((str(src.path / name), reason))
    if not read:
        raise _Unusable("none of its checkpoints could be read")
    args = next((f.args for f in read if f.args), None) or _args_yaml(src.path, unreadable)
    by_epoch: dict[int, _TrainFile] = {}
    for f in sorted(read, key=lambda f: _RUN_FILE_RANK.get(f.kind, 9)):
        if f.epoch is None:
            unreadable.append((str(f.path), "the checkpoint has no 'epoch'"))
        else:
            by_epoch.setdefault(f.epoch, f)
    if not by_epoch:
        raise _Unusable("no checkpoint of the run says its epoch")
    final_epoch = max(by_epoch)
    best = next((f.epoch for f in read if f.kind == "model_best" and f.epoch is not None), None)
    if opts.final == "best":
        if best is None:
            summary.note = "no model_best.pth.tar: the last epoch is final"
        else:
            final_epoch = best
    accuracy = _logged_accuracy(src.path / "summary.csv", unreadable)
    if (args or {}).get("model"):
        arch, base_kwargs = str(args["model"]), _arch_kwargs_from_args(args)
    elif opts.arch:  # not written by train.py: described like a plain file
        arch, base_kwargs = opts.arch, dict(opts.arch_kwargs)
    else:
        raise _Unusable("the checkpoints have no args.model and there is no args.yaml; "
                        "give --arch")
    size = _args_input_size(args or {})
    hyper = _hyperparameters(args or {})
    rows = []
    for epoch, f in sorted(by_epoch.items()):
        try:
            num_classes = _num_classes(f.shapes, (args or {}).get("num_classes"), base_kwargs)
            kwargs = _fit_kwargs(arch, base_kwargs, num_classes, f.shapes, size)
        except (_Unusable, CircuitrayError, ValueError) as exc:
            unreadable.append((str(f.path), read_error_reason(exc)))
            continue
        is_final = epoch == final_epoch
        cid = src.name + ("-ema" if opts.ema else "")
        rows.append({
            "checkpoint_id": cid if is_final else f"{cid}.e{epoch}",
            "arch": arch, "arch_kwargs": kwargs, "weights": str(f.path),
            "num_classes": num_classes, "weights_key": key, "epoch": epoch, "final": is_final,
            "parent_id": cid, "checkpoint_kind": "timm-run",
            **_run_preprocessing(arch, kwargs, num_classes, args or {}),
            "logged_id_acc": accuracy.get(epoch), **hyper})
    notes = [f"epochs {min(by_epoch)}-{max(by_epoch)}", f"final epoch {final_epoch}"]
    if opts.ema:
        notes.append("EMA weights")
    if rows and not any(r["final"] for r in rows):
        notes.append(f"epoch {final_epoch} unusable: no final checkpoint")
    summary.note = ", ".join(notes + ([summary.note] if summary.note else []))
    return rows


def _args_yaml(folder: Path, unreadable: list[tuple[str, str]]) -> dict[str, Any] | None:
    path = folder / "args.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        unreadable.append((str(path), read_error_reason(exc)))
        return None
    return data if isinstance(data, dict) else None


def _logged_accuracy(path: Path, unreadable: list[tuple[str, str]]) -> dict[int, float]:
    """epoch -> the run's own validation top-1 (timm's summary.csv `eval_top1`, in %) / 100."""
    if not path.is_file():
        return {}
    try:
        df = pd.read_csv(path)
        if not {"epoch", "eval_top1"} <= set(df.columns):
            raise ValueError(f"no epoch/eval_top1 columns (has {list(df.columns)})")
        return {int(e): float(a) / 100.0 for e, a in zip(df["epoch"], df["eval_top1"],
                                                         strict=True) if not _missing(a)}
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        unreadable.append((str(path), f"logged accuracy not read: {read_error_reason(exc)}"))
        return {}


def _arch_kwargs_from_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """What train.py passes to timm.create_model: --drop, --drop-path, --in-chans, --gp and
    every --model-kwargs entry (the only way train.py sets img_size, patch_size, ...)."""
    kwargs = {k: args[a] for a, k in ARGS_TO_ARCH.items() if args.get(a) is not None}
    model_kwargs = args.get("model_kwargs") or {}
    if not isinstance(model_kwargs, Mapping):
        raise _Unusable(f"args.model_kwargs is not a mapping: {model_kwargs!r}")
    return {**kwargs, **model_kwargs}


def _args_input_size(args: Mapping[str, Any]) -> int | None:
    size = args.get("img_size") or (args.get("input_size") or [None])[-1]
    return int(size) if size else None


def _hyperparameters(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in HYPERPARAMETER_ARGS
            if isinstance(args.get(k), (bool, int, float, str)) and not _missing(args[k])}


def _run_preprocessing(arch: str, kwargs: Mapping[str, Any], num_classes: int,
                       args: Mapping[str, Any]) -> dict[str, Any]:
    """The eval preprocessing train.py used: `resolve_data_config(args, model)` (its --mean,
    --std, --img-size, --crop-pct, ..., else the architecture's pretrained config)."""
    from timm.data import resolve_data_config

    given = {k: args[k] for k in ("mean", "std", "input_size", "img_size", "interpolation",
                                  "crop_pct", "in_chans") if args.get(k) not in (None, "")}
    cfg = resolve_data_config(given, pretrained_cfg=_model_info(
        arch, json.dumps(kwargs, sort_keys=True), num_classes)[1])
    return {k: cfg[k] for k in NORM_KEYS if cfg.get(k) is not None}


# ------------------------------------------------------------------ hub folders and files


def _scan_hub(src: _Source, opts: _Options, unreadable: list[tuple[str, str]],
              summary: RunSummary) -> list[dict[str, Any]]:
    if src.kind == "hf-hub":
        weights_file = Path(resolve_hub_weights(str(src.hub_id)))
        folder, entry = weights_file.parent, str(src.hub_id)
    else:
        folder = src.path
        weights_file = next(folder / w for w in HUB_WEIGHTS_FILES if (folder / w).is_file())
        entry = str(weights_file)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise _Unusable(f"{config_path}: {read_error_reason(exc)}") from exc
    if not isinstance(config, Mapping) or not config.get("architecture"):
        raise _Unusable(f"{config_path} names no 'architecture' (a timm hub config does; a "
                        "transformers config is not a timm model)")
    arch = str(config["architecture"])
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"),
                                                            Mapping) else {}
    shapes = read_weights_shapes(str(weights_file))
    num_classes = _num_classes(shapes, config.get("num_classes") or pretrained.get("num_classes"),
                               {})
    model_args = config.get("model_args") or {}
    size = pretrained.get("input_size")
    kwargs = _fit_kwargs(arch, model_args, num_classes, shapes,
                         int(size[-1]) if size else None)
    row = {"checkpoint_id": src.name, "arch": arch, "arch_kwargs": kwargs, "weights": entry,
           "num_classes": num_classes, "final": True, "checkpoint_kind": "hub",
           **_checkpoint_preprocessing(str(weights_file))}
    labels = config.get("label_names")
    if isinstance(labels, list) and len(labels) == num_classes and \
            all(isinstance(x, str) for x in labels):
        row["classes"] = labels
    if opts.ema:
        summary.note = "--ema does not apply (one set of weights)"
    return [row]


def _scan_file(src: _Source, opts: _Options, unreadable: list[tuple[str, str]],
               summary: RunSummary) -> list[dict[str, Any]]:
    path = str(src.path)
    shapes = read_weights_shapes(path)
    if not opts.arch:
        raise _Unusable("a plain weights file does not name its architecture: give --arch "
                        "(and --arch-kwargs)")
    num_classes = _num_classes(shapes, None, opts.arch_kwargs)
    kwargs = _fit_kwargs(opts.arch, opts.arch_kwargs, num_classes, shapes, None)
    return [{"checkpoint_id": src.name, "arch": opts.arch, "arch_kwargs": kwargs,
             "weights": path, "num_classes": num_classes, "final": True, "checkpoint_kind": "file",
             **_checkpoint_preprocessing(path)}]


def _checkpoint_preprocessing(weights: str) -> dict[str, Any]:
    """What the checkpoint itself says (config.json, safetensors metadata): the job reads
    the same first, so the manifest columns and the job agree."""
    found = read_checkpoint_preprocessing(weights)
    return dict(found[0]) if found else {}


_SCANNERS = {"timm-run": _scan_run, "hub": _scan_hub, "hf-hub": _scan_hub, "file": _scan_file}


# ------------------------------------------------------------------ architecture checks


@functools.lru_cache(maxsize=64)
def _model_info(arch: str, kwargs_json: str, num_classes: int
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """(tensor shapes, pretrained_cfg) of an architecture, built on the meta device."""
    import torch

    from circuitray.models import build_model

    with torch.device("meta"):
        model = build_model(arch, json.loads(kwargs_json), num_classes)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, dict(getattr(model, "pretrained_cfg", None) or {})


def _fit_kwargs(arch: str, kwargs: Mapping[str, Any], num_classes: int,
                shapes: Mapping[str, tuple[int, ...]], input_size: int | None) -> dict[str, Any]:
    """`kwargs` (allowlisted) if the weights fit the architecture built with them; else with
    the run's input size as img_size (train.py's --img-size when --model-kwargs lacks it)."""
    kwargs = shape_kwargs(arch, dict(kwargs))
    tries = [kwargs]
    if input_size and "img_size" not in kwargs:
        tries.append({**kwargs, "img_size": input_size})
    problems: list[str] = []
    for candidate in tries:
        try:
            expected = _model_info(arch, json.dumps(candidate, sort_keys=True), num_classes)[0]
        except Exception as exc:  # unknown architecture, bad kwargs
            raise _Unusable(f"cannot build architecture '{arch}' with {candidate}: "
                            f"{read_error_reason(exc)}") from exc
        found = shape_problems(expected, shapes)
        if not found:
            return candidate
        problems = problems or found
    raise _Unusable(f"weights do not fit '{arch}' with {kwargs}: {'; '.join(problems)}")


def _num_classes(shapes: Mapping[str, tuple[int, ...]], stated: Any,
                 kwargs: Mapping[str, Any]) -> int:
    """The classifier's width (head.weight), else what the config/args/kwargs say."""
    for name in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if name in shapes and len(shapes[name]) == 2:
            return int(shapes[name][0])
    value = stated if stated is not None else kwargs.get("num_classes")
    if value is None:
        raise _Unusable("cannot tell the number of classes (no head.weight; give num_classes "
                        "in --arch-kwargs)")
    return int(value)


# ------------------------------------------------------------------ rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    first = [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, "parent_id", "checkpoint_kind", *NORM_KEYS,
             "classes", "logged_id_acc"]
    if not rows:
        return pd.DataFrame(columns=list(REQUIRED_COLUMNS))
    df = pd.DataFrame(rows)
    for col in ("arch_kwargs", "classes", *NORM_KEYS):
        if col in df.columns:
            df[col] = [json.dumps(_plain(v)) if isinstance(v, (list, tuple, Mapping)) else v
                       for v in df[col]]  # lists and dicts as JSON text, like read_manifest
    df = df.dropna(axis=1, how="all")
    for col in df.columns:  # integers stay integers where some rows have none (hub, files)
        values = [r[col] for r in rows if not _missing(r.get(col))]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df[col] = df[col].astype("Int64")
    order = [c for c in first if c in df.columns] + [c for c in df.columns if c not in first]
    return df[order].reset_index(drop=True)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _parse_arch_kwargs(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError("--arch-kwargs", f"not JSON: {value!r} ({exc})") from exc
    if not isinstance(parsed, dict):
        raise DataError("--arch-kwargs", f"must be a JSON object, got {value!r}")
    return parsed
