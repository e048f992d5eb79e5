"""Benchmark the demo zoo: training wall time and the spread of ID/OOD accuracy; corruption speed.

    .venv/bin/python bench/zoo.py                        # train conf/zoo-demo.yaml from scratch
    .venv/bin/python bench/zoo.py --existing runs/zoo    # summarize a zoo trained before
    .venv/bin/python bench/zoo.py --corruptions-only     # only time the corruptions

Targets (issue #3): ≥ 24 models in ≤ 10 minutes on the 2-core machine; OOD accuracy range
≥ 0.3; ID accuracy ≥ 0.8 for most models; at most a quarter of the zoo within 0.05 of chance.
Also times every corruption on 10,000 32-px images (one torch thread).
mimalloc is LD_PRELOADed (the process re-executes itself) when cmeel-mimalloc is installed;
Ray workers inherit it. The load average at start and end is recorded: this machine's two
cores are shared with other engineers, so wall times are upper bounds of the quiet machine's.
Results: bench/results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _mimalloc import reexec_with_mimalloc  # bench/ is sys.path[0] when run as a script

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(manifest: pd.DataFrame, chance: float = 0.1) -> dict:
    """Spread of ID/OOD accuracy, per task and overall, against the issue's targets."""
    out = {}
    groups = [("all", manifest)] + list(manifest.groupby("task"))
    for name, df in groups:
        ida, ooda = df["id_acc"].tolist(), df["ood_acc"].tolist()
        near_chance = sum(abs(a - chance) <= 0.05 for a in ooda)
        out[name] = {"n_models": len(df), "id_acc": _stats(ida), "ood_acc": _stats(ooda),
                     "ood_range": max(ooda) - min(ooda),
                     "frac_id_ge_0.8": sum(a >= 0.8 for a in ida) / len(ida),
                     "n_ood_within_0.05_of_chance": near_chance,
                     "frac_ood_within_0.05_of_chance": near_chance / len(df)}
    a = out["all"]
    out["targets"] = {"ood_range_ge_0.3": a["ood_range"] >= 0.3,
                      "id_ge_0.8_for_most": a["frac_id_ge_0.8"] > 0.5,
                      "at_most_quarter_near_chance": a["frac_ood_within_0.05_of_chance"] <= 0.25}
    return out


def time_corruptions(n: int, repeats: int) -> dict[str, float]:
    import torch

    from circuitray.data.shifts import CORRUPTIONS, corrupt

    torch.set_num_threads(1)
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    times = {}
    for kind in CORRUPTIONS:
        runs = []
        for r in range(repeats):
            t0 = time.perf_counter()
            corrupt(x, kind, 3, seed=r)
            runs.append(time.perf_counter() - t0)
        times[kind] = statistics.median(runs)
    return times


def main() -> None:
    reexec_with_mimalloc(disabled=bool(os.environ.get("CIRCUITRAY_NO_MIMALLOC")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "zoo-demo.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-zoo"))
    parser.add_argument("--existing", default=None, help="summarize this zoo folder; no training")
    parser.add_argument("--corruptions-only", action="store_true")
    parser.add_argument("--n-images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--result", default=str(ROOT / "bench" / "results" / "zoo.json"))
    args = parser.parse_args()

    import pandas as pd
    import torch

    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "torch": torch.__version__,
                                "ld_preload": os.environ.get("LD_PRELOAD", "")},
                    "loadavg_start": os.getloadavg()}
    if not args.corruptions_only:
        from circuitray.config import load_config, to_dict
        from circuitray.training import ZooConfig

        if args.existing:
            out = Path(args.existing)
            run = json.loads((out / "zoo_run.json").read_text())
            config = json.loads((out / "zoo_config.json").read_text())
        else:
            cfg = load_config(ZooConfig, args.config)
            from circuitray.runtime.zoo import train_zoo

            out = Path(args.out)
            t0 = time.perf_counter()
            train_zoo(cfg, out, reuse=False)
            run = json.loads((out / "zoo_run.json").read_text())
            run["bench_wall_seconds_incl_data_and_ray_start"] = time.perf_counter() - t0
            config = to_dict(cfg)
        manifest = pd.read_csv(out / "manifest.csv")
        every = pd.read_csv(out / "checkpoints.csv")
        result.update({
            "zoo_dir": str(out), "config": config, "run": run,
            "train_seconds_per_model": _stats(manifest["train_seconds"].tolist()),
            "n_checkpoints_incl_intermediate": len(every),
            "summary": summarize(manifest),
            "models": manifest[["checkpoint_id", "task", "rho", "lr", "epochs", "id_acc",
                                "ood_acc", "train_seconds"]].to_dict(orient="records"),
        })
        result["targets_time"] = {"n_models_ge_24": len(manifest) >= 24,
                                  "wall_le_600s": run["wall_seconds"] <= 600}
    result["corruption_seconds_10k_32px"] = time_corruptions(args.n_images, args.repeats)
    result["corruption_n_images"] = args.n_images
    result["loadavg_end"] = os.getloadavg()
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("summary", "run", "targets_time")
                      if k in result}, indent=1, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
