"""Parity of circuitray's torch corruptions with the reference `imagecorruptions` 1.1.2.

For every kind x severity, at 224 px and 32 px, on four photographs from scikit-image's data:
the mean |corrupted - clean| (in [0, 1] units) of ours and of the reference, and their ratio.
Both sides use ImageNet-C's constants (the reference has no CIFAR-10-C ones); the draws that
decide most of the magnitude are pinned to the same values (see
tests/_reference_corruptions.mean_abs_change). Needs the dev extra (pip install '.[dev]').

    python bench/corruptions.py            # prints the table, writes bench/results/corruptions.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    import _reference_corruptions as ref

    from circuitray.data import shifts

    if ref.load() is None:
        raise SystemExit("imagecorruptions is not installed: pip install '.[dev]'")
    kinds = [a for a in sys.argv[1:] if not a.isdigit()] or list(shifts.CORRUPTIONS)
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or [224, 32]
    rows, t0 = [], time.time()
    for size in sizes:
        images = ref.sample_images(size)
        print(f"\n{size} px  {'kind':<18} sev    ours     ref   ratio")
        for kind in kinds:
            for sev in range(1, 6):
                ours, theirs = ref.mean_abs_change(kind, sev, images)
                ratio = ours / theirs if theirs else float("nan")
                flag = "" if abs(ratio - 1) <= 0.02 else "  <-- off by more than 2%"
                print(f"        {kind:<18} {sev}  {ours:.4f}  {theirs:.4f}  {ratio:.3f}{flag}")
                rows.append({"size": size, "kind": kind, "severity": sev,
                             "ours": round(ours, 5), "reference": round(theirs, 5),
                             "ratio": round(ratio, 4)})
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    print(f"\n{len(rows)} cells, {sum(abs(r['ratio'] - 1) <= 0.02 for r in rows)} within 2%; "
          f"worst {worst['kind']} s{worst['severity']} at {worst['size']} px: {worst['ratio']}; "
          f"{time.time() - t0:.0f} s")
    if set(kinds) == set(shifts.CORRUPTIONS) and set(sizes) == {224, 32}:
        out = ROOT / "bench" / "results" / "corruptions.json"
        out.write_text(json.dumps({"reference": "imagecorruptions 1.1.2 (patched, float output)",
                                   "frost": shifts.implementation_id("frost"),
                                   "images": "skimage.data astronaut, coffee, chelsea, rocket",
                                   "rows": rows}, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
