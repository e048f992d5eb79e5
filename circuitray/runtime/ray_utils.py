"""Starting (or joining) Ray and waiting on many tasks with visible progress."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import ray

from circuitray.log import current_level
from circuitray.progress import Progress

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start an embedded local Ray.

    Under `ray job submit` RAY_ADDRESS is set and the job joins the cluster; on a laptop a
    local Ray with no dashboard starts, so one machine needs no setup.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import json

    # Under `ray job submit` the job's runtime env already gives its env_vars to every
    # worker, and Ray refuses a driver that sets one of them again: hand on only the others.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    from_job = (job.get("runtime_env") or {}).get("env_vars") or {}
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY")
                if k in os.environ and k not in from_job}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = address or os.environ.get("RAY_ADDRESS")
    ray_level = max(logging.INFO, current_level())  # -q: no "Started a local Ray instance"
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
                 logging_level=ray_level)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True, logging_level=ray_level)


def iter_completed(refs: Sequence[ray.ObjectRef], label: str, stream: TextIO | None = None,
                   *, unit: str = "tasks", failed: Callable[[Any], bool] | None = None
                   ) -> Iterator[tuple[int, Any]]:
    """Yield (index, result) as tasks finish, with a progress line every few seconds or 5%
    (`circuitray.progress`): done/total, `unit`s per hour, ETA, and how many results
    `failed` says are failures. Lines go to `stream` if given, else to this module's logger.

    Exceptions raised by a task propagate from here; callers that must go on past a
    failed task catch inside the task and return the error as data.
    """
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    progress = Progress(label, len(refs), unit=unit)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            result = ray.get(ref)
            line = progress.update(failed=bool(failed is not None and failed(result)))
            if line is not None and stream is not None:
                print(line, file=stream, flush=True)
            elif line is not None:
                log.info(line)
            yield index[ref], result
