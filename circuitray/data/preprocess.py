"""Which mean/std (and resize) a checkpoint is evaluated with, and where that came from.

timm's pretrained config for an architecture is only a guess for a user's checkpoint: a model
trained with another normalization loses accuracy without a word (on a held-out zoo, ID
accuracy 0.908 -> 0.677). So each value is taken from the first source that gives it:

1. the checkpoint itself (`circuitray.models.read_checkpoint_preprocessing`: a hub
   `config.json` beside the weights, safetensors metadata, a training checkpoint's `args`);
2. manifest columns `mean`, `std` (JSON lists of 3 floats), optional `input_size`,
   `interpolation`, `crop_pct`;
3. config keys `data.mean`, `data.std`;
4. timm's default for the architecture, with a printed notice naming it.

The input resolution is always the one the model was built with (its patch embedding only
accepts that size); a source that says otherwise gets a notice. The source is recorded per
checkpoint (completion marker, MLflow child run).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from circuitray.data.datasets import INTERPOLATIONS, ImageTransform
from circuitray.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST_SOURCE = "manifest columns mean, std"
CONFIG_SOURCE = "config data.mean, data.std"
_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct")


def norm_values_problem(name: str, values: Any) -> str | None:
    """Why `values` is not a usable mean/std for images in [0, 1] (None when it is)."""
    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        return f"{name} must be a list of 3 numbers, got {values!r}"
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        return f"{name} must be 3 finite numbers (R, G, B), got {values!r}"
    if name == "std" and any(v <= 0 for v in vals):
        return f"std must be 3 positive numbers, got {values!r}"
    if any(v > 1 or v < 0 for v in vals):
        return (f"{name} {values!r} is outside [0, 1]; images are normalized as floats in "
                "[0, 1], so a 0-255 scale mean/std must be divided by 255")
    return None


def _parse(value: Any) -> Any:
    """A manifest cell: JSON text -> value; empty/NaN -> None; numpy arrays -> lists."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # interpolation is a plain word
    return value


def _size(value: Any) -> tuple[int, int]:
    """input_size as (H, W) from an int, (H, W) or timm's (C, H, W)."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    vals = [int(v) for v in value]
    if len(vals) == 3:
        vals = vals[1:]
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError(f"input_size must be N, [H, W] or [3, H, W], got {value!r}")
    return vals[0], vals[1]


def _check(fields: Mapping[str, Any], source: str, cid: str, weights: str) -> dict[str, Any]:
    """Validate one source's values, converted; errors name the checkpoint and the source."""
    out: dict[str, Any] = {}
    try:
        for key in ("mean", "std"):
            if key in fields:
                problem = norm_values_problem(key, fields[key])
                if problem:
                    raise ValueError(problem)
                out[key] = tuple(float(v) for v in fields[key])
        if "input_size" in fields:
            out["input_size"] = _size(fields["input_size"])
        if "interpolation" in fields:
            interp = str(fields["interpolation"])
            if interp not in INTERPOLATIONS:
                raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interp!r}")
            out["interpolation"] = interp
        if "crop_pct" in fields:
            crop = float(fields["crop_pct"])
            if not 0 < crop <= 1:
                raise ValueError(f"crop_pct must be in (0, 1], got {fields['crop_pct']!r}")
            out["crop_pct"] = crop
    except (TypeError, ValueError) as exc:
        raise CheckpointError(cid, weights, f"preprocessing from {source}: {exc}") from exc
    return out


def _notice(cid: str, text: str) -> None:
    log.info(f"[circuitray] checkpoint '{cid}': {text}")


def resolve_preprocessing(row: Mapping[str, Any], model: torch.nn.Module, cfg_data: Any,
                          weights_path: str) -> tuple[ImageTransform, str]:
    """The eval transform of one checkpoint and the source of its mean/std (see module doc).

    `cfg_data` is the job's DataConfig (`mean`, `std`). Raises CheckpointError naming the
    checkpoint and the source for unreadable metadata or unusable values (not 3 numbers, a
    std <= 0, a 0-255 scale). Prints a notice when timm's default is used, when an explicit
    lower source disagrees with the one used, and when a source asks for another resolution
    than the model was built with.
    """
    from timm.data import resolve_data_config

    from circuitray.models import read_checkpoint_preprocessing

    cid = str(row.get("checkpoint_id", "?"))
    weights = str(weights_path)
    layers: list[tuple[str, dict[str, Any]]] = []
    try:
        found = read_checkpoint_preprocessing(weights)
    except Exception as exc:  # JSON, safetensors header, refused pickle: name the file
        raise CheckpointError(cid, weights, f"cannot read the checkpoint's preprocessing "
                                            f"metadata: {exc}") from exc
    if found is not None:
        layers.append((found[1], _check(found[0], found[1], cid, weights)))
    manifest = {k: _parse(row.get(k)) for k in _KEYS}
    manifest = {k: v for k, v in manifest.items() if v is not None}
    if manifest:
        layers.append((MANIFEST_SOURCE, _check(manifest, MANIFEST_SOURCE, cid, weights)))
    config = {k: getattr(cfg_data, k, None) for k in ("mean", "std")}
    config = {k: v for k, v in config.items() if v is not None}
    if config:
        layers.append((CONFIG_SOURCE, _check(config, CONFIG_SOURCE, cid, weights)))
    default_source = f"timm default for arch '{row.get('arch', type(model).__name__)}'"
    timm_cfg = resolve_data_config({}, model=model)
    layers.append((default_source, _check(
        {k: timm_cfg[k] for k in _KEYS if k in timm_cfg}, default_source, cid, weights)))

    chosen: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, fields in layers:
        for key, value in fields.items():
            if key not in chosen:
                chosen[key], origin[key] = value, source
            elif key in ("mean", "std") and value != chosen[key] and source != default_source:
                _notice(cid, f"{key} {list(value)} from {source} ignored: "
                             f"{list(chosen[key])} from {origin[key]} comes first")
    size = chosen["input_size"]
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:  # the model accepts only the resolution it was built with
        built = _size(built)
        if built != size and origin["input_size"] != default_source:
            _notice(cid, f"input_size {list(size)} from {origin['input_size']} ignored: the "
                         f"model was built for {list(built)}")
        size = built
    source = origin["mean"] if origin["mean"] == origin["std"] else (
        f"mean: {origin['mean']}; std: {origin['std']}")
    if default_source in (origin["mean"], origin["std"]):
        _notice(cid, f"normalization mean={list(chosen['mean'])} std={list(chosen['std'])} "
                     f"from {default_source}: neither the checkpoint (config.json, safetensors "
                     "metadata, training args), the manifest (columns mean, std) nor the "
                     "config (data.mean, data.std) gives one. A model trained with another "
                     "normalization loses accuracy silently")
    transform = ImageTransform(size=size, mean=chosen["mean"], std=chosen["std"],
                               crop_pct=chosen.get("crop_pct", 1.0),
                               interpolation=chosen.get("interpolation", "bicubic"))
    return transform, source


def provenance(transform: ImageTransform, norm_source: str, class_source: str
               ) -> dict[str, Any]:
    """The completion marker's per-checkpoint columns (DOMAIN_SCHEMA's tail)."""
    return {"norm_source": norm_source, "mean": [float(v) for v in transform.mean],
            "std": [float(v) for v in transform.std], "class_source": class_source}
