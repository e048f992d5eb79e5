"""Fault scenarios, end to end, on the tiny job: what survives, what is lost, what is redone.

    .venv/bin/python bench/faults.py [--out runs/bench-faults] [--only NAME ...]

Every scenario runs the real CLI (`python -m circuitray.cli run|reduce conf/tiny.yaml ...`)
as a subprocess on 2 random-weight checkpoints × 6 domains, injects one fault, then runs the
job again as a user would and checks the result against a clean, undisturbed run:

  outcome      what the faulty run and the recovery run ended with (exit codes, first error)
  lost         planned domains not complete after recovery (a failed checkpoint counts)
  duplicated   (checkpoint, domain) rows that appear twice in metrics/domains.parquet, plus
               temporaries left behind
  recomputed   domains the recovery run computed (from discover's summary line)
  = clean      the edge and output files after recovery are byte-identical to the clean run's

Prints a table and writes bench/results/faults.json. Needs root for the tmpfs disk-full
scenario (else it uses a read-only folder and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CONF = REPO / "conf" / "tiny.yaml"
FAST = ["reduce.n_boot=20", "reduce.figures=false"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@dataclass
class Row:
    scenario: str
    outcome: str
    lost: int
    duplicated: int
    recomputed: int
    same_as_clean: bool


def _cmd(stage: str, manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "circuitray.cli", stage, str(CONF), f"manifest={manifest}",
            f"output_dir={out}", *FAST, *extra]


def _run(stage: str, manifest: Path, out: Path, *extra: str) -> tuple[int, str]:
    proc = subprocess.run(_cmd(stage, manifest, out, *extra), env=ENV, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    return proc.returncode, proc.stderr


def _start(stage: str, manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(stage, manifest, out, *extra), env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                            start_new_session=True)


def _wait_for(pred: Callable[[], bool], timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if "error:" in line:
            return line.split("error:", 1)[1].strip()[:90]
    return ""


def _computed(stderr: str) -> int:
    found = re.findall(r"\((\d+) domains computed\)", stderr)
    return int(found[-1]) if found else 0


def _edge_and_output_checksums(out: Path) -> dict[str, str]:
    from circuitray.runtime.files import checksum_file

    return {str(p.relative_to(out)): checksum_file(p) for folder in ("edges", "outputs")
            for p in (out / folder).rglob("*.parquet")}


def _measure(name: str, outcome: str, manifest: Path, out: Path, stderr: str,
             clean: dict[str, str]) -> Row:
    import pandas as pd

    from circuitray.job_config import load_job_config
    from circuitray.runtime.plan import plan_job

    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={out}", *FAST])
    plan = plan_job(cfg, validate_images=False)
    lost = sum(not d.complete for c in plan.checkpoints for d in c.domains)
    dup = len(list(out.rglob("*.tmp")))
    table = out / "metrics" / "domains.parquet"
    if table.exists():
        dup += int(pd.read_parquet(table).duplicated(["task", "checkpoint", "domain"]).sum())
    same = _edge_and_output_checksums(out) == clean
    return Row(name, outcome, lost, dup, _computed(stderr), same)


# ------------------------------------------------------------------ scenarios


def _worker_pids(out: Path) -> list[int]:
    pids = []
    for f in (out / "running").glob("*.json") if (out / "running").is_dir() else []:
        try:
            pids.append(int(json.loads(f.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def driver_sigkill(manifest: Path, out: Path, clean: dict[str, str], *,
                   workers_too: bool) -> Row:
    """Kill the driver (and the local Ray it started) once a domain is written; with
    `workers_too` also the workers (orphaned Ray workers otherwise finish their task)."""
    proc = _start("run", manifest, out)
    _wait_for(lambda: any((out / "outputs").rglob("*.parquet")) if (out / "outputs").exists()
              else False)
    victims = _worker_pids(out) if workers_too else []
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()
    time.sleep(2)  # let orphans (if any) finish or die before the user re-runs
    code, err = _run("run", manifest, out)
    name = "driver + workers SIGKILL mid-discover" if workers_too else \
        "driver SIGKILL mid-discover"
    return _measure(name, f"killed; rerun exit {code}", manifest, out, err, clean)


def worker_sigkill(manifest: Path, out: Path, clean: dict[str, str]) -> Row:
    proc = _start("run", manifest, out)
    running = out / "running"
    killed = _wait_for(lambda: running.is_dir() and any(running.glob("*.json"))
                       and any((out / "outputs").rglob("*.parquet")))
    if killed:
        for f in running.glob("*.json"):
            try:
                os.kill(json.loads(f.read_text())["pid"], signal.SIGKILL)
                break
            except (OSError, ValueError, KeyError):
                continue
    _, err = proc.communicate(timeout=600)
    return _measure("worker SIGKILL", f"same run exit {proc.returncode} (Ray retried)",
                    manifest, out, err, clean)


def reduce_kill(manifest: Path, out: Path, clean: dict[str, str], base: Path) -> Row:
    shutil.copytree(base, out)
    proc = _start("reduce", manifest, out, "--force")
    _wait_for(lambda: (out / "metrics" / "domains.parquet").exists()
              and (out / "metrics" / "domains.parquet").stat().st_mtime
              > (base / "metrics" / "domains.parquet").stat().st_mtime)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code, err = _run("run", manifest, out)
    stale = _mlflow_running(out)
    return _measure("kill during reduce",
                    f"killed; rerun exit {code}; MLflow runs left RUNNING: {stale}",
                    manifest, out, err, clean)


def _mlflow_running(out: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return sum(r.info.status == "RUNNING" for r in client.search_runs(exps))


def damaged_file(manifest: Path, out: Path, clean: dict[str, str], base: Path,
                 how: str) -> Row:
    from circuitray.runtime.layout import JobLayout

    shutil.copytree(base, out)
    victim = JobLayout.of(out).edges_file("toy", "ckpt0", "ood")
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim.unlink()
    code_r, err_r = _run("reduce", manifest, out, "--force")
    named = str(victim) in err_r
    code, err = _run("run", manifest, out)
    return _measure(f"{how}d domain file",
                    f"reduce exit {code_r}{' naming it' if named else ''}; run exit {code}",
                    manifest, out, err, clean)


def changed_settings(manifest: Path, out: Path, clean: dict[str, str], base: Path) -> Row:
    shutil.copytree(base, out)
    code, err = _run("run", manifest, out, "attribution.method=eap")
    said = "attribution.method changed" in err
    code2, err2 = _run("run", manifest, out)  # and back: recomputed again, equal to clean
    return _measure("changed settings (eap, then back)",
                    f"exit {code}, {_computed(err)} redone{', plan says why' if said else ''}; "
                    f"back: exit {code2}",
                    manifest, out, err + err2, clean)


def concurrent_job(manifest: Path, out: Path, clean: dict[str, str]) -> Row:
    first = _start("run", manifest, out)
    _wait_for(lambda: (out / "running").is_dir())
    code2, err2 = _run("run", manifest, out)
    _, err1 = first.communicate(timeout=600)
    msg = _first_error(err2)
    return _measure("concurrent job on the same output_dir",
                    f"second exit {code2} ({msg[:50]}); first exit {first.returncode}",
                    manifest, out, err1, clean)


def disk_full(manifest: Path, out: Path, clean: dict[str, str]) -> Row:
    out.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(out)],
                             capture_output=True).returncode == 0
    try:
        if not mounted:
            out.chmod(0o555)
        code, err = _run("run", manifest, out)
        msg = _first_error(err)
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        else:
            out.chmod(0o755)
        code2, err2 = _run("run", manifest, out)
        after = f"exit {code2}" + (f" ({_first_error(err2)[:60]})" if code2 else "")
        row = _measure("disk full (600 KiB tmpfs)" if mounted else "read-only output_dir",
                       f"exit {code} ({msg[:50]}); after space: {after}", manifest, out,
                       err2, clean)
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], capture_output=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-faults"))
    parser.add_argument("--only", nargs="*", help="scenario function names to run")
    args = parser.parse_args()
    from _jobdata import write_checkpoints

    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    manifest = write_checkpoints(root / "zoo", 2, n_per_class=16)
    base = root / "clean"
    code, err = _run("run", manifest, base)
    if code != 0:
        print(err, file=sys.stderr)
        return 1
    clean = _edge_and_output_checksums(base)
    scenarios: dict[str, Callable[[Path], Row]] = {
        "driver_sigkill": lambda o: driver_sigkill(manifest, o, clean, workers_too=False),
        "crash_sigkill": lambda o: driver_sigkill(manifest, o, clean, workers_too=True),
        "worker_sigkill": lambda o: worker_sigkill(manifest, o, clean),
        "reduce_kill": lambda o: reduce_kill(manifest, o, clean, base),
        "truncated": lambda o: damaged_file(manifest, o, clean, base, "truncate"),
        "deleted": lambda o: damaged_file(manifest, o, clean, base, "delete"),
        "changed_settings": lambda o: changed_settings(manifest, o, clean, base),
        "concurrent_job": lambda o: concurrent_job(manifest, o, clean),
        "disk_full": lambda o: disk_full(manifest, o, clean),
    }
    rows = []
    for name, fn in scenarios.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        rows.append(fn(root / name))
        print(f"[faults] {name}: {time.perf_counter() - start:.0f}s", file=sys.stderr,
              flush=True)
    head = f"{'scenario':<40}{'lost':>5}{'dup':>5}{'redone':>7}{'=clean':>7}  outcome"
    print(head)
    for r in rows:
        print(f"{r.scenario:<40}{r.lost:>5}{r.duplicated:>5}{r.recomputed:>7}"
              f"{'yes' if r.same_as_clean else 'NO':>7}  {r.outcome}")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "faults.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
