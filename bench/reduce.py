"""Benchmark the reduce side: circuit metrics + evaluation on a synthetic ViT-B/16 zoo.

    .venv/bin/python bench/reduce.py                      # 100 and 1,000 checkpoints
    .venv/bin/python bench/reduce.py --sizes 1000 --repeats 3

Each size runs in a fresh subprocess (so peak RSS is that size's own), with mimalloc
LD_PRELOADed when the cmeel-mimalloc wheel is installed, and BLAS/OpenMP pinned to
--threads. Edges: N checkpoints × 2 domains (id, ood) × 32,491 edges (L = 12, H = 12),
dictionary-encoded string columns as Parquet readers return them with `read_dictionary`.
Timed: depth metrics (Λ + 6 DDB variants), all 9 CSS variants, pre-deployment evaluation
of the DDB columns and post-deployment (pooled) evaluation of the CSS columns with 1,000
bootstrap replicates, and the alarm on synthetic proxy domains. Generation is not timed but
is inside the peak-memory figure. Results: bench/results/reduce.json (medians of repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _mimalloc import find_mimalloc  # bench/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic edge tables are a test fixture


def one(n_ckpt: int, n_boot: int, seed: int) -> dict:
    import numpy as np
    import pandas as pd
    from _synthetic import synthetic_edges

    from circuitray.evaluation import pre_deployment, silent_failure_alarm
    from circuitray.metrics.dense import edge_blocks
    from circuitray.metrics.depth import ddb_column, depth_metrics
    from circuitray.metrics.shift import VARIANTS, css_column, shift_scores

    rng = np.random.default_rng(seed)
    ckpts = [f"ckpt_{i:05d}" for i in range(n_ckpt)]
    slope = rng.uniform(-1.0, 2.0, n_ckpt)
    shift = np.column_stack([np.zeros(n_ckpt), rng.uniform(0.05, 1.5, n_ckpt)])
    t0 = time.perf_counter()
    edges = synthetic_edges(n_blocks=12, n_heads=12, checkpoints=ckpts, domains=["id", "ood"],
                            depth_slope=slope, shift=shift, seed=seed, dictionary=True)
    gen_s = time.perf_counter() - t0
    times = {}

    t0 = time.perf_counter()
    blocks = edge_blocks(edges)
    times["group_and_densify"] = time.perf_counter() - t0
    del blocks

    taus, targets = (0.2, 0.3), ("out", "deep", "global")
    t0 = time.perf_counter()
    depth = depth_metrics(edges, taus=taus, targets=targets)
    times["depth_metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    css = shift_scores(edges, id_domain="id", variants=VARIANTS, top_n=200)
    times["shift_scores_all_variants"] = time.perf_counter() - t0
    n_rows = edges.num_rows
    del edges

    # synthetic accuracies that the planted structure predicts (with noise)
    ddb_cols = [ddb_column(t, tau) for tau in taus for t in targets]
    css_cols = [css_column(v) for v in VARIANTS]
    ood = depth[depth.domain == "ood"].reset_index(drop=True)
    ood["ood_acc"] = np.clip(0.6 + 0.1 * slope - 0.1 * shift[:, 1]
                             + 0.05 * rng.normal(size=n_ckpt), 0, 1)
    post = css.assign(accuracy=ood["ood_acc"].to_numpy())
    t0 = time.perf_counter()
    pre_t = pre_deployment(ood, metrics=ddb_cols, n_boot=n_boot, seed=seed)
    times["pre_deployment_eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    post_t = pre_deployment(post, metrics=css_cols, target="accuracy", n_boot=n_boot,
                            seed=seed)  # pooled across models: 1 shifted domain per model
    times["post_deployment_eval"] = time.perf_counter() - t0
    proxy = pd.concat([post.assign(domain=f"proxy{k}", accuracy=np.clip(
        post.accuracy + rng.normal(0, 0.1, len(post)), 0, 1), **{
        c: post[c] * rng.uniform(0.8, 1.2, len(post)) for c in css_cols}) for k in range(5)])
    t0 = time.perf_counter()
    alarm = silent_failure_alarm(post, proxy, metrics=css_cols)
    times["alarm"] = time.perf_counter() - t0
    return {
        "n_checkpoints": n_ckpt, "n_domains": 2, "n_edges_per_circuit": 32491,
        "n_edge_rows": n_rows, "generate_s": gen_s, "times_s": times,
        "total_s": sum(times.values()),  # includes the standalone grouping pass
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "checks": {
            "depth_rows": len(depth), "css_rows": len(css),
            "ddb_out_0.3_srcc_vs_ood_acc": float(
                pre_t[(pre_t.metric == "ddb_out_0.3") & (pre_t.level == "group")].srcc.iloc[0]),
            "css_srcc_srcc_vs_acc": float(
                post_t[(post_t.metric == "css_srcc") & (post_t.level == "group")].srcc.iloc[0]),
            "alarm_rows": len(alarm),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/reduce.json"))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.n_boot, args.seed)))
        return
    import numpy as np

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    lib = find_mimalloc()
    if lib:
        env["LD_PRELOAD"] = lib
    env["PYTHONPATH"] = str(ROOT)
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        runs = []
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--one", str(size), "--n-boot", str(args.n_boot),
                   "--seed", str(args.seed + r)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"N={size} run {r}: total {runs[-1]['total_s']:.1f}s, peak "
                  f"{runs[-1]['peak_rss_gb']:.2f} GB, {runs[-1]['times_s']}", flush=True)
        med = sorted(runs, key=lambda x: x["total_s"])[len(runs) // 2]
        stage_median = {k: float(np.median([x["times_s"][k] for x in runs]))
                        for k in med["times_s"]}
        results.append({**med, "repeats": args.repeats,
                        "total_s_all_runs": [x["total_s"] for x in runs],
                        "stage_median_s": stage_median,
                        "peak_rss_gb_max": max(x["peak_rss_gb"] for x in runs)})
    report = {
        "what": "circuit metrics + evaluation on synthetic ViT-B/16 edge tables",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "threads": args.threads},
        "allocator": f"mimalloc via LD_PRELOAD={lib}" if lib else "system malloc",
        "n_boot": args.n_boot,
        "results": results,
    }
    if len(results) > 1:
        a, b = results[0], results[-1]
        report["growth"] = {
            "checkpoints": [a["n_checkpoints"], b["n_checkpoints"]],
            "time_ratio": b["total_s"] / a["total_s"],
            "size_ratio": b["n_checkpoints"] / a["n_checkpoints"],
            "per_stage_median_ratio": {
                k: b["stage_median_s"][k] / max(a["stage_median_s"][k], 1e-9)
                for k in a["stage_median_s"]},
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("growth", {}), indent=2))


if __name__ == "__main__":
    main()
