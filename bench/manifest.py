"""How fast `circuitray manifest` scans a zoo of timm training runs.

    .venv/bin/python bench/manifest.py [--runs 100] [--epochs 10] [--out runs/bench-manifest]

Writes `--runs` training folders the way timm's train.py does (`CheckpointSaver`: one
`checkpoint-<epoch>.pth.tar` per epoch with optimizer state and EMA weights, `last.pth.tar`,
`model_best.pth.tar`, `args.yaml`, `summary.csv`), then times `manifest_scan.scan` over the
whole tree, twice (the second pass reads from the page cache, as a re-scan would). The
target (issue 9) is 1,000 checkpoints in at most 30 s, reading metadata and tensor shapes
without loading every tensor. Results go to bench/results/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = "vit_tiny_patch16_224"
# a small ViT so that 1,000 checkpoints (with optimizer state and EMA) fit in ~1.5 GB
MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}


def write_run(folder: Path, epochs: int, seed: int) -> None:
    """One timm-style training run: CheckpointSaver files, args.yaml and summary.csv."""
    import timm
    import yaml
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3, update_summary

    torch.manual_seed(seed)
    args = Namespace(model=ARCH, model_kwargs=dict(MODEL_KWARGS), num_classes=10, img_size=32,
                     lr=1e-3 * (1 + seed % 3), weight_decay=0.05, epochs=epochs, opt="adamw",
                     batch_size=64, mixup=0.0, cutmix=0.0, smoothing=0.1, seed=seed,
                     drop_path=0.1, mean=[0.5] * 3, std=[0.25] * 3, crop_pct=1.0,
                     interpolation="bicubic", checkpoint_hist=epochs, model_ema=True)
    model = timm.create_model(ARCH, num_classes=10, **MODEL_KWARGS)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # optimizer state exists, as in a real run
    ema = ModelEmaV3(model, decay=0.9)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.yaml").write_text(yaml.safe_dump(vars(args)))
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder),
                            max_history=epochs)
    for epoch in range(epochs):
        top1 = 10.0 + 80.0 * (epoch + 1) / epochs
        update_summary(epoch, {"loss": 1.0 / (epoch + 1)}, {"top1": top1, "top5": 100.0},
                       str(folder / "summary.csv"), write_header=epoch == 0)
        saver.save_checkpoint(epoch, metric=top1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-manifest"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from circuitray.manifest_scan import scan

    root = Path(args.out).resolve()
    start = time.perf_counter()
    for i in range(args.runs):
        folder = root / f"run{i:04d}"
        if not (folder / "last.pth.tar").exists():
            write_run(folder, args.epochs, seed=i)
    build_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in root.rglob("*.pth.tar"))
    times, result = [], None
    for _ in range(2):
        start = time.perf_counter()
        result = scan([root], task="bench")
        times.append(time.perf_counter() - start)
    assert result is not None
    n = len(result.rows)
    row = {"runs": args.runs, "checkpoints": n, "unreadable": len(result.unreadable),
           "files_gb": round(size / 1e9, 2), "build_s": round(build_s, 1),
           "scan_first_s": round(times[0], 2), "scan_again_s": round(times[1], 2),
           "ms_per_checkpoint": round(1000 * statistics.median(times) / max(n, 1), 2),
           "threads": torch.get_num_threads()}
    print(f"{'runs':>6}{'ckpts':>7}{'GB':>6}{'first scan s':>14}{'re-scan s':>11}"
          f"{'ms/ckpt':>9}")
    print(f"{row['runs']:>6}{n:>7}{row['files_gb']:>6}{row['scan_first_s']:>14}"
          f"{row['scan_again_s']:>11}{row['ms_per_checkpoint']:>9}")
    if result.unreadable:
        print(f"unreadable: {result.unreadable[:3]}", file=sys.stderr)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
