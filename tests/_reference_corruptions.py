"""The reference corruptions (`imagecorruptions` 1.1.2), patched to import on today's stack.

Dev-only: the parity test and bench/corruptions.py compare circuitray's torch corruptions
against it. It is never imported by the library. Version 1.1.2 was written for NumPy 1 and
scikit-image < 0.19, so before importing it this helper, and only inside this process:

- sets `np.float_` (removed in NumPy 2) to `np.float64`;
- wraps `skimage.filters.gaussian` to translate `multichannel=True` into `channel_axis=-1`;
- wraps `skimage.util.random_noise` to draw its seed from NumPy's global generator (the new
  scikit-image ignores `np.random.seed`, which would make impulse noise unseeded);
- provides `pkg_resources.resource_filename` (removed from recent setuptools) and
  `scipy.ndimage.interpolation` (deprecated namespace) when missing.

`reference(image, kind, severity, seed)` returns the reference's float output in [0, 1]
*before* its final `np.uint8` cast, which truncates (a bias of half a grey level that would
swamp small corruptions such as a mild blur).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections.abc import Iterator

import numpy as np

_MODULE = None


def load():
    """The patched reference module, or None when `imagecorruptions` is not installed."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    import importlib.util

    if importlib.util.find_spec("imagecorruptions") is None:
        return None
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    import skimage.filters
    import skimage.util

    if not getattr(skimage.filters.gaussian, "_circuitray_patched", False):
        original = skimage.filters.gaussian

        @functools.wraps(original)
        def gaussian(image, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            return original(image, *args, **kwargs)

        gaussian._circuitray_patched = True
        skimage.filters.gaussian = gaussian

        noise = skimage.util.random_noise

        @functools.wraps(noise)
        def random_noise(image, *args, **kwargs):
            kwargs.setdefault("rng", int(np.random.randint(2 ** 31)))
            return noise(image, *args, **kwargs)

        skimage.util.random_noise = random_noise
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        def resource_filename(package: str, name: str) -> str:
            return os.path.join(os.path.dirname(sys.modules[package].__file__), name)

        stub.resource_filename = resource_filename
        sys.modules["pkg_resources"] = stub
    try:
        import scipy.ndimage.interpolation  # noqa: F401
    except ImportError:
        import scipy.ndimage

        sys.modules["scipy.ndimage.interpolation"] = scipy.ndimage
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import imagecorruptions

    _MODULE = imagecorruptions
    return _MODULE


@contextlib.contextmanager
def _fixed(name: str, values: list) -> Iterator[None]:
    """Make `np.random.<name>` return `values` in turn (to pin the reference's draws)."""
    original = getattr(np.random, name)
    queue = list(values)

    def draw(*args, **kwargs):
        return queue.pop(0) if queue else original(*args, **kwargs)

    setattr(np.random, name, draw)
    try:
        yield
    finally:
        setattr(np.random, name, original)


def reference(image: np.ndarray, kind: str, severity: int, seed: int = 0, *,
              randint: list | None = None, uniform: list | None = None,
              plasma: np.ndarray | None = None) -> np.ndarray:
    """The reference corruption of one uint8 [H, W, 3] image, float [H, W, 3] in [0, 1].

    `randint` / `uniform` pin the reference's first draws of those functions (frost: photo
    index, crop row, crop column; motion blur and snow: the angle); `plasma` replaces fog's.
    """
    module = load()
    if module is None:
        raise RuntimeError("imagecorruptions is not installed (pip install '.[dev]')")
    from PIL import Image

    np.random.seed(seed)
    with _fixed("randint", randint or []), _fixed("uniform", uniform or []), \
            _plasma(module, plasma), np.errstate(invalid="ignore", divide="ignore"):
        out = module.corruption_dict[kind](Image.fromarray(image), severity)
    out = np.asarray(out, dtype=np.float64) / 255.0
    # spatter without any drop divides 0 by 0: count that image as unchanged, as ours leaves it
    return np.clip(np.where(np.isnan(out), image / 255.0, out), 0, 1)


@contextlib.contextmanager
def _plasma(module, plasma: np.ndarray | None) -> Iterator[None]:
    """Give the reference's fog this plasma instead of drawing its own."""
    if plasma is None:
        yield
        return
    corruptions = sys.modules[module.__name__ + ".corruptions"]
    original = corruptions.plasma_fractal
    corruptions.plasma_fractal = lambda mapsize=256, wibbledecay=3: plasma
    try:
        yield
    finally:
        corruptions.plasma_fractal = original


def sample_images(size: int, n: int = 4) -> np.ndarray:
    """`n` natural photographs from scikit-image's bundled data, uint8 [n, size, size, 3]."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left")[:n]
    out = []
    for name in names:
        img = Image.fromarray(getattr(skimage.data, name)())
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS)))
    return np.stack(out)


# Draws pinned to the same values on both sides, where one draw decides most of the magnitude.
STOCHASTIC = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur")
MOTION_ANGLES = (-40.0, -15.0, 5.0, 30.0)  # motion_blur: U(-45, 45) in both
SNOW_ANGLES = (-130.0, -100.0, -70.0)  # snow: U(-135, -45) in both


def mean_abs_change(kind: str, severity: int, images: np.ndarray,
                    seeds: tuple[int, ...] = (0, 1)) -> tuple[float, float]:
    """Mean |corrupted - clean| in [0, 1] units, (circuitray, reference), same draws pinned.

    Noise, glass blur, spatter: averaged over seeds (expected magnitude, not pixels; 64 seeds
    at 32 px, where a few hundred impulses per image would leave a 4% sampling error; spatter's
    drops are few and large, so it gets 64 seeds at 224 px and 384 at 32 px). Motion blur,
    snow: over fixed angles given to both (snow: several seeds per angle, more at 32 px).
    Frost: over fixed (photograph, crop) choices given to both. Fog: our plasma fractal handed
    to the reference too (the plasma's own distribution is tested separately). Deterministic
    kinds: one run each. ImageNet-C's constants on both sides (the reference has none other).
    """
    import torch

    from circuitray.data import shifts

    clean = images.astype(np.float64) / 255.0
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    c = shifts._constant(kind, severity, x, "imagenet")

    def ours_at(seed: int = 0, **pins) -> np.ndarray:
        # the kind's function with its draws pinned, then corrupt()'s final clamp
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = shifts._KINDS[kind](x, c, gen, **pins).clamp(0, 1)
        return out.permute(0, 2, 3, 1).double().numpy()

    small = images.shape[1] <= 64
    pairs = list(zip(images, clean, strict=True))
    ours, ref = [], []
    if kind == "motion_blur" or kind == "snow":
        angles = MOTION_ANGLES if kind == "motion_blur" else SNOW_ANGLES
        per_angle = 1 if kind == "motion_blur" else (16 if small else 2)
        for i, angle in enumerate(angles):
            for k in range(per_angle):
                seed = 100 * i + k
                ours.append(np.abs(ours_at(seed=seed, angle=angle) - clean).mean())
                ref.append(np.mean([np.abs(reference(im, kind, severity, seed + 7919 * j,
                                                     uniform=[angle]) - c).mean()
                                    for j, (im, c) in enumerate(pairs)]))
    elif kind == "fog":
        _, h, w = images.shape[:3]
        size = 2 ** (max(h, w) - 1).bit_length()
        for seed in seeds:
            plasmas = shifts._plasma(len(images), size, c[1], torch.Generator().manual_seed(seed))
            ours.append(np.abs(ours_at(plasma=plasmas) - clean).mean())
            ref.append(np.mean([np.abs(reference(im, kind, severity, seed,
                                                 plasma=plasmas[j, 0].double().numpy()) - cl
                                       ).mean() for j, (im, cl) in enumerate(pairs)]))
    elif kind == "frost":
        h, w = images.shape[1:3]
        for photo in range(5):
            _, ph, pw = shifts._frost_photo(photo, h, w).shape
            top, left = (ph - h) // 3, (pw - w) // 2  # any crop; the same on both sides
            ours.append(np.abs(ours_at(photo=photo, top=top, left=left) - clean).mean())
            ref.append(np.mean([np.abs(reference(im, kind, severity, 0,
                                                 randint=[photo, top, left]) - c).mean()
                                for im, c in zip(images, clean, strict=True)]))
    else:
        if kind == "spatter":
            seeds = tuple(range(384 if small else 64))
        elif small and kind in STOCHASTIC:
            seeds = tuple(range(16 if kind == "glass_blur" else 64))
        for seed in seeds:
            ours.append(np.abs(ours_at(seed=seed) - clean).mean())
            ref.append(np.mean([np.abs(reference(im, kind, severity, seed + 1000 * j) - c).mean()
                                for j, (im, c) in enumerate(zip(images, clean, strict=True))]))
    return float(np.mean(ours)), float(np.mean(ref))
