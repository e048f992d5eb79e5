"""Demo tasks generated offline and written in the DomainBed layout (root/<task>/<domain>/<class>/).

Nothing can be downloaded here, yet every later stage needs image domains whose OOD accuracy
really differs between models. These tasks are rendered from scikit-learn's shipped digits
(and from procedural shapes), written as PNG files, and read back by the same loaders as user
data, so the demo exercises the real input path.

Tasks (see README, "Data, shifts and the demo zoo"):

- ``digits-background``: a digit on a background whose colour is the spurious cue.
- ``digits-patch``: a digit on a grey background with a small coloured patch in the top-left
  corner as the spurious cue.
  In both, cue colour = the label's colour with probability ρ, else one of the 9 other colours.
  Domains per ρ: ``train-rho{ρ}`` (1,197 digits) and ``id-rho{ρ}`` (200 other digits, each
  rendered twice), both at strength ρ; one shared ``ood`` domain renders the 400 held-out
  digits (never in train/id) with ``ood_cues`` (3) uniformly random cue colours each: 1,200
  images.
- ``shapes-style``: six shape classes drawn in four styles; ``train`` and ``id`` mix the styles
  solid, outline and noisy; ``ood`` is the held-out striped style; ``style-<name>`` domains hold
  fresh test images of each training style.
- ``pretrain-mix``: the backbone's corpus (``train`` and ``val``), 16 classes: the ten digits
  in a plain style (a dark stroke on a background of any colour, hue, saturation and value
  drawn at random: colour says nothing about the label, and there is no cue patch) drawn
  from the digit tasks' training digits only, and the six shapes in the three training
  styles (never striped). No downstream task's held-out digit or held-out style is in it.
  (A first version drew plain digits on grey only: fine-tunes on coloured backgrounds then
  sat at chance out of distribution, even linear probes, since the backbone had never seen
  a coloured background; pretrained models users evaluate have seen every colour.)

A task directory is complete when ``task.json`` lists a domain; each domain is written to a
temporary folder and renamed, so a crash never leaves a half-written domain that looks done.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from circuitray.errors import ConfigError, DataError

PRETRAIN_TASK = "pretrain-mix"
# how each task is rendered: part of every training spec (backbone and fine-tunes), so a
# checkpoint trained on an earlier rendering is never reused as if trained on this one;
# bump the number with any change to what a task's images look like
PRETRAIN_VERSION = 2
DIGITS_VERSION = 3
SHAPES_VERSION = 1
TASKS = ("digits-background", "digits-patch", "shapes-style", PRETRAIN_TASK)
DIGIT_TASKS = ("digits-background", "digits-patch")
DEFAULT_RHOS = (0.5, 0.6, 0.7, 0.8, 0.9)
SIZE = 32
N_COLOURS = 10
N_DIGIT_CLASSES = 10
SHAPES = ("circle", "cross", "ring", "square", "star", "triangle")
TRAIN_STYLES = ("solid", "outline", "noisy")
OOD_STYLE = "striped"


def rho_tag(rho: float) -> str:
    """Domain-name form of a spurious strength: 0.7 -> 'rho0.7' (shortest exact decimal)."""
    return f"rho{float(rho):g}"


def task_splits(name: str, rho: float | None = None) -> dict[str, str]:
    """Which domains a model of task `name` (at strength `rho`) trains, validates and tests on."""
    if name in DIGIT_TASKS:
        if rho is None:
            raise ConfigError(f"task '{name}': a spurious strength rho is required")
        return {"train": f"train-{rho_tag(rho)}", "id": f"id-{rho_tag(rho)}", "ood": "ood"}
    if name == "shapes-style":
        return {"train": "train", "id": "id", "ood": "ood"}
    if name == PRETRAIN_TASK:
        return {"train": "train", "id": "val"}
    raise ConfigError(f"unknown demo task '{name}'; known: {list(TASKS)}")


# ---------------------------------------------------------------- colours and rendering


def _palette() -> np.ndarray:
    """Ten well-separated hues (float RGB in [0,1]); class k's cue colour is palette[k]."""
    return np.array([colorsys.hsv_to_rgb(k / N_COLOURS, 0.85, 0.9) for k in range(N_COLOURS)],
                    dtype=np.float32)


def _cue_colours(labels: np.ndarray, rho: float | None, rng: np.random.Generator) -> np.ndarray:
    """Cue colour index per image: the label's with probability rho, else one of the others.

    rho=None means no correlation at all (uniform over all colours), the OOD setting.
    """
    n = len(labels)
    if rho is None:
        return rng.integers(0, N_COLOURS, n)
    other = (labels + rng.integers(1, N_COLOURS, n)) % N_COLOURS
    return np.where(rng.random(n) < rho, labels, other)


def _digit_alpha(digits: np.ndarray) -> np.ndarray:
    """8x8 digits (0..16) -> [n, 32, 32] stroke opacity, 24 px tall, centred.

    Not jittered on purpose: with ±2 px jitter a tiny ViT trained from scratch on ~1,200
    images learned only the cue within 30 epochs (OOD at chance) — measured here; centred
    digits let ρ and the training length, not the rendering, decide how much digit it learns.
    """
    import torch
    import torch.nn.functional as F

    small = torch.from_numpy(digits.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    big = F.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)[:, 0].numpy()
    out = np.zeros((len(digits), SIZE, SIZE), np.float32)
    out[:, 4:28, 4:28] = big
    return np.clip(out * 1.2, 0, 1)


def _render_digits(kind: str, digits: np.ndarray, cues: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Compose digits with their cue: [n, 32, 32, 3] uint8."""
    n = len(digits)
    palette = _palette()
    colour = palette[cues] + rng.normal(0, 0.03, (n, 3)).astype(np.float32)
    alpha = _digit_alpha(digits)[..., None]
    stroke = rng.uniform(0.0, 0.15, (n, 1, 1, 1)).astype(np.float32)
    if kind == "plain":  # the pretraining style: any background colour, no cue, no patch
        hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(0, 0.9, n), rng.uniform(0.5, 1, n)], 1)
        rgb = np.array([colorsys.hsv_to_rgb(*c) for c in hsv], np.float32)
        bg = np.broadcast_to(rgb[:, None, None, :], (n, SIZE, SIZE, 3)).copy()
        stroke = rng.uniform(0.0, 0.2, (n, 1, 1, 3)).astype(np.float32)
    elif kind == "digits-background":
        bg = np.broadcast_to(colour[:, None, None, :], (n, SIZE, SIZE, 3)).copy()
    else:
        grey = rng.uniform(0.55, 0.85, (n, 1, 1, 1)).astype(np.float32)
        bg = np.broadcast_to(grey, (n, SIZE, SIZE, 3)).copy()
    img = bg * (1 - alpha) + stroke * alpha
    if kind == "digits-patch":
        img[:, 1:6, 1:6, :] = colour[:, None, None, :]  # a 5x5 patch, top-left corner
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _shape_mask(shape: str, rng: np.random.Generator) -> np.ndarray:
    """One random-size, random-position, random-rotation shape as a boolean 32x32 mask."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    r = rng.uniform(7, 12)
    cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
    th = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    rad, ang = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return rad <= r
    if shape == "ring":
        return (rad <= r) & (rad >= 0.55 * r)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":  # distance to the sides of an equilateral triangle
        sides = [u * np.cos(a) + v * np.sin(a) for a in (np.pi / 2, np.pi / 2 + 2.094, np.pi / 2 + 4.189)]
        return np.max(sides, axis=0) <= 0.5 * r
    if shape == "star":  # five points: radius modulated by angle
        return rad <= r * (0.55 + 0.45 * np.abs(np.cos(2.5 * ang)))
    raise ValueError(shape)


def _render_shapes(labels: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """Shapes of `labels` in one drawing style: [n, 32, 32, 3] uint8."""
    out = np.empty((len(labels), SIZE, SIZE, 3), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    for i, lab in enumerate(labels):
        mask = _shape_mask(SHAPES[lab], rng)[..., None]
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        while np.abs(fg - bg).sum() < 0.6:  # keep the shape visible
            bg = rng.uniform(0, 1, 3)
        if style == "solid":
            img = np.where(mask, fg, bg)
        elif style == "outline":
            m = mask[..., 0]
            inner = m.copy()
            inner[1:-1, 1:-1] = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & m[1:-1, 1:-1]
            edge = (m & ~inner)[..., None]
            img = np.where(edge, fg * 0.2, np.ones(3) * rng.uniform(0.8, 1.0))
        elif style == "noisy":
            img = np.where(mask, fg, bg) + rng.normal(0, 0.25, (SIZE, SIZE, 3))
        elif style == OOD_STYLE:
            a = rng.uniform(0, np.pi)
            period = rng.uniform(3, 6)
            phase = (xx * np.cos(a) + yy * np.sin(a)) / period
            stripes = ((np.floor(phase) % 2) == 0)[..., None]
            fg2 = 1 - fg
            img = np.where(mask, np.where(stripes, fg, fg2), np.where(stripes, bg, bg * 0.5))
        else:
            raise ValueError(style)
        out[i] = img
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- writing domains


def _write_domain(task_dir: Path, domain: str, images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str]) -> None:
    """Write one domain as PNGs into a temporary folder, then rename it into place."""
    final = task_dir / domain
    tmp = task_dir / f".{domain}.{uuid.uuid4().hex}.tmp"
    try:
        for c in classes:
            (tmp / c).mkdir(parents=True)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(img).save(tmp / classes[lab] / f"{i:05d}.png")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _read_meta(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "task.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON: {exc}") from exc


def _write_meta(task_dir: Path, meta: dict[str, Any]) -> None:
    tmp = task_dir / f".task.json.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, task_dir / "task.json")


def _digit_split(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's digits, labels, and the fixed split by `seed`: 400 held out (ood),
    200 id, the rest (1,197) train. Pretraining uses the train digits only."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    n_ood, n_id = 400, 200
    split = {"ood": order[:n_ood], "id": order[n_ood:n_ood + n_id], "train": order[n_ood + n_id:]}
    return data.images, data.target.astype(np.int64), split


def _digits_plan(name: str, seed: int, rhos: Sequence[float], ood_cues: int,
                 ) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """Domain name -> a function rendering it, for the digit tasks (deterministic per seed)."""
    digits, labels, split = _digit_split(seed)
    ood_idx, id_idx, train_idx = split["ood"], split["id"], split["train"]

    def render(idx: np.ndarray, rho: float | None, stream: int, repeat: int = 1):
        def make() -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, stream])
            idx_r = np.tile(idx, repeat)
            cues = _cue_colours(labels[idx_r], rho, rng)
            return _render_digits(name, digits[idx_r], cues, rng), labels[idx_r]
        return make

    plan = {"ood": render(ood_idx, None, 1, repeat=ood_cues)}
    for rho in rhos:
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"task '{name}': rho {rho} is outside [0, 1]")
        stream = int(round(rho * 1000)) + 10
        plan[f"train-{rho_tag(rho)}"] = render(train_idx, rho, 2 * stream)
        plan[f"id-{rho_tag(rho)}"] = render(id_idx, rho, 2 * stream + 1, repeat=2)
    return plan


def _shapes_plan(seed: int, n_per_style: int
                 ) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """Domain name -> renderer for shapes-style: mixed training styles, striped held out."""
    def mixed(stream: int, n: int, styles: Sequence[str]):
        def make() -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, stream])
            parts, labs = [], []
            for style in styles:
                lab = rng.integers(0, len(SHAPES), n)
                parts.append(_render_shapes(lab, style, rng))
                labs.append(lab)
            return np.concatenate(parts), np.concatenate(labs)
        return make

    plan = {
        "train": mixed(1, n_per_style, TRAIN_STYLES),
        "id": mixed(2, n_per_style // 3, TRAIN_STYLES),
        "ood": mixed(3, max(1000, n_per_style // 3), (OOD_STYLE,)),
    }
    for k, style in enumerate(TRAIN_STYLES):
        plan[f"style-{style}"] = mixed(10 + k, n_per_style // 3, (style,))
    return plan


def _pretrain_plan(seed: int, n_per_shape: int
                   ) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """Domain name -> renderer for the pretraining corpus: plain digits (train digits only,
    labels 0-9) and shapes in the training styles (labels 10-15); 10% of each is `val`."""
    digits, labels, split = _digit_split(seed)
    train_idx = split["train"]

    def make_split(part: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def make() -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, 100])
            keep = rng.permutation(len(train_idx))
            cut = len(keep) // 10
            idx = train_idx[keep[:cut] if part == "val" else keep[cut:]]
            rng = np.random.default_rng([seed, 101 if part == "val" else 102])
            n_shapes = max(1, n_per_shape // 10) if part == "val" else n_per_shape
            idx2 = np.tile(idx, 2)  # each digit twice, in two random plain renderings
            parts = [_render_digits("plain", digits[idx2], np.zeros(len(idx2), np.int64), rng)]
            labs = [labels[idx2]]
            for style in TRAIN_STYLES:
                lab = rng.integers(0, len(SHAPES), n_shapes * len(SHAPES) // len(TRAIN_STYLES))
                parts.append(_render_shapes(lab, style, rng))
                labs.append(lab + N_DIGIT_CLASSES)
            return np.concatenate(parts), np.concatenate(labs)
        return make

    return {"train": make_split("train"), "val": make_split("val")}


def task_version(name: str) -> int:
    """The rendering version of demo task `name` (what its training specs record)."""
    if name not in TASKS:
        raise ConfigError(f"unknown demo task '{name}'; known: {list(TASKS)}")
    if name in DIGIT_TASKS:
        return DIGITS_VERSION
    return PRETRAIN_VERSION if name == PRETRAIN_TASK else SHAPES_VERSION


def build_demo_task(name: str, root: str | os.PathLike, *, seed: int = 0,
                    rhos: Sequence[float] = DEFAULT_RHOS, ood_cues: int = 3,
                    n_per_style: int = 600, n_per_shape: int = 400) -> Path:
    """Write demo task `name` under root/name/ in the DomainBed layout; return that folder.

    Idempotent: domains already listed in task.json with the same generation parameters are
    reused; missing ones (e.g. a new rho) are added. For digit tasks `rhos` picks which
    train-/id- domains exist; `ood_cues` random cue colours per held-out digit
    (400 digits; 3 -> 1,200 images).
    Digit split (fixed by `seed`): 1,197 train, 200 id (each rendered twice), 400 ood.
    `n_per_shape`: training images per shape class of the pretraining corpus.
    """
    if name not in TASKS:
        raise ConfigError(f"unknown demo task '{name}'; known: {list(TASKS)}")
    task_dir = Path(root) / name
    task_dir.mkdir(parents=True, exist_ok=True)
    if name in DIGIT_TASKS:
        params = {"seed": seed, "ood_cues": ood_cues, "version": DIGITS_VERSION}
        plan = _digits_plan(name, seed, rhos, ood_cues)
        classes = [str(k) for k in range(10)]
    elif name == PRETRAIN_TASK:
        params = {"seed": seed, "n_per_shape": n_per_shape, "version": PRETRAIN_VERSION}
        plan = _pretrain_plan(seed, n_per_shape)
        classes = [f"digit{k}" for k in range(N_DIGIT_CLASSES)] + list(SHAPES)
    else:
        params = {"seed": seed, "n_per_style": n_per_style, "version": SHAPES_VERSION}
        plan = _shapes_plan(seed, n_per_style)
        classes = list(SHAPES)
    meta = _read_meta(task_dir)
    done = set(meta.get("domains", [])) if meta.get("params") == params else set()
    for domain, make in plan.items():
        if domain in done and (task_dir / domain).is_dir():
            continue
        images, labels = make()
        _write_domain(task_dir, domain, images, labels, classes)
        done.add(domain)
        _write_meta(task_dir, {"task": name, "params": params, "classes": classes,
                               "domains": sorted(done)})
    if not meta or set(meta.get("domains", [])) != done:
        _write_meta(task_dir, {"task": name, "params": params, "classes": classes,
                               "domains": sorted(done)})
    return task_dir
