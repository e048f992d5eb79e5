"""Benchmark of the job: discover throughput with 1 vs 2 Ray workers, on a local folder vs an
S3 API, and the demo end to end.

    .venv/bin/python bench/pipeline.py [--checkpoints 8] [--repeats 3] [--demo] [--storage]
                                       [--no-mimalloc]

Discover: N demo-sized ViTs (32 px, patch 8, dim 64, depth 8, 4 heads; random weights, the
cost does not depend on the weights) × 4 domains (ID, OOD, one shift, one proxy), 128
examples each, EAP-IG(5) on 64. Each worker count gets a fresh local Ray whose workers are
warmed up first (imports), so the numbers are the stage's steady throughput; every repeat
writes a fresh output folder (nothing skipped). The demo (with --demo) runs `circuitray demo`
with the zoo reused, so its time is the pipeline's. Storage (with --storage): the same
discover with `output_dir` on a local folder and on `s3://` served by moto's S3 server (a
separate process on 127.0.0.1), interleaved repeat by repeat on one warmed 2-worker Ray
(target: S3 throughput >= 0.9x the folder's). mimalloc is LD_PRELOADed into the driver
and every Ray worker unless --no-mimalloc. Medians are reported; JSON -> bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _mimalloc import reexec_with_mimalloc  # bench/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

DEMO_ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 8, "num_heads": 4}


def _discover_once(manifest: Path, out: Path | str, task_cpus: int) -> float:
    from circuitray.job_config import load_job_config
    from circuitray.runtime.discover import run_discover

    cfg = load_job_config(None, [
        f"manifest={manifest}", f"output_dir={out}", "data.limit=128",
        "data.attribution_limit=64", "data.batch_size=64", "data.shift_kinds=[gaussian_noise]",
        "data.shift_severities=[3]", "data.proxy_kinds=[brightness]",
        "data.proxy_severities=[3]", "attribution.steps=5", f"resources.num_cpus={task_cpus}",
        "resources.torch_threads=1", "tracking.enabled=false"])
    if isinstance(out, Path):
        shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = run_discover(cfg)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"benchmark checkpoints failed: {summary.failed}")
    return seconds


def _warm(workers: int) -> None:
    import ray

    @ray.remote(num_cpus=1)
    def imports() -> int:
        import timm  # noqa: F401

        import circuitray.attribution  # noqa: F401
        import circuitray.data.datasets  # noqa: F401
        import circuitray.outputs  # noqa: F401

        time.sleep(1.0)  # hold the slot so every worker process gets started
        return os.getpid()

    ray.get([imports.remote() for _ in range(workers)])


def bench_discover(n_ckpt: int, repeats: int, root: Path) -> dict:
    """1 vs 2 workers: a fresh local Ray of 1 or 2 CPUs per measurement, warmed first,
    the two settings interleaved repeat by repeat (both see the same background load).

    Separate Rays, not one Ray with 2-CPU tasks standing in for "1 worker": a worker that
    once ran a 2-CPU task stayed ~1.3x slower for later 1-CPU tasks here (measured).
    """
    import ray
    from _jobdata import write_checkpoints

    manifest = write_checkpoints(root / "fixture", n_ckpt, arch_kwargs=DEMO_ARCH,
                                 n_per_class=64)
    times: dict[int, list[float]] = {1: [], 2: []}
    loads: dict[int, list[float]] = {1: [], 2: []}
    for i in range(repeats):
        for workers in (1, 2):
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     log_to_driver=False)
            try:
                _warm(workers)
                t = _discover_once(manifest, root / f"out-{workers}-{i}", 1)
            finally:
                ray.shutdown()
            times[workers].append(t)
            loads[workers].append(os.getloadavg()[0])
            print(f"repeat {i}: {workers} worker(s) {t:.1f} s (load {loads[workers][-1]:.1f})",
                  flush=True)
    results = {}
    for workers in (1, 2):
        med = statistics.median(times[workers])
        results[workers] = {"seconds": times[workers], "median_s": med,
                            "checkpoints_per_hour": 3600 * n_ckpt / med,
                            "load_avg_1min_after_each": loads[workers]}
        print(f"discover, {workers} worker(s): median {med:.1f} s, "
              f"{3600 * n_ckpt / med:.0f} checkpoints/hour", flush=True)
    speedup = results[1]["median_s"] / results[2]["median_s"]
    print(f"speedup 2 vs 1 workers: {speedup:.2f}x (target >= 1.7x)", flush=True)
    return {"checkpoints": n_ckpt, "domains_per_checkpoint": 4, "examples_per_domain": 128,
            "attributed_per_domain": 64, "method": "eap-ig-inputs", "steps": 5,
            "arch_kwargs": DEMO_ARCH, "repeats": repeats, "workers": results,
            "speedup_2_vs_1": speedup}


def _s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server as its own process on a free loopback port, and the AWS_* variables
    that point pyarrow, boto3 and the Ray workers (started later, they inherit them) at it."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    return proc, env


def bench_storage(n_ckpt: int, repeats: int, root: Path) -> dict:
    """Discover with output_dir on a local folder vs on S3 (moto), same warmed 2-worker Ray,
    interleaved repeat by repeat; every repeat writes a fresh folder / prefix."""
    import boto3
    import ray
    from _jobdata import write_checkpoints

    proc, env = _s3_server()
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        manifest = write_checkpoints(root / "fixture", n_ckpt, arch_kwargs=DEMO_ARCH,
                                     n_per_class=64)
        times: dict[str, list[float]] = {"folder": [], "s3": []}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            _warm(2)
            for i in range(repeats):
                for where in ("folder", "s3") if i % 2 == 0 else ("s3", "folder"):
                    out = root / f"out-folder-{i}" if where == "folder" else f"s3://bench/out-{i}"
                    times[where].append(_discover_once(manifest, out, 1))
                    print(f"repeat {i}: {where} {times[where][-1]:.1f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            ray.shutdown()
    finally:
        proc.terminate()
        proc.wait(10)
    med = {w: statistics.median(t) for w, t in times.items()}
    ratio = med["folder"] / med["s3"]
    print("\n| output_dir | median s | checkpoints/hour |\n|---|---|---|", flush=True)
    for where in ("folder", "s3"):
        print(f"| {where} | {med[where]:.1f} | {3600 * n_ckpt / med[where]:.0f} |", flush=True)
    print(f"S3 throughput vs folder: {ratio:.2f}x (target >= 0.9x)", flush=True)
    return {"checkpoints": n_ckpt, "repeats": repeats, "workers": 2,
            "server": "moto_server (separate process, 127.0.0.1)",
            "seconds": times, "median_s": med,
            "checkpoints_per_hour": {w: 3600 * n_ckpt / m for w, m in med.items()},
            "s3_vs_folder_throughput": ratio}


def bench_demo(root: Path, zoo_out: str) -> dict:
    """`circuitray demo` into a fresh job folder with the zoo reused: the pipeline's time."""
    job = REPO / "runs" / "demo" / "job-bench"
    shutil.rmtree(job, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "circuitray"), "demo", "--zoo-out", zoo_out,
           f"output_dir={job}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (root / "demo.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "seconds": seconds, "tail": (proc.stdout + proc.stderr)[-2000:]}
    zoo = [ln for ln in proc.stdout.splitlines() if ln.startswith("zoo ")]
    disc = [ln for ln in proc.stderr.splitlines() if ln.startswith("discover: ")]
    red = [ln for ln in proc.stderr.splitlines() if ln.startswith("[reduce] ") and " in " in ln]
    return {"ok": True, "zoo_dir": zoo_out, "seconds_total": seconds,
            "timing_line": zoo[-1] if zoo else "", "discover_line": disc[-1] if disc else "",
            "reduce_line": red[-1] if red else "", "load_avg_after": os.getloadavg(),
            "report": proc.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="also time `circuitray demo`")
    parser.add_argument("--zoo-out", default="runs/zoo-demo", help="the trained zoo to reuse")
    parser.add_argument("--skip-discover", action="store_true",
                        help="keep the discover numbers already in --out")
    parser.add_argument("--storage", action="store_true",
                        help="also time discover on a local folder vs S3 (moto server)")
    parser.add_argument("--no-mimalloc", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline.json"))
    args = parser.parse_args()
    reexec_with_mimalloc(disabled=args.no_mimalloc)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = REPO / "runs" / "bench-pipeline"
    root.mkdir(parents=True, exist_ok=True)
    import torch

    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": torch.cuda.is_available(),
                    "note": "2 cores shared with other engineers' jobs during the run; "
                            "no GPU was lent to this session"},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    })
    if not args.skip_discover:
        report["discover"] = bench_discover(args.checkpoints, args.repeats, root)
    if args.storage:
        report["storage"] = bench_storage(args.checkpoints, args.repeats, root)
    if args.demo:
        report["demo"] = bench_demo(root, args.zoo_out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
