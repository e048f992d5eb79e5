"""Corrupting a shifted domain image by image vs a batch at a time, per kind.

Per image is what `ShiftedDataset` did before batching: one `corrupt` call per image with its
own seed. Batched is one `corrupt(seeds=...)` call per batch of 32, the discover path now;
both give the same pixels (checked here too, column "same"). One torch thread, severity 3, 32
images per batch at 32 px (CIFAR-10-C's constants) and 224 px (ImageNet-C's), the two modes
timed in turns (which goes first alternates), repeated at least MIN_REPEATS times and for at least
MIN_SECONDS; images/second is the median over repeats, and the speedup is given from the
medians and from the best repeats (less sensitive to other jobs on a shared machine).
Decoding is not included. Compare within a run, not across runs.

    python bench/shift_batch.py                  # all kinds, 32 and 224 px; writes
                                                 # bench/results/shift_batch.json
    python bench/shift_batch.py fog snow 224     # a subset (prints only)
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

BATCH, SEVERITY = 32, 3
MIN_REPEATS, MIN_SECONDS, MAX_REPEATS = 5, 1.0, 51


def _images(size: int):
    """32 smooth colour-noise images with a sharp square (content matters little here)."""
    import torch

    from circuitray.data.shifts import _octave_noise

    g = torch.Generator().manual_seed(0)
    x = _octave_noise(BATCH * 3, size, 1.5, g).view(BATCH, 3, size, size) * 0.8 + 0.1
    s = size // 3
    x[:, :, s:2 * s, s:2 * s] = torch.rand(BATCH, 3, 1, 1, generator=g)
    return x


def _measure(kind: str, x) -> dict[str, float | bool]:
    import torch

    from circuitray.data.shifts import corrupt

    seeds = [1_000_003 + i for i in range(len(x))]
    per_image, batched = [], []
    while len(per_image) < MAX_REPEATS and (len(per_image) < MIN_REPEATS
                                            or sum(per_image) + sum(batched) < MIN_SECONDS):
        for mode in ("per_image", "batched")[::1 if len(per_image) % 2 else -1]:  # alternate
            t0 = time.perf_counter()
            if mode == "per_image":
                one = torch.cat([corrupt(x[i:i + 1], kind, SEVERITY, seed=s)
                                 for i, s in enumerate(seeds)])
                per_image.append(time.perf_counter() - t0)
            else:
                many = corrupt(x, kind, SEVERITY, seeds=seeds)
                batched.append(time.perf_counter() - t0)
    a, b = statistics.median(per_image), statistics.median(batched)
    return {"per_image_img_s": round(len(x) / a, 1), "batched_img_s": round(len(x) / b, 1),
            "speedup": round(a / b, 2), "speedup_best": round(min(per_image) / min(batched), 2),
            "repeats": len(per_image), "same": bool(torch.equal(one, many))}


def main() -> None:
    import torch

    from circuitray.data import shifts

    torch.set_num_threads(1)
    kinds = [a for a in sys.argv[1:] if not a.isdigit()] or list(shifts.CORRUPTIONS)
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or [32, 224]
    rows, t0 = [], time.time()
    for size in sizes:
        x = _images(size)
        shifts.corrupt(x[:2], "fog", 1)  # warm-up (first-call allocations, frost notice)
        print(f"\n{size} px, batch {BATCH}, severity {SEVERITY}, 1 thread: median images/s")
        print(f"  {'kind':<18} {'per image':>10} {'batched':>10} {'speedup':>8} {'(best)':>7}"
              f"  same")
        for kind in kinds:
            r = {"size": size, "kind": kind, **_measure(kind, x)}
            rows.append(r)
            print(f"  {kind:<18} {r['per_image_img_s']:>10.1f} {r['batched_img_s']:>10.1f} "
                  f"{r['speedup']:>7.2f}x {r['speedup_best']:>6.2f}x  "
                  f"{'yes' if r['same'] else 'NO'}")
        mine = [r for r in rows if r["size"] == size]
        per = sum(BATCH / r["per_image_img_s"] for r in mine)
        bat = sum(BATCH / r["batched_img_s"] for r in mine)
        print(f"  {'all kinds (time)':<18} {len(mine) * BATCH / per:>10.1f} "
              f"{len(mine) * BATCH / bat:>10.1f} {per / bat:>7.2f}x")
    print(f"\n{time.time() - t0:.0f} s")
    if set(kinds) == set(shifts.CORRUPTIONS) and set(sizes) == {32, 224}:
        out = ROOT / "bench" / "results" / "shift_batch.json"
        out.write_text(json.dumps({
            "what": "corrupt per image (seeded) vs one corrupt(seeds=) per batch, same pixels",
            "batch": BATCH, "severity": SEVERITY, "torch_threads": 1,
            "repeats": f"at least {MIN_REPEATS} and {MIN_SECONDS} s",
            "statistic": "median images/second; speedup_best from the best repeats",
            "frost": shifts.implementation_id("frost"), "torch": torch.__version__,
            "machine": f"{platform.machine()}, shared with other jobs (noisy)",
            "rows": rows}, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    if not all(r["same"] for r in rows):
        raise SystemExit("batched and per-image pixels differ")


if __name__ == "__main__":
    main()
