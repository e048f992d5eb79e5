"""The whole job: discover then reduce under one lock, with the output folder checked first.

The one way in is `circuitray.cli` (`circuitray run|discover|reduce|demo`); the `jobs/*.py`
entrypoints that `ray job submit` runs call it, so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from circuitray.config import to_dict
from circuitray.errors import OutputError, os_error_is_permanent
from circuitray.job_config import JobConfig
from circuitray.runtime.discover import DiscoverSummary, run_discover
from circuitray.runtime.files import write_text_atomic
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.lock import JobLock
from circuitray.runtime.outputdir import check_output_dir
from circuitray.runtime.reduce import ReduceResult, run_reduce

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass
class PipelineResult:
    config: JobConfig
    discover: DiscoverSummary | None
    reduce: ReduceResult | None


def run_pipeline(cfg: JobConfig, *, force_reduce: bool = False) -> PipelineResult:
    """Run the configured stages; the resolved config is saved beside the tables.

    Before Ray starts: the output folder or object-store URI is checked (an unknown scheme,
    a file or an unwritable folder or store is refused, naming it) and locked against a
    second job. A full disk or an unwritable
    subfolder stops the job with OutputError naming the path; what was complete stays
    complete, so a re-run resumes.
    """
    root = check_output_dir(cfg.output_dir)
    cfg = dataclasses.replace(cfg, output_dir=str(root))
    layout = JobLayout.of(root)
    with JobLock(root, cfg.name), _sigterm_exits():
        try:
            write_text_atomic(layout.root / "config.yaml",
                               yaml.safe_dump(to_dict(cfg), sort_keys=False))
            log.info(f"[circuitray] job '{cfg.name}': manifest {cfg.manifest} -> {layout.root}")
            # an unwritable output folder met mid-discover raises OutputError there
            disc = run_discover(cfg) if "discover" in cfg.stages else None
            red = run_reduce(cfg, force=force_reduce) if "reduce" in cfg.stages else None
        except OSError as exc:  # a write outside tables.py: name the path, not a traceback
            if not os_error_is_permanent(exc):
                raise
            raise OutputError.from_os_error(exc.filename or layout.root, exc) from exc
    return PipelineResult(cfg, disc, red)


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


