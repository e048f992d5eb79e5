"""One place that decides where circuitray's log lines go and how loud they are.

Every module logs to `logging.getLogger(__name__)` (all under the `circuitray` logger);
the CLI calls `setup` once. The report a command prints is its output and goes to stdout
with `print`; everything else (plan, progress, warnings) is logged to stderr.

Levels: `-q` WARNING (warnings and the report only), default INFO, `-v` DEBUG (adds the
per-domain lines of the Ray workers). Ray workers are other processes: a task that logs
calls `setup_worker(level)` with the driver's `current_level()`, passed as an argument, so
the default output is not a per-domain line from every worker.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ROOT = "circuitray"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
_PLAIN = "%(message)s"  # lines read as before logging: "[plan] ...", "[reduce] ..."
_VERBOSE = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is emitted (pytest's capture, Ray's
    worker redirection), not the stream that was current at setup."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it: ignored
        pass


def level_for(verbosity: int) -> int:
    """-q is -1, nothing 0, -v 1; more of either stays at the ends."""
    return LEVELS[max(-1, min(1, verbosity))]


def setup(level: int | str = logging.INFO) -> None:
    """Send the `circuitray` loggers to stderr at `level`; safe to call again (replaces)."""
    logger = logging.getLogger(ROOT)
    level = logging.getLevelName(level) if isinstance(level, str) else level
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    verbose = level <= logging.DEBUG
    handler.setFormatter(logging.Formatter(_VERBOSE if verbose else _PLAIN,
                                           "%H:%M:%S" if verbose else None))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # not twice where Ray or an application configured the root
    if level > logging.INFO:  # -q quiets the INFO lines of the libraries a job drives too
        os.environ["MLFLOW_LOGGING_LEVEL"] = logging.getLevelName(level)  # read at import
        for name in ("mlflow", "ray"):
            logging.getLogger(name).setLevel(level)


def current_level() -> int:
    """The driver's effective level, to hand to Ray tasks."""
    return logging.getLogger(ROOT).getEffectiveLevel()


def setup_worker(level: int | None) -> None:
    """Inside a Ray task: the driver's level (None: leave this process's logging alone)."""
    if level is not None and (logging.getLogger(ROOT).level != level
                              or not logging.getLogger(ROOT).handlers):
        setup(level)
