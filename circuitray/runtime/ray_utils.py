"""Starting (or joining) Ray and waiting on many tasks with visible progress."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import ray


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
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def iter_completed(refs: Sequence[ray.ObjectRef], label: str,
                   stream: TextIO | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (index, result) as tasks finish, printing `label: done/total, elapsed, ETA`.

    Exceptions raised by a task propagate from here; callers that must go on past a
    failed task catch inside the task and return the error as data.
    """
    stream = stream or sys.stderr
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    total, done, start = len(refs), 0, time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            done += 1
            elapsed = time.monotonic() - start
            eta = elapsed / done * (total - done)
            print(f"[{label}] {done}/{total} done, {_fmt_seconds(elapsed)} elapsed, "
                  f"ETA {_fmt_seconds(eta)}", file=stream, flush=True)
            yield index[ref], ray.get(ref)
