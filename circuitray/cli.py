"""`circuitray run conf/X.yaml [key=value ...]`, `circuitray demo`, and the stages alone.

    circuitray run conf/user-data.yaml manifest=m.csv data.limit=500
    circuitray discover conf/cluster.yaml          # the map stage only
    circuitray reduce conf/cluster.yaml --force    # recompute metrics/evaluation/MLflow
    circuitray demo                                # demo zoo -> pipeline -> paper-style table
    circuitray manifest runs/ -o manifest.csv      # scan checkpoints into a manifest

Config errors are reported (naming the key) before Ray or any model starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from circuitray.errors import CircuitrayError  # noqa: E402

DEMO_CONF = "conf/demo.yaml"
DEMO_ZOO_CONF = "conf/zoo-demo.yaml"


def _repo_file(name: str) -> Path:
    """conf/ files are looked up in the cwd first, then beside the installed package."""
    here = Path(name)
    if here.exists():
        return here.resolve()
    return (Path(__file__).resolve().parents[1] / name).resolve()


def _run(args: argparse.Namespace, stages: list[str] | None) -> int:
    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    overrides = list(args.overrides) + ([f"stages={stages}"] if stages else [])
    cfg = load_job_config(args.config, overrides)
    result = run_pipeline(cfg, force_reduce=getattr(args, "force", False))
    if result.reduce is not None:
        print(_stored_report(cfg))
    _where(cfg, result.discover.failed if result.discover else [])
    return 0


def _stored_report(cfg) -> str:
    """The report reduce wrote with its tables; reprinted as is when reduce was up to date,
    so an unchanged job prints exactly what it printed the first time."""
    from circuitray import storage
    from circuitray.runtime.reduce import REPORT_NAME

    path = storage.as_path(cfg.output_dir) / "evaluation" / REPORT_NAME
    if not storage.exists(path):  # tables from a version that did not store its report
        raise CircuitrayError(f"{path}: missing; run `circuitray reduce ... --force` to "
                              "recompute the report")
    return storage.read_text(path)


def _where(cfg, failed: Sequence[str] = ()) -> None:
    from circuitray.tracking import default_tracking_uri

    uri = cfg.tracking.uri or (default_tracking_uri(cfg.output_dir)
                               if "://" not in str(cfg.output_dir) else None)
    if failed:
        print(f"\n{len(failed)} checkpoint(s) failed; why: {cfg.output_dir}/failures/")
    print(f"\ntables: {cfg.output_dir}/{{edges,outputs,metrics,evaluation,failures}}\n"
          f"figures: {cfg.output_dir}/figures"
          + (f"\nMLflow UI: mlflow ui --backend-store-uri {uri}" if uri else ""))


def _demo(args: argparse.Namespace) -> int:
    """Train or reuse the demo zoo, run the whole pipeline locally, print the result table."""
    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    zoo_dir = Path(args.zoo_out).resolve()
    start = time.perf_counter()
    manifest = _demo_zoo(_repo_file(args.zoo_config), zoo_dir, list(args.zoo_overrides or []))
    zoo_s = time.perf_counter() - start
    overrides = [f"manifest={manifest}", *args.overrides]
    cfg = load_job_config(_repo_file(args.config), overrides)
    start = time.perf_counter()
    result = run_pipeline(cfg, force_reduce=args.force)
    job_s = time.perf_counter() - start
    print("\nInside-Out demo: our numbers on the offline demo zoo beside the paper's "
          "(CVPR 2026) published composites")
    if result.reduce is not None:
        print(_stored_report(cfg))
    print(f"\nzoo {zoo_s:.0f}s (reused when already trained), pipeline {job_s:.0f}s")
    _where(cfg, result.discover.failed if result.discover else [])
    return 0


def _demo_zoo(zoo_conf: Path, zoo_dir: Path, overrides: list[str]) -> Path:
    from circuitray.config import load_config
    from circuitray.runtime.zoo import train_zoo
    from circuitray.training import ZooConfig

    config = load_config(ZooConfig, zoo_conf, overrides)
    manifest = Path(train_zoo(config, zoo_dir, reuse=True))
    # checkpoints.csv also lists the intermediate checkpoints (DDB over training)
    every = manifest.parent / "checkpoints.csv"
    return every if every.exists() else manifest


def _manifest_command(args: argparse.Namespace) -> int:
    """Scan checkpoints into a manifest; print what was found and what could not be read."""
    from circuitray.errors import ConfigError, DataError
    from circuitray.manifest_scan import format_summary, scan, write_manifest

    if args.overrides:
        raise ConfigError(f"circuitray manifest takes no key=value arguments: {args.overrides}")
    result = scan(args.paths, task=args.task, data_root=args.data_root,
                  id_domain=args.id_domain, ood_domain=args.ood_domain, ema=args.ema,
                  final=args.final, arch=args.arch, arch_kwargs=args.arch_kwargs)
    print(format_summary(result))
    if result.rows.empty:
        raise DataError(" ".join(args.paths), "no usable checkpoint found (see above)")
    path = write_manifest(result, args.output)
    print(f"wrote {len(result.rows)} checkpoint(s) of task '{result.rows['task'].iloc[0]}' "
          f"to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "discover then reduce"), ("discover", "the map stage only"),
                        ("reduce", "the reduce stage only")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="job config YAML, e.g. conf/user-data.yaml")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. resources.num_gpus=0.25")
        if name != "discover":
            p.add_argument("--force", "--force-reduce", dest="force", action="store_true",
                           help="recompute reduce even if its inputs are unchanged")
    demo = sub.add_parser("demo", help="demo zoo + pipeline + paper-style table, all local")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of conf/demo.yaml")
    demo.add_argument("--config", default=DEMO_CONF)
    demo.add_argument("--zoo-config", default=DEMO_ZOO_CONF)
    demo.add_argument("--zoo-override", dest="zoo_overrides", action="append",
                      help="key=value override of the zoo config (repeatable)")
    demo.add_argument("--zoo-out", default="runs/zoo-demo",
                      help="the demo zoo (shared with jobs/train_zoo.py's default)")
    demo.add_argument("--force", action="store_true", help="recompute reduce")
    man = sub.add_parser("manifest", help="scan checkpoints (timm training runs, hub folders, "
                                          "weights files) into a manifest")
    man.add_argument("paths", nargs="+", metavar="PATH",
                     help="folders (searched recursively), files, or hf-hub:<org>/<name>")
    man.add_argument("-o", "--output", required=True, help="manifest to write (.csv/.parquet/.yaml)")
    man.add_argument("--task", help="task of every row (default: the data root's name)")
    man.add_argument("--data-root", help="DomainBed-style image root (column data_root)")
    man.add_argument("--id-domain", help="ID domain folder (column id_domain)")
    man.add_argument("--ood-domain", help="OOD domain folder (column ood_domain)")
    man.add_argument("--ema", action="store_true",
                     help="use a training checkpoint's EMA weights (state_dict_ema)")
    man.add_argument("--final", choices=("last", "best"), default="last",
                     help="a run's final checkpoint: its last epoch or model_best")
    man.add_argument("--arch", help="timm architecture of plain weights files")
    man.add_argument("--arch-kwargs", help='JSON kwargs of --arch, e.g. \'{"img_size": 32}\'')
    man.set_defaults(overrides=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:  # key=value given after an option lands here; anything else is a mistake
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "manifest":
            return _manifest_command(args)
        stages = {"discover": ["discover"], "reduce": ["reduce"]}.get(args.command)
        return _run(args, stages)
    except CircuitrayError as exc:
        print(f"circuitray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
