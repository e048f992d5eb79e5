"""The whole job: discover then reduce, and the paper-style result table it prints.

Shared by `jobs/pipeline.py` (what `ray job submit` runs), `circuitray run` and
`circuitray demo`, so the three cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from circuitray.config import to_dict
from circuitray.errors import OutputError, os_error_is_permanent
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime.discover import DiscoverSummary, run_discover
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.lock import JobLock
from circuitray.runtime.outputdir import check_output_dir
from circuitray.runtime.reduce import NEAR_CHANCE, ReduceResult, run_reduce
from circuitray.tables import FAILURE_SCHEMA, read_parquet_or_empty

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class PipelineResult:
    config: JobConfig
    discover: DiscoverSummary | None
    reduce: ReduceResult | None


def run_pipeline(cfg: JobConfig, *, force_reduce: bool = False) -> PipelineResult:
    """Run the configured stages; the resolved config is saved beside the tables.

    Before Ray starts: the output folder is checked (a URI, a file or an unwritable folder
    is refused, naming it) and locked against a second job. A full disk or an unwritable
    subfolder stops the job with OutputError naming the path; what was complete stays
    complete, so a re-run resumes.
    """
    root = check_output_dir(cfg.output_dir)
    cfg = dataclasses.replace(cfg, output_dir=str(root))
    layout = JobLayout.of(root)
    with JobLock(root, cfg.name), _sigterm_exits():
        try:
            _write_text_atomic(layout.root / "config.yaml",
                               yaml.safe_dump(to_dict(cfg), sort_keys=False))
            print(f"[circuitray] job '{cfg.name}': manifest {cfg.manifest} -> {layout.root}",
                  file=sys.stderr, flush=True)
            disc = run_discover(cfg) if "discover" in cfg.stages else None
            if disc is not None:
                _stop_on_output_errors(layout, disc)
            red = run_reduce(cfg, force=force_reduce) if "reduce" in cfg.stages else None
        except OSError as exc:  # a write outside tables.py: name the path, not a traceback
            if not os_error_is_permanent(exc):
                raise
            raise OutputError.from_os_error(exc.filename or layout.root, exc) from exc
    return PipelineResult(cfg, disc, red)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError.from_os_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _stop_on_output_errors(layout: JobLayout, disc: DiscoverSummary) -> None:
    """Checkpoints that failed because their tables could not be written (disk full,
    read-only) are not the checkpoints' fault: stop before reduce instead of reporting them
    as bad checkpoints. Complete ones keep their markers, so a re-run resumes."""
    if not disc.failed:
        return
    failures = read_parquet_or_empty(layout.failures, FAILURE_SCHEMA).to_pandas()
    bad = failures[failures.checkpoint.isin(disc.failed)
                   & (failures.error_type == "OutputError")]
    if bad.empty:
        return
    first = str(bad.error.iloc[0]).splitlines()[0]
    raise OutputError(layout.root, f"{len(bad)} checkpoint(s) could not write their tables "
                                   f"({first}); fix that and run again: complete checkpoints "
                                   "are kept")


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (`ray job stop`, a scheduler's kill) raises SystemExit, so the lock is released
    and the MLflow run is marked KILLED on the way out (Ray's driver does the same)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """`python jobs/pipeline.py conf/X.yaml [key=value ...] [--force-reduce]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="job config YAML (conf/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.limit=64")
    parser.add_argument("--force-reduce", action="store_true",
                        help="recompute the reduce stage even if its inputs are unchanged")
    args = parser.parse_intermixed_args(argv)
    cfg = load_job_config(args.config, args.overrides)
    result = run_pipeline(cfg, force_reduce=args.force_reduce)
    if result.reduce is not None and not result.reduce.skipped:
        print(format_report(result.reduce.frames))
    failed = result.discover.failed if result.discover else []
    print(f"[circuitray] done: tables under {cfg.output_dir}"
          + (f"; {len(failed)} checkpoint(s) failed, see failures/" if failed else ""))
    return 0


# ---------------------------------------------------------------- the paper-style table


def _cell(row: pd.Series, stat: str) -> str:
    v, lo, hi = row.get(stat), row.get(f"{stat}_lo"), row.get(f"{stat}_hi")
    if v is None or not np.isfinite(v):
        return "n/a"
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{lo:+.2f},{hi:+.2f}]"


def _count(row: pd.Series) -> str:
    n = row.get("n")
    return f"{int(n)}" if n is not None and np.isfinite(n) else "-"


def _stat_block(table: pd.DataFrame, title: str, paper: dict[str, float]) -> list[str]:
    """One line per metric: its statistics, n (the points that entered them) and the paper's
    composite; a metric whose n is below the others' lost points to NaN (see `reason`)."""
    head = (f"  {'metric':<22}{'n':>5}{'R² (signed)':>22}{'SRCC':>22}{'KRCC':>22}"
            f"{'composite':>22}{'paper':>8}")
    lines = [title, head]
    for _, row in table.sort_values("composite", ascending=False,
                                    na_position="last").iterrows():
        ref = paper.get(row["metric"])
        lines.append(f"  {row['metric']:<22}{_count(row):>5}" + "".join(
            f"{_cell(row, s):>22}" for s in ("r2_signed", "srcc", "krcc", "composite"))
            + (f"{ref:>8.3f}" if ref is not None else f"{'':>8}")
            + (f"  ({row['reason']})" if isinstance(row.get("reason"), str) and row["reason"]
               else ""))
    return lines


def _n(part: pd.DataFrame) -> int:
    return int(part["n"].max()) if "n" in part and len(part) else 0


def _task_order(table: pd.DataFrame) -> list[tuple[str, int, pd.DataFrame]]:
    """(label, checkpoints, rows) of each task — or each task × OOD domain, then the task's
    mean over its OOD domains — then the mean over tasks ("all") when there are several.

    "all" averages tasks, each once (evaluation.evaluate); its checkpoint count sums the
    tasks', so checkpoints seen on two OOD domains count once, not twice.
    """
    several = "domain" in table.columns
    tasks = sorted(t for t in table["task"].unique() if t != "all")
    out, total = [], 0
    for t in tasks:
        part = table[table["task"] == t]
        if not several:
            out.append((f"task {t}", _n(part), part))
            total += _n(part)
            continue
        groups = part[part["domain"] != "all"]
        for d, g in groups.groupby("domain", sort=True):
            out.append((f"task {t}, OOD domain {d}", _n(g), g))
        n_domains = groups["domain"].nunique()
        if n_domains > 1:
            out.append((f"task {t}, mean over its {n_domains} OOD domains", _n(groups),
                        part[part["domain"] == "all"]))
        total += _n(groups)
    if (table["task"] == "all").any() and len(tasks) > 1:
        out.append((f"mean over {len(tasks)} tasks, each once", total,
                    table[table["task"] == "all"]))
    return out


_MAX_LISTED = 20


def _listing(names: Sequence[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f", … and {more} more" if more > 0 else "")


def _warnings(frames: dict[str, pd.DataFrame]) -> list[str]:
    """What a reader must know before trusting any number below: near-chance checkpoints
    (their proxies say little) and metrics reduce could not compute (NaN in the tables)."""
    out = []
    models = frames.get("models")
    if models is not None and "near_chance" in models and models["near_chance"].any():
        near = models[models["near_chance"]].drop_duplicates("checkpoint")
        names = [f"{r.checkpoint} ({r.id_acc:.3f})" for r in near.itertuples()]
        out.append(f"WARNING: {len(names)} checkpoint(s) with ID accuracy within "
                   f"{NEAR_CHANCE:g} of chance (1/num_classes): {_listing(names)}")
    fails = frames.get("reduce_failures")
    if fails is not None and not fails.empty:
        out.append(f"WARNING: {len(fails)} metric failure(s) in {fails.checkpoint.nunique()} "
                   f"checkpoint(s), NaN with a reason in metrics/ (see failures/reduce/): "
                   f"{_listing(sorted(set(fails.checkpoint)))}")
    return out


def format_report(frames: dict[str, pd.DataFrame]) -> str:
    """Each metric's R²/SRCC/KRCC/composite with 95% CIs and n per task, and alarm F1/AUROC,
    beside the paper's published composites (whatever our numbers say); first the warnings
    (near-chance checkpoints, metrics that could not be computed), and the tasks too small to
    evaluate."""
    from circuitray.evaluation import PAPER_RESULTS

    out: list[str] = _warnings(frames)
    skipped = frames.get("skipped")
    if skipped is not None and not skipped.empty:
        for note in skipped["note"]:
            out.append(f"\nPRE-DEPLOYMENT: not evaluated (too few points): {note}")
    pre = frames.get("pre_deployment")
    if pre is not None and not pre.empty:
        for label, n, part in _task_order(pre):
            out += _stat_block(part, f"\nPRE-DEPLOYMENT: metric vs OOD accuracy across the zoo "
                                     f"({label}, n={n} checkpoints)", PAPER_RESULTS["pre"])
    post = frames.get("post_deployment")
    if post is not None and not post.empty:
        means = post[(post.level == "mean") & (post.checkpoint == "all")]
        for label, _, part in _task_order(means):
            out += _stat_block(part, f"\nPOST-DEPLOYMENT: metric vs shifted-domain accuracy, per "
                                     f"model then averaged ({label})", PAPER_RESULTS["post"])
    alarm = frames.get("alarm")
    if alarm is not None and not alarm.empty:
        out.append("\nSILENT-FAILURE ALARM (δ' calibrated on proxy corruptions, mean over δ)")
        out.append(f"  {'task':<26}{'metric':<22}{'F1':>8}{'AUROC':>8}"
                   f"{'failing domains (summed over δ)':>33}")
        mean = alarm[alarm.level == "mean"].sort_values(["task", "f1"], ascending=[True, False])
        for _, row in mean.iterrows():
            f1 = f"{row['f1']:.3f}" if np.isfinite(row["f1"]) else "n/a"
            au = f"{row['auroc']:.3f}" if np.isfinite(row["auroc"]) else "n/a"
            out.append(f"  {row['task']:<26}{row['metric']:<22}{f1:>8}{au:>8}"
                       f"{int(row['n_fail']):>33}")
        out.append("  paper: CSS alarm F1 about 45% above the best output-based baseline")
    motif = frames.get("motif_summary")
    if motif is not None and not motif.empty:
        out.append("\nGENERALIZATION MOTIFS (regularized CCA of vec(Λ) vs OOD accuracy)")
        out.append(f"  {'task':<26}{'models':>8}{'canonical r':>13}{'held-out r':>12}{'reg':>6}")
        for _, row in motif.iterrows():
            out.append(f"  {row['task']:<26}{int(row['n_models']):>8}"
                       f"{row['canonical_corr']:>13.3f}{row['heldout_corr']:>12.3f}"
                       f"{row['reg']:>6.2f}")
    if not any(line.startswith("\n") for line in out):
        out.append("no evaluation tables (too few checkpoints or domains); see "
                   "evaluation/_reduce.json")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
