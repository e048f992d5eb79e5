"""`circuitray run conf/X.yaml [key=value ...]`, `circuitray demo`, and the stages alone.

    circuitray run conf/user-data.yaml manifest=m.csv data.limit=500
    circuitray discover conf/cluster.yaml          # the map stage only
    circuitray reduce conf/cluster.yaml --force    # recompute metrics/evaluation/MLflow
    circuitray demo                                # demo zoo -> pipeline -> paper-style table
    circuitray manifest runs/ -o manifest.csv      # scan checkpoints into a manifest
    circuitray config show conf/demo.yaml data.limit=8   # the resolved config, defaults too

Config errors are reported (naming the key) before Ray or any model starts. A config is a
path, or the name of a shipped one (`demo`, `conf/tiny.yaml`): the path is tried first, then
the copy installed with the package. The report goes to stdout; plan, progress and warnings
to stderr (-q: warnings only, -v: also every worker's per-domain lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from circuitray import __version__  # noqa: E402
from circuitray import log as logsetup  # noqa: E402
from circuitray.errors import CircuitrayError, ConfigError  # noqa: E402

log = logging.getLogger(__name__)

DEMO_CONF = "conf/demo.yaml"
DEMO_ZOO_CONF = "conf/zoo-demo.yaml"


def shipped_conf_dirs() -> list[Path]:
    """Where the shipped configs are: inside an installed wheel (`circuitray/conf`, package
    data mapped from the repository's top-level conf/ by pyproject.toml), then a source
    checkout's conf/ beside the package (editable install, PYTHONPATH)."""
    package = Path(__file__).resolve().parent
    return [d for d in (package / "conf", package.parent / "conf") if d.is_dir()]


def resolve_config(name: str | os.PathLike) -> Path:
    """The config file `name` means: the path itself when it exists, else, for a bare name
    (`demo`, `demo.yaml`) or `conf/<file>`, the shipped copy. Other missing paths are errors
    naming what was tried, never silently a shipped file of the same name."""
    path = Path(name)
    if path.is_file():
        return path  # as given, so messages name what the user typed
    if path.exists():
        raise ConfigError(f"{name}: not a config file (a folder?); give a .yaml file")
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "conf"):
        file = parts[-1] if path.suffix in (".yaml", ".yml") else f"{parts[-1]}.yaml"
        # ./conf/<file> first (also for `conf/demo` without its suffix), then the shipped one
        tried = [Path("conf") / file] + [d / file for d in shipped_conf_dirs()]
        for candidate in tried:
            if candidate.is_file():
                return candidate.resolve()
        raise ConfigError(f"{name}: no such config file (looked in ./, "
                          f"{', '.join(str(t.parent) for t in tried)})")
    raise ConfigError(f"{name}: no such config file")


def _run(args: argparse.Namespace, stages: list[str] | None) -> int:
    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    overrides = list(args.overrides) + ([f"stages={stages}"] if stages else [])
    cfg = load_job_config(resolve_config(args.config), overrides)
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
    from circuitray.runtime.reduce import tracking_uri
    from circuitray.tracking import runs_view_link

    out = str(cfg.output_dir)
    uri = tracking_uri(cfg)  # for an object-store output_dir a local sqlite file
    if failed:
        log.warning(f"{len(failed)} checkpoint(s) failed; why: {out}/failures/")
    ui = f"\nMLflow UI: mlflow ui --backend-store-uri {uri}" if cfg.tracking.enabled else ""
    log.info(f"tables: {out}/{{edges,outputs,metrics,evaluation,failures}}\n"
             f"figures: {out}/figures{ui}"
             + (f" (artifacts: {out}/mlartifacts)" if ui and "://" in out else ""))
    link = uri and cfg.tracking.enabled and runs_view_link(uri, cfg.tracking.experiment)
    log.info(f"MLflow runs: {link or 'none logged'}")


def _demo(args: argparse.Namespace) -> int:
    """Train or reuse the demo zoo, run the whole pipeline locally, print the result table."""
    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    zoo_dir = Path(args.zoo_out).resolve()
    start = time.perf_counter()
    zoo_conf = resolve_config(args.zoo_config)
    job_conf = resolve_config(args.config)  # a mistyped name fails now, not after the zoo
    manifest = _demo_zoo(zoo_conf, zoo_dir, list(args.zoo_overrides or []))
    zoo_s = time.perf_counter() - start
    overrides = [f"manifest={manifest}", *args.overrides]
    cfg = load_job_config(job_conf, overrides)
    start = time.perf_counter()
    result = run_pipeline(cfg, force_reduce=args.force)
    job_s = time.perf_counter() - start
    print("\nInside-Out demo: our numbers on the offline demo zoo beside the paper's "
          "(CVPR 2026) published composites")
    if result.reduce is not None:
        print(_stored_report(cfg))
    log.info(f"zoo {zoo_s:.0f}s (reused when already trained), pipeline {job_s:.0f}s")
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


def _config_command(args: argparse.Namespace) -> int:
    """Print the config a command would run with: every key, defaults filled in, overrides
    applied, paths made absolute, validated (a bad key fails here as it would in `run`)."""
    import yaml

    from circuitray.config import load_config, to_dict
    from circuitray.job_config import load_job_config
    from circuitray.training import ZooConfig

    path = resolve_config(args.config)
    loaded = yaml.safe_load(path.read_text())
    if isinstance(loaded, dict) and "grid" in loaded:  # a demo-zoo config (jobs/train_zoo.py)
        cfg = load_config(ZooConfig, path, args.overrides)
    else:
        cfg = load_job_config(path, args.overrides)
    print(f"# {path}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None),
          end="")
    return 0


def config_sections() -> str:
    """The job config's top-level keys and sections, for --help (read from JobConfig)."""
    from circuitray.job_config import JobConfig

    keys, lines = [], []
    for f in dataclasses.fields(JobConfig):
        if dataclasses.is_dataclass(f.default_factory):
            doc = (f.default_factory.__doc__ or "").strip().splitlines()[0]
            lines.append(f"  {f.name:<12} {doc}")
        else:
            keys.append(f.name)
    return ("config sections (`circuitray config show conf/X.yaml` prints every key with its "
            "default):\n" + f"  {'(top level)':<12} {', '.join(keys)}\n" + "\n".join(lines))


def _verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """-v/-q, accepted before and after the subcommand (a subcommand's default is SUPPRESS so
    it does not undo a flag given before it)."""
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more output: DEBUG, e.g. every worker's per-domain lines")
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="warnings and the report only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitray", description=__doc__,
                                     epilog=config_sections(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"circuitray {__version__}")
    _verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "discover then reduce"), ("discover", "the map stage only"),
                        ("reduce", "the reduce stage only")):
        p = sub.add_parser(name, help=help_, epilog=config_sections(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _verbosity(p, argparse.SUPPRESS)
        p.add_argument("config", help="job config YAML, e.g. conf/user-data.yaml")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. resources.num_gpus=0.25")
        if name != "discover":
            p.add_argument("--force", "--force-reduce", dest="force", action="store_true",
                           help="recompute reduce even if its inputs are unchanged")
    demo = sub.add_parser("demo", help="demo zoo + pipeline + paper-style table, all local")
    _verbosity(demo, argparse.SUPPRESS)
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
    _verbosity(man, argparse.SUPPRESS)
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
    conf = sub.add_parser("config", help="show the resolved config (defaults, overrides)")
    conf_sub = conf.add_subparsers(dest="config_command", required=True)
    show = conf_sub.add_parser("show", help="print the config a command would run with",
                               epilog=config_sections(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbosity(show, argparse.SUPPRESS)
    show.add_argument("config", help="a path, or a shipped config's name (demo, tiny, ...)")
    show.add_argument("overrides", nargs="*", help="key=value, as for run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:  # key=value given after an option lands here; anything else is a mistake
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]
    logsetup.setup(logsetup.level_for(args.verbose - args.quiet))
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "manifest":
            return _manifest_command(args)
        if args.command == "config":
            return _config_command(args)
        stages = {"discover": ["discover"], "reduce": ["reduce"]}.get(args.command)
        return _run(args, stages)
    except CircuitrayError as exc:
        log.error(f"circuitray: error: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
