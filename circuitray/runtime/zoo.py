"""Train the demo model zoo: one Ray task per configuration, then one manifest.

Output layout under `out_dir`:
  manifest.csv      one row per FINAL model (what discover/reduce read by default)
  backbone.csv      the pretrained backbone's own manifest row (when pretraining is on)
  backbone/         its weights, record and per-epoch curve (backbone/<id>.curve.csv)
  checkpoints.csv   every saved checkpoint, final and intermediate, with `epoch`, `final` and
                    `parent_id` (the final model's id) for training-dynamics studies
  failures.parquet  configurations that failed (FAILURE_SCHEMA), when any did
  zoo_run.json      wall time and counts (trained / reused / failed) of the latest run
                    that trained anything
  weights/, records/  see circuitray.training
Relative paths in the manifests (weights, data_root) are relative to `out_dir`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from circuitray.config import to_dict
from circuitray.data.demo import DIGIT_TASKS, PRETRAIN_TASK, build_demo_task
from circuitray.tables import FAILURE_SCHEMA, write_parquet_atomic
from circuitray.training import (
    ZooConfig,
    backbone_spec,
    expand_grid,
    pretrain_backbone,
    read_backbone,
    read_record,
    train_one,
)

log = logging.getLogger(__name__)


def prepare_data(config: ZooConfig) -> dict[str, Path]:
    """Generate (or reuse) every demo task the grid names, with the ρ domains it needs, and
    the pretraining corpus when pretraining is on."""
    rhos = sorted({float(r) for r in config.grid.rho})
    dirs = {}
    tasks = list(dict.fromkeys(config.grid.task))
    if config.pretrain.enabled:
        tasks.append(PRETRAIN_TASK)
    for task in tasks:
        kwargs: dict[str, Any] = {"seed": config.data_seed}
        if task in DIGIT_TASKS:
            kwargs.update(rhos=rhos, ood_cues=config.ood_cues)
        if task == PRETRAIN_TASK:
            kwargs.update(n_per_shape=config.pretrain.n_per_shape)
        dirs[task] = build_demo_task(task, config.data_root, **kwargs).resolve()
    return dirs


def prepare_backbones(config: ZooConfig, specs: list[dict[str, Any]], out: Path,
                      data_dir: Path | None, *, reuse: bool, executor: str,
                      say: Callable[[str], Any]) -> None:
    """Pretrain (or reuse) the backbone of every depth a fine-tune needs; write backbone.csv
    and each backbone's curve. Fails loudly: no fine-tune can start without its backbone."""
    depths = sorted({s["depth"] for s in specs if s.get("init")})
    rows = []
    for depth in depths:
        spec = backbone_spec(config, depth)
        record = read_backbone(out, spec) if reuse else None
        if record is None:
            say(f"[train_zoo] pretraining {spec['checkpoint_id']} ({spec['epochs']} epochs)")
            if executor == "ray":
                import ray

                from circuitray.runtime.ray_utils import ensure_ray

                ensure_ray(num_cpus=config.num_cpus)
                task = ray.remote(num_cpus=min(spec["threads"], config.num_cpus),
                                  max_retries=1)(pretrain_backbone)
                record = ray.get(task.remote(spec, str(data_dir), str(out)))
            else:
                record = pretrain_backbone(spec, data_dir, out)
            last = record["curve"][-1]
            say(f"[train_zoo] {spec['checkpoint_id']}: val_acc {last['val_acc']:.3f} "
                f"({last['seconds']:.0f}s)")
        else:
            say(f"[train_zoo] {spec['checkpoint_id']}: reused")
        _write_csv_atomic(pd.DataFrame(record["curve"]),
                          out / "backbone" / f"{spec['checkpoint_id']}.curve.csv")
        # data_root relative to this folder as it is now, as for the models' rows below
        rows.append({**record["row"], "data_root": os.path.relpath(data_dir, out)})
    if rows:
        _write_csv_atomic(pd.DataFrame(rows), out / "backbone.csv")


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _summary(rows: pd.DataFrame) -> str:
    lines = []
    for task, grp in rows.groupby("task"):
        ida, ooda = sorted(grp["id_acc"]), sorted(grp["ood_acc"])
        lines.append(f"  {task}: {len(grp)} models; id_acc min/median/max "
                     f"{ida[0]:.3f}/{statistics.median(ida):.3f}/{ida[-1]:.3f}; ood_acc "
                     f"{ooda[0]:.3f}/{statistics.median(ooda):.3f}/{ooda[-1]:.3f}")
    return "\n".join(lines)


def train_zoo(config: ZooConfig, out_dir: str | os.PathLike, *, reuse: bool = True,
              executor: str = "ray", stream=None) -> Path:
    """Train what is missing from the zoo `config` describes; return manifest.csv's path.

    `executor="ray"` runs one Ray task per configuration (`threads_per_task` CPUs each, so
    `num_cpus` of a local Ray sets how many train at once); `"inline"` trains in this process
    (tests, debugging). A configuration that fails is recorded in failures.parquet and the
    others go on.
    """
    if executor not in ("ray", "inline"):
        raise ValueError(f"executor must be 'ray' or 'inline', got {executor!r}")
    # a caller's stream (tests) gets the lines as they were printed, else the logger
    say = partial(print, file=stream, flush=True) if stream is not None else log.info
    out = Path(out_dir).resolve()  # Ray workers need paths that do not depend on their cwd
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_config.json").write_text(pd.Series(to_dict(config)).to_json(indent=1))
    specs = expand_grid(config)  # config errors before any data is generated
    dirs = prepare_data(config)
    prepare_backbones(config, specs, out, dirs.get(PRETRAIN_TASK), reuse=reuse,
                      executor=executor, say=say)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        rec = read_record(out, spec) if reuse else None
        if rec is not None:
            records[spec["checkpoint_id"]] = rec
        else:
            todo.append(spec)
    say(f"[train_zoo] {len(specs)} configurations: {len(records)} reused, "
        f"{len(todo)} to train -> {out}")
    args = [(spec, str(dirs[spec["task"]]), str(out)) for spec in todo]
    start = time.monotonic()
    if executor == "ray" and todo:
        import ray

        from circuitray.runtime.ray_utils import ensure_ray, iter_completed

        ensure_ray(num_cpus=config.num_cpus)
        remote = ray.remote(num_cpus=config.threads_per_task, max_retries=1)(train_one)
        refs = [remote.remote(*a) for a in args]
        results = ((i, rec) for i, rec in iter_completed(
            refs, "train_zoo", stream, unit="models", failed=lambda r: bool(r.get("error"))))
    elif executor == "inline":
        results = ((i, train_one(*a)) for i, a in enumerate(args))
    else:
        results = iter(())
    failures = []
    for i, rec in results:
        cid = todo[i]["checkpoint_id"]
        if rec.get("error"):
            failures.append({"checkpoint": cid, "stage": "train",
                             "error_type": rec["error"].split(":", 1)[0], "error": rec["error"]})
            say(f"[train_zoo] FAILED {cid}: {rec['error']}")
            continue
        records[cid] = rec
        final = rec["rows"][-1]
        say(f"[train_zoo] {cid}: id_acc {final['id_acc']:.3f} ood_acc {final['ood_acc']:.3f} "
            f"({final['train_seconds']:.0f}s)")
    if failures:
        write_parquet_atomic(pd.DataFrame(failures), out / "failures.parquet", FAILURE_SCHEMA)
    elif (out / "failures.parquet").exists():
        (out / "failures.parquet").unlink()
    rows = [row for spec in specs if spec["checkpoint_id"] in records
            for row in records[spec["checkpoint_id"]]["rows"]]
    if not rows:
        raise RuntimeError(f"train_zoo: every configuration failed; see {out / 'failures.parquet'}")
    table = pd.DataFrame(rows)
    # data_root relative to this folder as it is now (a zoo copied elsewhere still finds its data)
    table["data_root"] = [os.path.relpath(dirs[t], out) for t in table["task"]]
    _write_csv_atomic(table, out / "checkpoints.csv")
    finals = table[table["final"]].reset_index(drop=True)
    _write_csv_atomic(finals, out / "manifest.csv")
    wall = time.monotonic() - start
    run = {"wall_seconds": wall, "trained": len(todo) - len(failures), "failed": len(failures),
           "reused": len(specs) - len(todo), "executor": executor,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if todo or not (out / "zoo_run.json").exists():  # a pure reuse keeps the training run's
        (out / "zoo_run.json").write_text(json.dumps(run, indent=1))
    say(f"[train_zoo] done in {wall:.0f}s: {len(finals)} models, "
        f"{len(table)} checkpoints, {len(failures)} failed\n{_summary(finals)}")
    return out / "manifest.csv"
