"""Shared test setup: offline, deterministic, one torch thread (two test workers share 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _log_to_stderr() -> None:
    """Library log lines on stderr at INFO, as under the CLI (tests read them with capsys);
    reset per test because a CLI test's -q/-v changes the level."""
    from circuitray.log import setup

    setup("INFO")


@pytest.fixture(scope="module")
def local_ray():
    """An embedded local Ray for one test module (the pipeline and freshness tests)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
