"""Corruptions: shapes, ranges, determinism, severity ordering, and shifted datasets."""

from __future__ import annotations

import pytest
import torch

from circuitray.data.datasets import DomainFolderDataset, eval_transform, make_loader
from circuitray.data.shifts import (
    BENCHMARK,
    CORRUPTIONS,
    ShiftedDataset,
    _elastic_fields,
    _octave_noise,
    corrupt,
    rgb_to_hsv,
)
from circuitray.errors import ConfigError, InputError

# Kinds whose published constants make the RMS distance to the clean image grow strictly.
# (Not motion_blur: CIFAR-10-C's severities 3 and 4 differ only in radius, 6 vs 8 at sigma 2,
# and the 2r+1 Gaussian taps beyond 3 sigma weigh nothing, so the two are the same blur.)
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
            "gaussian_blur", "zoom_blur", "fog", "brightness", "contrast",
            "jpeg_compression")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Natural-ish test images: smooth coloured fractal noise plus a sharp square."""
    g = torch.Generator().manual_seed(0)
    x = _octave_noise(24 * 3, 32, 1.5, g).view(24, 3, 32, 32) * 0.8 + 0.1
    x[:, :, 10:20, 8:18] = torch.rand(24, 3, 1, 1, generator=g)
    return x


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def test_all_fifteen_benchmark_kinds_and_four_extras_are_implemented() -> None:
    assert len(BENCHMARK) == 15 and len(CORRUPTIONS) == 19
    assert set(BENCHMARK) <= set(CORRUPTIONS) and {"snow", "spatter"} <= set(CORRUPTIONS)


def test_implementation_id_names_the_frost_source(monkeypatch) -> None:
    from circuitray.data import shifts

    monkeypatch.setattr(shifts, "_frost_dir", lambda: None)
    assert shifts.frost_source() == "procedural"
    assert shifts.implementation_id("frost") == "frost:procedural-v2"
    assert shifts.implementation_id("motion_blur") == "motion_blur:v2"
    out = corrupt(torch.rand(2, 3, 32, 32), "frost", 3, seed=0)  # the stand-in still works
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_keeps_shape_range_and_is_deterministic(images, kind) -> None:
    out = corrupt(images, kind, 3, seed=7)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()
    assert torch.equal(out, corrupt(images, kind, 3, seed=7))
    assert _rms(out, images) > 1e-3, f"{kind} left the images unchanged"


@pytest.mark.parametrize("kind", MONOTONE)
def test_distance_from_clean_grows_with_severity(images, kind) -> None:
    d = [_rms(corrupt(images, kind, s, seed=1), images) for s in range(1, 6)]
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), f"{kind}: {d}"


@pytest.mark.parametrize("kind", ("glass_blur", "frost", "pixelate", "motion_blur", "snow",
                                  "spatter"))
def test_non_monotone_kinds_still_hurt_most_at_severity_five(images, kind) -> None:
    d = [_rms(corrupt(images, kind, s, seed=1), images) for s in range(1, 6)]
    assert d[4] > d[0] > 0, f"{kind}: {d}"


def test_elastic_local_warp_grows_while_affine_warp_shrinks() -> None:
    from circuitray.data.shifts import _C

    local, affine = [], []
    for s in range(1, 6):
        c = _C["elastic_transform"][0][s - 1]
        g = torch.Generator().manual_seed(0)
        src, disp = _elastic_fields(16, 32, 32, c, g)
        local.append(disp.pow(2).mean().sqrt().item())
        ident = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0),
                                           indexing="xy"), -1)
        affine.append((src - ident).pow(2).mean().sqrt().item())
    assert local[0] == 0 and all(a < b for a, b in zip(local, local[1:], strict=False)), local
    assert all(a > b for a, b in zip(affine, affine[1:], strict=False)), affine


def test_saturate_desaturates_then_oversaturates(images) -> None:
    sat = [rgb_to_hsv(corrupt(images, "saturate", s))[:, 1].mean().item() for s in range(1, 6)]
    clean = rgb_to_hsv(images)[:, 1].mean().item()
    assert sat[1] < sat[0] < clean < sat[2] < sat[3] < sat[4]


def test_noise_depends_on_seed(images) -> None:
    a = corrupt(images, "gaussian_noise", 2, seed=0)
    b = corrupt(images, "gaussian_noise", 2, seed=1)
    assert not torch.equal(a, b)


def test_imagenet_constants_apply_to_large_images() -> None:
    x = torch.rand(2, 3, 96, 96)
    small = corrupt(x, "gaussian_noise", 5, scale="cifar", seed=0)
    large = corrupt(x, "gaussian_noise", 5, seed=0)  # auto: 96 px -> ImageNet-C's 0.38
    assert _rms(large, x) > 2 * _rms(small, x)
    for kind in CORRUPTIONS:
        out = corrupt(x, kind, 5, seed=0)
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1, kind


def test_bad_arguments_name_the_problem(images) -> None:
    with pytest.raises(ConfigError, match="unknown corruption 'smog'"):
        corrupt(images, "smog", 1)
    with pytest.raises(ConfigError, match="severity must be 1..5"):
        corrupt(images, "fog", 6)
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        corrupt(images[0], "fog", 1)


def test_shifted_dataset_corrupts_before_normalization(tmp_path) -> None:
    import timm
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i + 50, 120, 200)).save(tmp_path / "d" / c / f"{i}.png")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    tf = eval_transform(model)
    base = DomainFolderDataset(tmp_path, "d", tf, classes=["a", "b"])
    shifted = ShiftedDataset(base, "contrast", 5, seed=3)
    x, label, domain = shifted[4]
    unit, _, _ = base.unit(4)
    expected = tf.normalize(corrupt(unit[None], "contrast", 5, seed=3 * 1_000_003 + 4)[0])
    assert torch.allclose(x, expected)
    assert domain == "shift:contrast:5" and label == base[4][1]  # the job's one name
    images, labels, domains = next(iter(make_loader(shifted, 4)))
    assert images.shape == (4, 3, 32, 32) and domains[0] == "shift:contrast:5"
    # same item, same corruption regardless of batching
    assert torch.allclose(images[0], shifted[0][0])


def _sequential_glass_sources(h: int, w: int, delta: int, iters: int, g: torch.Generator
                              ) -> list[int]:
    """The reference's copy loop, one pixel at a time (the oracle for the vectorized one)."""
    rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
    perm = list(range(h * w))
    for _ in range(iters):
        moves = torch.randint(-delta, delta, (len(rows) * len(cols), 2), generator=g).tolist()
        k = 0
        for r in rows:
            for col in cols:
                dx, dy = moves[k]
                k += 1
                perm[r * w + col] = perm[(r + dy) * w + col + dx]
    return perm


@pytest.mark.parametrize(("h", "w", "delta", "iters"),
                         [(32, 32, 1, 2), (17, 23, 2, 3), (40, 31, 4, 2), (9, 9, 3, 1)])
def test_glass_blur_copies_equal_the_one_pixel_at_a_time_loop(h, w, delta, iters) -> None:
    from circuitray.data.shifts import Draws, _glass_sources

    got = _glass_sources(range(3), h, w, delta, iters, Draws.seeded([4, 5, 6]))
    for i, seed in enumerate((4, 5, 6)):
        want = _sequential_glass_sources(h, w, delta, iters, torch.Generator().manual_seed(seed))
        assert got[i].tolist() == want
