"""Checkpoint manifests and safe checkpoint loading.

A user's zoo is a manifest (CSV, Parquet or YAML) of checkpoints: id, timm architecture and
kwargs, weights path, number of classes, task, and any hyperparameter columns. Loading never
executes pickled code: `.safetensors` is read as raw tensors, and `.pt`/`.pth`/`.pth.tar` only
through `torch.load(weights_only=True)` (plus `argparse.Namespace`, which timm's train.py
stores as `args`). Every tensor's name and shape is checked against the
architecture before loading, so a bad checkpoint is reported by id and path, not as a
mysterious shape error deep inside attribution.

`weights` may also be `hf-hub:<org>/<name>[@revision]`: the repository's `model.safetensors`
(else `pytorch_model.bin`) in the local Hugging Face cache. It is downloaded only when
HF_HUB_OFFLINE is not set; offline, a repository that is not cached is an error saying so.
A manifest column `weights_key` names the state dict to load from a training checkpoint
(`state_dict_ema` for timm's EMA weights); empty means the model's own (`state_dict`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from circuitray.errors import CheckpointError, ConfigError, DataError

REQUIRED_COLUMNS = ("checkpoint_id", "task", "arch", "arch_kwargs", "weights", "num_classes")
OPTIONAL_COLUMNS = ("data_root", "id_domain", "ood_domain", "id_acc", "ood_acc", "epoch", "final",
                    "weights_key")
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
# Where the model's own tensors sit in a torch checkpoint, tried in order when no weights_key.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
_WEIGHTS_KEY = re.compile(r"[A-Za-z0-9_.-]+")
HF_HUB_PREFIX = "hf-hub:"
# What a timm hub repository holds its weights in, preferred first.
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
# What a training checkpoint may say about its eval preprocessing (timm's data config keys).
NORM_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct")


# The architecture-shape arguments of timm's VisionTransformer a manifest may set. Anything
# else would reach timm.create_model's loaders (checkpoint_path, pretrained_cfg_overlay naming
# a file or URL, cache_dir), swap in code (norm_layer, block_fn, ...) or place the model
# (device, dtype): a manifest row may describe a shape, never where weights or code come from.
ARCH_KWARGS_ALLOWED = frozenset({
    "img_size", "patch_size", "in_chans", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias",
    "init_values", "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm",
    "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad",
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate",
})
# VisionTransformer.__init__ parameters left out on purpose (tests check that every parameter
# of the installed timm is in exactly one of the two sets) and timm.create_model's loading
# arguments, with the reason the error gives.
ARCH_KWARGS_REFUSED = {
    "pretrained": "weights come from the manifest's weights column",
    "checkpoint_path": "a file timm would load; weights come from the manifest's weights "
                       "column, read safely",
    "pretrained_cfg": "names weights to download",
    "pretrained_cfg_overlay": "names weights to download",
    "cache_dir": "a download folder",
    "num_classes": "set by the manifest's num_classes column",
    "weight_init": "weights come from the manifest's weights column",
    "fix_init": "weights come from the manifest's weights column",
    "embed_layer": "a class, not a shape", "embed_norm_layer": "a class, not a shape",
    "norm_layer": "a class, not a shape", "act_layer": "a class, not a shape",
    "block_fn": "a class, not a shape", "mlp_layer": "a class, not a shape",
    "attn_layer": "a class, not a shape",
    "device": "circuitray places the model", "dtype": "circuitray chooses the precision",
}


def check_arch_kwargs(kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse every key outside ARCH_KWARGS_ALLOWED, naming `where` and the key."""
    for key in sorted(kwargs):
        if key in ARCH_KWARGS_ALLOWED:
            continue
        why = ARCH_KWARGS_REFUSED.get(key, "not an architecture-shape argument; it could make "
                                           "timm read files or run code")
        raise ConfigError(f"{where}: arch_kwargs key '{key}' is not allowed ({why}); allowed: "
                          f"{', '.join(sorted(ARCH_KWARGS_ALLOWED))}")


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _parse_kwargs(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(where, f"arch_kwargs is not JSON: {value!r} ({exc})") from exc
        if isinstance(parsed, dict):
            return parsed
    raise DataError(where, f"arch_kwargs must be a JSON object, got {value!r}")


def _list_as_json(value: Any) -> Any:
    """A list cell (YAML list, Parquet array) as JSON text; anything else unchanged."""
    if getattr(value, "ndim", 0) > 0:
        value = value.tolist()
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a checkpoint manifest; resolve relative weight/data paths against its folder.

    Returns one row per checkpoint with `arch_kwargs` as a JSON string (a canonical form that
    survives Parquet and CSV) and `weights`/`data_root` as absolute paths or URIs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such manifest")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype={"checkpoint_id": str, "weights": str})
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
            rows = data.get("checkpoints") if isinstance(data, Mapping) else data
            if not isinstance(rows, list):
                raise DataError(path, "YAML manifest must be a list of checkpoints "
                                      "(or a mapping with a 'checkpoints' list)")
            df = pd.DataFrame(rows)
        else:
            raise DataError(path, f"unknown manifest format '{suffix}' (use .csv, .parquet, .yaml)")
    except DataError:
        raise
    except Exception as exc:  # parser errors of three libraries; name the file
        raise DataError(path, f"unreadable manifest: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(path, f"manifest misses column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise DataError(path, "manifest lists no checkpoints")
    dupes = df["checkpoint_id"][df["checkpoint_id"].duplicated()].tolist()
    if dupes:
        raise DataError(path, f"duplicate checkpoint_id(s) {dupes[:5]}")
    base = path.parent.resolve()
    df = df.copy()
    df["checkpoint_id"] = df["checkpoint_id"].astype(str)
    df["arch_kwargs"] = [
        json.dumps(_parse_kwargs(v, f"{path} checkpoint '{cid}'"), sort_keys=True)
        for v, cid in zip(df["arch_kwargs"], df["checkpoint_id"], strict=True)]
    df["num_classes"] = df["num_classes"].astype(int)
    for col in ("classes", *NORM_KEYS):  # lists (YAML, Parquet) -> JSON text, like arch_kwargs
        if col in df.columns:
            df[col] = [_list_as_json(v) for v in df[col]]

    if "weights_key" in df.columns:
        df["weights_key"] = [_weights_key(v, f"{path} checkpoint '{cid}'")
                             for v, cid in zip(df["weights_key"], df["checkpoint_id"], strict=True)]

    def resolve(p: Any) -> Any:
        if isinstance(p, str) and p.startswith(HF_HUB_PREFIX):
            try:  # a cached (or, online, downloadable) repository becomes its local file
                return resolve_hub_weights(p)
            except (FileNotFoundError, ValueError):
                return p  # load_checkpoint reports it for this checkpoint alone
        if not isinstance(p, str) or not p or _is_uri(p):
            return p
        p = p.removeprefix("file://")
        return str(p if os.path.isabs(p) else base / p)

    df["weights"] = df["weights"].map(resolve)
    if "data_root" in df.columns:
        df["data_root"] = df["data_root"].map(resolve)
    return df.reset_index(drop=True)


def _weights_key(value: Any, where: str) -> str | None:
    """A manifest `weights_key` cell: None when empty, else the name of a state dict."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return None
    if not isinstance(value, str) or not _WEIGHTS_KEY.fullmatch(value):
        raise DataError(where, f"weights_key must name a state dict in the checkpoint "
                               f"(e.g. state_dict_ema), got {value!r}")
    return value


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE as the user set it, read now (huggingface_hub reads it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def parse_hub_weights(weights: str) -> tuple[str, str | None]:
    """`hf-hub:<org>/<name>[@revision]` -> (repo id, revision or None)."""
    repo, _, revision = weights.removeprefix(HF_HUB_PREFIX).partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"'{weights}' is not hf-hub:<org>/<name>[@revision]")
    return repo, revision or None


def resolve_hub_weights(weights: str) -> str:
    """The local weights file of an `hf-hub:` entry: the cached `model.safetensors` (else
    `pytorch_model.bin`); when HF_HUB_OFFLINE is not set, a repository that is not cached is
    downloaded (with its config.json, which holds the normalization). Raises
    FileNotFoundError saying which repository is missing from which cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    repo, revision = parse_hub_weights(weights)
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now, like HF_HUB_OFFLINE
    for name in HUB_WEIGHTS_FILES:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return found
    where = f"{repo}{'@' + revision if revision else ''}"
    if _hf_offline():
        raise FileNotFoundError(
            f"{where} is not in the local Hugging Face cache "
            f"({cache_dir or HF_HUB_CACHE}; looked for {' or '.join(HUB_WEIGHTS_FILES)}), and "
            "HF_HUB_OFFLINE is set, so nothing is downloaded: download it where there is "
            f"network (`hf download {repo}`) or point HF_HUB_CACHE at a cache that has it")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in HUB_WEIGHTS_FILES:
        try:
            path = hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir)
        except Exception as exc:  # missing file, no network, unknown repo: try the next name
            errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        try:
            hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache_dir)
        except Exception:  # noqa: S110 - optional: only the normalization lives there
            pass
        return path
    raise FileNotFoundError(f"{where} is not in the local Hugging Face cache and "
                            f"could not be downloaded ({'; '.join(errors)})")


def _local_weights(weights: str) -> str:
    """`weights` itself, or the cached file an `hf-hub:` entry names."""
    return resolve_hub_weights(weights) if weights.startswith(HF_HUB_PREFIX) else weights


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | str | None,
                num_classes: int) -> torch.nn.Module:
    """A timm model with random weights (pretrained=False: nothing is downloaded)."""
    import timm

    kwargs = shape_kwargs(arch, arch_kwargs)
    return timm.create_model(arch, pretrained=False, num_classes=int(num_classes), **kwargs)


def shape_kwargs(arch: str, arch_kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """`arch_kwargs` as timm kwargs: parsed, a harmless `pretrained: false` and `num_classes`
    (the manifest column wins) dropped, every other key checked against the allowlist."""
    kwargs = _parse_kwargs(arch_kwargs, f"architecture '{arch}'")
    if not kwargs.get("pretrained"):
        kwargs.pop("pretrained", None)
    kwargs.pop("num_classes", None)
    check_arch_kwargs(kwargs, f"architecture '{arch}'")
    return kwargs


def _read_bytes(uri: str) -> bytes:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec ships with ray/mlflow
        raise OSError("reading a URI needs the 'fsspec' package") from exc
    with fsspec.open(uri, "rb") as fh:
        return fh.read()


def _suffix(weights: str) -> str:
    """The format suffix of a weights path; `.pth.tar` (timm train.py's name) counts as one."""
    name = Path(weights.split("?")[0]).name.lower()
    return ".pth.tar" if name.endswith(".pth.tar") else Path(name).suffix


def _load_pickle(weights: str, *, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: tensors, containers, and argparse.Namespace only.

    `mmap` (local zip-format files) reads the non-tensor parts without reading the tensors.
    """
    src: Any = weights
    if _is_uri(weights):
        import io

        src, mmap = io.BytesIO(_read_bytes(weights)), False
    with torch.serialization.safe_globals([argparse.Namespace]):
        if mmap:
            try:
                return torch.load(src, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                pass
        return torch.load(src, map_location="cpu", weights_only=True)


def read_training_checkpoint(weights: str) -> Any:
    """A torch checkpoint's contents, loaded safely (weights_only), tensors memory-mapped where
    the file allows: its metadata (epoch, args, metric) without reading the optimizer state."""
    return _load_pickle(weights, mmap=True)


def state_dict_in(obj: Any, key: str | None = None) -> dict[str, Any]:
    """The model's tensors in a loaded torch checkpoint: `obj[key]` when a key is named (a
    timm training checkpoint's `state_dict_ema`), else the first of STATE_DICT_KEYS present,
    else `obj` itself; a DataParallel `module.` prefix is dropped."""
    if key is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(key), Mapping):
            have = sorted(k for k, v in obj.items() if isinstance(v, Mapping)) \
                if isinstance(obj, Mapping) else []
            raise ValueError(f"no state dict '{key}' in the file (its state dicts: {have})")
        obj = obj[key]
    else:
        for name in STATE_DICT_KEYS:
            if isinstance(obj, Mapping) and name in obj and isinstance(obj[name], Mapping):
                obj = obj[name]
    from circuitray.checkpoint_meta import TensorInfo

    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(v, (torch.Tensor, TensorInfo)) for v in obj.values()):
        raise ValueError("file holds no state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _read_state_dict(weights: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """Raw tensors from a weights file, without ever running pickled code. A torch file is
    memory-mapped, so the entries not asked for (optimizer state) are never read."""
    suffix = _suffix(weights)
    if suffix in SAFE_SUFFIXES:
        if key is not None:
            raise ValueError(f"weights_key '{key}' names a state dict inside a torch training "
                             "checkpoint; a .safetensors file holds one set of weights")
        from safetensors.torch import load, load_file

        return load(_read_bytes(weights)) if _is_uri(weights) else load_file(weights)
    if suffix in PICKLE_SUFFIXES:
        return state_dict_in(_load_pickle(weights, mmap=True), key)
    raise ValueError(f"unknown weights format '{suffix}' (use .safetensors, or .pt/.pth/.pth.tar)")


def read_weights_shapes(weights: str, key: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a local weights file, without reading the tensors."""
    if _suffix(weights) in SAFE_SUFFIXES:
        if key is not None:
            return {k: tuple(v.shape) for k, v in _read_state_dict(weights, key).items()}
        from safetensors import safe_open

        with safe_open(weights, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    return {k: tuple(v.shape) for k, v in _read_state_dict(weights, key).items()}


def _norm_fields(cfg: Any) -> dict[str, Any]:
    """The NORM_KEYS a config (dict or Namespace) sets; None and '' mean "not set"."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
    fields = {k: get(k) for k in NORM_KEYS if get(k) is not None and get(k) != ""}
    if "input_size" not in fields and get("img_size"):  # timm train.py's --img-size
        fields["input_size"] = get("img_size")
    return fields


def _sibling_config(weights: str) -> tuple[dict[str, Any], str] | None:
    """A hub-layout config.json beside the weights file (timm's `pretrained_cfg` inside)."""
    if _is_uri(weights):
        path = weights.split("?")[0].rsplit("/", 1)[0] + "/config.json"
        try:
            text = _read_bytes(path).decode()
        except (FileNotFoundError, OSError):
            return None
    else:
        p = Path(weights).parent / "config.json"
        if not p.is_file():
            return None
        path, text = str(p), p.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, Mapping):
        return None
    for part in (cfg.get("pretrained_cfg"), cfg):
        if isinstance(part, Mapping) and ("mean" in part or "std" in part):
            return _norm_fields(part), f"checkpoint config.json {path}"
    if "image_mean" in cfg or "image_std" in cfg:  # Hugging Face image-processor names
        return ({k: cfg[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in cfg},
                f"checkpoint config.json {path}")
    return None


def _safetensors_metadata(weights: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (read alone: 8-byte length, then JSON)."""
    if _is_uri(weights):
        import fsspec

        with fsspec.open(weights, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = fh.read(n)
    else:
        with open(weights, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = fh.read(n)
    meta = json.loads(header).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def read_checkpoint_preprocessing(weights: str) -> tuple[dict[str, Any], str] | None:
    """What the checkpoint itself says about its eval preprocessing, and where it says it.

    Looked up in order: a hub-layout `config.json` beside the weights (`pretrained_cfg` or
    top-level `mean`/`std`), the safetensors header metadata (`mean`, `std`, ... as JSON
    strings, or a JSON `pretrained_cfg`), a torch training checkpoint's `args` (timm
    train.py's Namespace) or `pretrained_cfg`. Returns ({key: value} over NORM_KEYS, source)
    or None when the checkpoint says nothing; values are not validated here.
    """
    found = _sibling_config(weights)
    if found is not None:
        return found
    suffix = _suffix(weights)
    if suffix in SAFE_SUFFIXES:
        meta = _safetensors_metadata(weights)
        fields: dict[str, Any] = {}
        if "pretrained_cfg" in meta:
            fields = _norm_fields(json.loads(meta["pretrained_cfg"]))
        for k in NORM_KEYS:
            if k in meta:
                fields[k] = meta[k] if k == "interpolation" else json.loads(meta[k])
        if "mean" in fields or "std" in fields:
            return fields, f"checkpoint safetensors metadata {weights}"
    elif suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(weights, mmap=True)
        if isinstance(obj, Mapping):
            for key, what in (("args", "training args"), ("pretrained_cfg", "pretrained_cfg")):
                fields = _norm_fields(obj[key]) if obj.get(key) is not None else {}
                if "mean" in fields or "std" in fields:
                    return fields, f"checkpoint {what} {weights}"
    return None


def read_error_reason(exc: BaseException) -> str:
    """One line on why a weights file could not be read; a refused pickle says so."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__:
        reason = f"refused: the pickle needs more than plain tensors to load ({reason})"
    return reason


def shape_problems(expected: Mapping[str, tuple[int, ...]],
                   found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of `found` against `expected` (name -> shape)."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in found.items():
        if k in expected and tuple(shape) != tuple(expected[k]):
            problems.append(f"{k} has shape {tuple(shape)}, architecture expects "
                            f"{tuple(expected[k])}")
    return problems


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every way `state` does not fit `model`: missing, unexpected and mis-shaped tensors, and
    tensors holding NaN or infinite values."""
    expected = model.state_dict()
    problems = shape_problems({k: tuple(v.shape) for k, v in expected.items()},
                              {k: tuple(v.shape) for k, v in state.items()})
    for k, v in state.items():
        if k in expected and tuple(v.shape) == tuple(expected[k].shape) and \
                v.is_floating_point() and not torch.isfinite(v).all():
            problems.append(f"{k} holds NaN or infinite values")
    return problems


def load_checkpoint(row: Mapping[str, Any] | pd.Series) -> torch.nn.Module:
    """Build the row's architecture, load its weights safely, return it in eval mode.

    Raises CheckpointError(checkpoint_id, weights, reason) for every failure: unreadable or
    truncated file, refused pickle, wrong tensor names or shapes, unknown architecture.
    """
    cid, weights = str(row["checkpoint_id"]), str(row["weights"])
    try:  # before timm sees them: a refused key must not reach its loaders
        kwargs = shape_kwargs(str(row["arch"]), row["arch_kwargs"])
    except (ConfigError, DataError) as exc:
        raise CheckpointError(cid, weights, str(exc)) from exc
    try:
        model = build_model(str(row["arch"]), kwargs, int(row["num_classes"]))
    except Exception as exc:
        raise CheckpointError(cid, weights, f"cannot build architecture '{row['arch']}' "
                                            f"with {row['arch_kwargs']}: {exc}") from exc
    try:
        key = _weights_key(row.get("weights_key"), "weights_key")
        local = _local_weights(weights)
    except (DataError, FileNotFoundError, ValueError) as exc:
        raise CheckpointError(cid, weights, str(exc)) from exc
    if not _is_uri(local) and not Path(local).is_file():
        raise CheckpointError(cid, weights, "weights file does not exist")
    try:
        state = _read_state_dict(local, key)
    except Exception as exc:  # SafetensorError, UnpicklingError, OSError, ...
        raise CheckpointError(cid, weights, f"unreadable weights: {read_error_reason(exc)}"
                              ) from exc
    problems = check_state_dict(model, state)
    if problems:
        raise CheckpointError(cid, weights, "; ".join(problems))
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def iter_checkpoints(manifest: pd.DataFrame
                     ) -> Iterator[tuple[pd.Series, torch.nn.Module | None, CheckpointError | None]]:
    """Yield (row, model, None) or (row, None, error) per checkpoint: one bad file never stops
    the others, and only one model is in memory at a time."""
    for _, row in manifest.iterrows():
        try:
            yield row, load_checkpoint(row), None
        except CheckpointError as exc:
            yield row, None, exc
