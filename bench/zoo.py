"""Benchmark the demo zoo: training wall time and the spread of ID/OOD accuracy; corruption speed.

    .venv/bin/python bench/zoo.py                        # train conf/zoo-demo.yaml from scratch
    .venv/bin/python bench/zoo.py --existing runs/zoo    # summarize a zoo trained before
    .venv/bin/python bench/zoo.py --corruptions-only     # only time the corruptions

Targets (issue #10, the paper-like zoo of conf/zoo-demo.yaml): per task ≥ 48 fine-tuned
models, OOD accuracy range ≥ 0.3 and no model within 0.05 of chance (1/num_classes); the
backbone pretrains in ≤ 4 minutes; the whole demo (zoo + pipeline, `circuitray demo`) in
≤ 20 minutes. Also printed: how many distinct fine-tuning regimes reach the top and the
bottom OOD quartile of each task (a spread that one regime alone explains is weak evidence).
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


def _quartile_regimes(df: pd.DataFrame, top: bool) -> list[str]:
    q = df["ood_acc"].quantile(0.75 if top else 0.25)
    part = df[df["ood_acc"] >= q] if top else df[df["ood_acc"] <= q]
    return sorted(part["regime"].astype(str).unique())


def summarize(manifest: pd.DataFrame, min_models: int = 48) -> dict:
    """Spread of ID/OOD accuracy per task against issue #10's targets."""
    if "regime" not in manifest:
        manifest = manifest.assign(regime="scratch")
    out = {}
    for name, df in manifest.groupby("task"):
        chance = 1.0 / float(df["num_classes"].iloc[0])
        ida, ooda = df["id_acc"].tolist(), df["ood_acc"].tolist()
        near = int(sum(abs(a - chance) <= 0.05 for a in ooda))
        top, bottom = _quartile_regimes(df, True), _quartile_regimes(df, False)
        out[name] = {"n_models": len(df), "chance": chance, "id_acc": _stats(ida),
                     "ood_acc": _stats(ooda), "ood_range": max(ooda) - min(ooda),
                     "n_ood_within_0.05_of_chance": near,
                     "regimes_in_top_quartile": top, "regimes_in_bottom_quartile": bottom,
                     "targets": {f"n_models_ge_{min_models}": len(df) >= min_models,
                                 "ood_range_ge_0.3": max(ooda) - min(ooda) >= 0.3,
                                 "none_near_chance": near == 0}}
    return out


def print_table(summary: dict, run: dict, pretrain_s: float | None) -> None:
    """The spread per task as a table (the JSON in bench/results holds every model)."""
    head = f"{'task':20} {'n':>3} {'id med':>6} {'ood min':>7} {'ood max':>7} {'range':>5} " \
           f"{'chance':>6} {'near':>4}  regimes top / bottom quartile"
    print(head)
    for task, t in summary.items():
        print(f"{task:20} {t['n_models']:3d} {t['id_acc']['median']:6.3f} "
              f"{t['ood_acc']['min']:7.3f} {t['ood_acc']['max']:7.3f} {t['ood_range']:5.2f} "
              f"{t['chance']:6.3f} {t['n_ood_within_0.05_of_chance']:4d}  "
              f"{len(t['regimes_in_top_quartile'])} {t['regimes_in_top_quartile']} / "
              f"{len(t['regimes_in_bottom_quartile'])} {t['regimes_in_bottom_quartile']}")
        failed = [k for k, ok in t["targets"].items() if not ok]
        print(f"{'':20} targets: {'all met' if not failed else 'NOT met: ' + ', '.join(failed)}")
    pre = f", backbone pretraining {pretrain_s:.0f}s (target <= 240s)" if pretrain_s else ""
    print(f"zoo wall {run['wall_seconds']:.0f}s for {run['trained']} trained, "
          f"{run['reused']} reused{pre}")


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
        curves = sorted((out / "backbone").glob("*.curve.csv"))
        pretrain_s = float(pd.read_csv(curves[0])["seconds"].iloc[-1]) if curves else None
        result.update({
            "zoo_dir": str(out), "config": config, "run": run,
            "train_seconds_per_model": _stats(manifest["train_seconds"].tolist()),
            "n_checkpoints_incl_intermediate": len(every),
            "summary": summarize(manifest), "pretrain_seconds": pretrain_s,
            "models": manifest[[c for c in ("checkpoint_id", "task", "regime", "rho", "lr",
                                            "epochs", "id_acc", "ood_acc", "train_seconds")
                                if c in manifest]].to_dict(orient="records"),
        })
        result["targets_time"] = {"pretrain_le_240s": pretrain_s is not None
                                  and pretrain_s <= 240}
    result["corruption_seconds_10k_32px"] = time_corruptions(args.n_images, args.repeats)
    result["corruption_n_images"] = args.n_images
    result["loadavg_end"] = os.getloadavg()
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    if "summary" in result:
        print_table(result["summary"], result["run"], result["pretrain_seconds"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
