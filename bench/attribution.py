"""Benchmark: cost of EAP / EAP-IG(5) against the plain forward+backward of the same model.

Two yardsticks: a plain training step (forward+backward with parameter gradients), and the
work the method actually needs, a forward+backward with frozen parameters (gradients w.r.t.
activations only: here the input images, through a cross-entropy); the engine's target is
EAP-IG(5) <= 1.4x five frozen passes (DESIGN §2: "close to m forward+backward passes").

    .venv/bin/python bench/attribution.py                 # both shapes, CPU
    .venv/bin/python bench/attribution.py --shapes small  # just the small ViT

Times are medians of interleaved repeats in ONE process (plain, EAP, EAP-IG side by side),
so machine noise hits all variants alike. Peak memory is each variant's peak RSS
(ru_maxrss) in its own fresh subprocess, next to the process's RSS before the variant ran.
The script re-executes itself with mimalloc preloaded (LD_PRELOAD) unless --no-mimalloc.
Writes bench/results/attribution_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _mimalloc import reexec_with_mimalloc  # bench/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "small": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                  num_classes=10, batch=32),
    "vit_b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                    num_classes=1000, batch=4),
}
VARIANTS = ("plain", "eap", "eap-ig5")


def _build(shape: str):
    import timm
    import torch

    cfg = dict(SHAPES[shape])
    batch = cfg.pop("batch")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **cfg).eval()
    x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"])
    y = torch.randint(0, cfg["num_classes"], (batch,))
    return model, x, y


def _run(variant: str, model, x, y) -> None:
    import torch

    from circuitray import attribute

    if variant == "plain":  # one plain training step's forward+backward (parameter grads)
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    elif variant == "eap":
        attribute(model, [x], method="eap", device="cpu")
    elif variant == "frozen5":  # five frozen-parameter passes: activation gradients only
        model.requires_grad_(False)
        for _ in range(5):
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi), y), xi)
    else:
        attribute(model, [x], method="eap-ig-inputs", steps=5, device="cpu")


def _score_only(model, x, steps: int) -> float:
    """Seconds of the per-batch scoring alone (no dataset-level mean pass)."""
    import torch

    from circuitray.attribution import _mean_ablation, _Runner, score_batch
    from circuitray.families import adapter_for

    model.requires_grad_(False)
    runner = _Runner(adapter_for(model), torch.device("cpu"), "fp32")
    abl, _, _ = _mean_ablation(runner, [x], "mean-positional")
    t = time.perf_counter()
    score_batch(runner, x, abl, alphas=[k / steps for k in range(steps)], metric="kl")
    return time.perf_counter() - t


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _memory_child(shape: str, variant: str) -> None:
    """Run one variant once in this fresh process; print RSS before and peak RSS during it.

    The kernel's high-water mark (VmHWM) is reset just before the variant (clear_refs 5),
    so imports and model building do not mask the variant's own peak; without that reset
    it falls back to ru_maxrss (peak over the process's whole life).
    """
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model, x, y = _build(shape)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        source = "VmHWM reset before the variant"
    except OSError:
        source = "ru_maxrss over the process"
    base = _status_mib("VmRSS")
    _run(variant, model, x, y)
    peak = (_status_mib("VmHWM") if source.startswith("VmHWM")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"rss_before_mib": base, "peak_rss_mib": peak,
                      "extra_mib": peak - base, "source": source}))


def _time(shape: str, repeats: int) -> dict:
    import torch

    model, x, y = _build(shape)
    _run("plain", model, x, y)  # warm-up (allocator, kernels)
    wall: dict[str, list[float]] = {v: [] for v in [*VARIANTS, "frozen5", "score1", "score5"]}
    cpu: dict[str, list[float]] = {v: [] for v in wall}
    for _ in range(repeats):
        for v in (*VARIANTS, "frozen5"):
            t, c = time.perf_counter(), time.process_time()
            _run(v, model, x, y)
            wall[v].append(time.perf_counter() - t)
            cpu[v].append(time.process_time() - c)
        for steps in (1, 5):
            c = time.process_time()
            wall[f"score{steps}"].append(_score_only(model, x, steps))
            cpu[f"score{steps}"].append(time.process_time() - c)  # includes its mean pass
    med = {v: statistics.median(ts) for v, ts in wall.items()}
    mcpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    return {
        "batch": int(x.shape[0]), "repeats": repeats, "threads": torch.get_num_threads(),
        "plain_fwd_bwd_s": med["plain"], "eap_s": med["eap"], "eap_ig5_s": med["eap-ig5"],
        "eap_score_only_s": med["score1"], "eap_ig5_score_only_s": med["score5"],
        "frozen5_fwd_bwd_s": med["frozen5"],
        "overhead_eap_ig5_vs_5x_plain": med["eap-ig5"] / (5 * med["plain"]),
        "eap_ig5_vs_5x_frozen": med["eap-ig5"] / med["frozen5"],
        "cpu_eap_ig5_vs_5x_frozen": mcpu["eap-ig5"] / mcpu["frozen5"],
        "overhead_score_only_vs_5x_plain": med["score5"] / (5 * med["plain"]),
        "eap_ig5_over_eap": med["eap-ig5"] / med["eap"],
        "cpu_s": mcpu,
        "cpu_overhead_eap_ig5_vs_5x_plain": mcpu["eap-ig5"] / (5 * mcpu["plain"]),
        "cpu_eap_ig5_over_eap": mcpu["eap-ig5"] / mcpu["eap"],
        "all_wall_s": wall, "all_cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-mimalloc", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["BENCH_THREADS"] = str(args.threads)
    reexec_with_mimalloc(disabled=args.no_mimalloc)
    if args.child:
        _memory_child(*args.child)
        return
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    results = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "ld_preload": os.environ.get("LD_PRELOAD"),
               "gpu": "not measured: no GPU lent to this session", "shapes": {}}
    for shape in args.shapes:
        row = {"config": SHAPES[shape], **_time(shape, args.repeats)}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", shape, v],
                                 capture_output=True, text=True, check=True, env=os.environ)
            row[f"memory_{v}"] = json.loads(out.stdout.strip().splitlines()[-1])
        p, e = row["memory_plain"]["peak_rss_mib"], row["memory_plain"]["extra_mib"]
        for v, key in (("eap", "eap"), ("eap-ig5", "eap_ig5")):
            row[f"peak_ratio_{key}_vs_plain"] = row[f"memory_{v}"]["peak_rss_mib"] / p
            row[f"extra_ratio_{key}_vs_plain"] = row[f"memory_{v}"]["extra_mib"] / e
        results["shapes"][shape] = row
    out = ROOT / "bench" / "results" / "attribution_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    hdr = (f"{'shape':8} {'batch':>5} {'plain s':>8} {'EAP s':>8} {'IG5 s':>8} "
           f"{'IG5/5plain':>10} {'IG5/5frz':>8} {'score/5pl':>9} {'IG5/EAP':>7} {'peak plain':>10} "
           f"{'peak EAP':>9} {'peak IG5':>9} {'extra IG5/plain':>15}")
    print(f"LD_PRELOAD={results['ld_preload']}  threads={args.threads} (torch reports "
          f"{torch.get_num_threads()}; a Ray task runs at resources.torch_threads=1)  "
          f"torch {torch.__version__}")
    print("wall-clock medians (CPU-time ratios in the JSON: cpu_overhead_*, robust to load)")
    print(hdr)
    for shape, r in results["shapes"].items():
        print(f"{shape:8} {r['batch']:>5} {r['plain_fwd_bwd_s']:>8.3f} {r['eap_s']:>8.3f} "
              f"{r['eap_ig5_s']:>8.3f} {r['overhead_eap_ig5_vs_5x_plain']:>10.3f} "
              f"{r['eap_ig5_vs_5x_frozen']:>8.3f} "
              f"{r['overhead_score_only_vs_5x_plain']:>9.3f} {r['eap_ig5_over_eap']:>7.2f} "
              f"{r['memory_plain']['peak_rss_mib']:>9.0f}M "
              f"{r['memory_eap']['peak_rss_mib']:>8.0f}M "
              f"{r['memory_eap-ig5']['peak_rss_mib']:>8.0f}M "
              f"{r['extra_ratio_eap_ig5_vs_plain']:>15.2f}")
        print(f"{'  cpu-s':8} {'':>5} {r['cpu_s']['plain']:>8.3f} {r['cpu_s']['eap']:>8.3f} "
              f"{r['cpu_s']['eap-ig5']:>8.3f} {r['cpu_overhead_eap_ig5_vs_5x_plain']:>10.3f} "
              f"{r['cpu_eap_ig5_vs_5x_frozen']:>8.3f} {'':>9} {r['cpu_eap_ig5_over_eap']:>7.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
