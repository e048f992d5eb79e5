"""Every corruption kind x severity against the reference `imagecorruptions` 1.1.2.

What is compared: the mean |corrupted - clean| over all pixels (in [0, 1] units) of ours and
of the reference, on natural photographs (scikit-image's data) at 224 px (2 images) and
32 px (4 images), with ImageNet-C's constants on both sides (the reference has no others);
their ratio must be within 2%. Not pixels: for stochastic kinds it is the expected magnitude
over seeds; where one draw decides most of the magnitude it is pinned to the same value on
both sides (motion blur and snow: the angle; frost: photograph and crop; fog: the plasma, whose
own distribution is compared separately below). The reference runs patched for NumPy 2 and
current scikit-image (tests/_reference_corruptions.py); it is a dev-only dependency, and
this module is skipped only when it is not installed (CI installs it with '.[dev]').

Documented gap (xfail): elastic_transform. Ours is ImageNet-C's published warp (Hendrycks'
make_imagenet_c.py: an affine jitter plus a local field); imagecorruptions rewrote it (no
affine part, sigma 1% of the side, alpha 12.5-30), so the two differ by design: measured
ratio 5.8 / 4.1 / 1.23 / 1.14 / 1.12 at 224 px and 1.90 / 1.48 / 0.66 / 0.76 / 0.92 at
32 px, severities 1-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

_ref = pytest.importorskip("_reference_corruptions")
if _ref.load() is None:
    pytest.skip("imagecorruptions (dev extra) is not installed", allow_module_level=True)

from circuitray.data.shifts import CORRUPTIONS, _plasma  # noqa: E402

CASES = [pytest.param(kind, sev, marks=pytest.mark.xfail(
            reason="imagecorruptions' elastic_transform is not ImageNet-C's (see module doc)",
            strict=False) if kind == "elastic_transform" else ())
         for kind in CORRUPTIONS for sev in range(1, 6)]


@pytest.fixture(scope="module", params=[224, 32])
def photos(request) -> np.ndarray:
    return _ref.sample_images(request.param, 2 if request.param > 64 else 4)


@pytest.mark.parametrize(("kind", "severity"), CASES)
def test_mean_abs_change_matches_reference_within_two_percent(photos, kind, severity) -> None:
    ours, theirs = _ref.mean_abs_change(kind, severity, photos)
    assert theirs > 0
    assert ours / theirs == pytest.approx(1, abs=0.02), \
        f"{kind} s{severity} at {photos.shape[1]} px: ours {ours:.5f}, reference {theirs:.5f}"


@pytest.mark.parametrize(("size", "decay"), [(32, 2.0), (256, 1.4)])
def test_plasma_fractal_distribution_matches_reference(size, decay) -> None:
    corruptions = __import__("imagecorruptions.corruptions", fromlist=["plasma_fractal"])
    np.random.seed(0)
    theirs = np.stack([corruptions.plasma_fractal(size, decay) for _ in range(64)])
    ours = _plasma(64, size, decay, torch.Generator().manual_seed(0)).numpy()[:, 0]
    for stat in (np.mean, np.std):
        assert stat(ours) == pytest.approx(stat(theirs), rel=0.05), stat.__name__
    # the same spatial roughness: mean |difference| between horizontal neighbours
    rough = [np.abs(np.diff(a, axis=-1)).mean() for a in (ours, theirs)]
    assert rough[0] == pytest.approx(rough[1], rel=0.05)
