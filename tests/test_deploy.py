"""The deployment files load, Ray accepts their runtime envs, and they agree with the project.

deploy/runtime_env.yaml (for `ray job submit --runtime-env`) and deploy/rayjob.yaml (a KubeRay
RayJob) repeat what pyproject.toml and conf/ say; these tests make any drift a failure.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from ray.runtime_env import RuntimeEnv

from circuitray.job_config import load_job_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# what reduce needs in the driver for 1,000 ViT-B checkpoints (README "A Ray cluster")
REDUCE_PEAK_BYTES = 3.2e9


def _runtime_env_file() -> dict:
    return yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())


def _rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def _requirements(lines: list[str]) -> dict[str, str]:
    """name -> the requirement as pip reads it (extras and specifiers normalized)."""
    reqs = [Requirement(line) for line in lines]
    assert len({r.name for r in reqs}) == len(reqs), f"a package is listed twice: {lines}"
    return {r.name: str(r) for r in reqs}


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity ("16Gi", "4G", 1e9) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.e+]+)([KMGT]i?)?", str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    return float(match[1]) * units.get(match[2] or "", 1)


def _ray_accepts(env: dict) -> RuntimeEnv:
    """Ray's own validation, and no key Ray would take for a plugin (a typo is not one)."""
    runtime_env = RuntimeEnv(**env)
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    return runtime_env


@pytest.mark.parametrize("source", ["runtime_env.yaml", "rayjob.yaml"])
def test_runtime_env_pip_is_pyprojects_dependencies_less_ray(source: str) -> None:
    env = _runtime_env_file() if source == "runtime_env.yaml" else \
        yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    runtime_env = _ray_accepts(env)
    listed = _requirements(runtime_env["pip"]["packages"])
    wanted = _requirements(_pyproject()["project"]["dependencies"])
    wanted.pop("ray")  # the cluster's own Ray runs the job: never reinstalled per job
    assert listed == wanted, (f"deploy/{source} pip packages differ from pyproject.toml: "
                              f"{set(listed.items()) ^ set(wanted.items())}")


def test_runtime_env_file_is_what_ray_job_submit_sends() -> None:
    """Parsed the way `ray job submit --runtime-env deploy/runtime_env.yaml` does: the
    working dir is the checkout (the entrypoints are in it) and env vars are strings."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    env = parse_runtime_env_args(runtime_env=str(DEPLOY / "runtime_env.yaml"))
    _ray_accepts(env)
    assert (REPO / env["working_dir"] / "jobs" / "pipeline.py").is_file()
    assert env["env_vars"] and all(isinstance(v, str) for v in env["env_vars"].values())
    assert "CIRCUITRAY_GIT_COMMIT" not in env["env_vars"]  # set per submit, never a stale one


def test_rayjob_has_a_head_a_gpu_group_and_cleans_up() -> None:
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    ray_version = cluster["rayVersion"]
    ray_req = Requirement(next(d for d in _pyproject()["project"]["dependencies"]
                               if Requirement(d).name == "ray"))
    assert ray_req.specifier.contains(ray_version), (ray_version, str(ray_req))
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    pods = [head["template"]["spec"], *(g["template"]["spec"] for g in groups)]
    for pod in pods:  # one Ray everywhere, and the shared volume the config writes to
        (container,) = pod["containers"]
        assert container["image"].startswith(f"rayproject/ray:{ray_version}-"), container
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/mnt/shared"}
    gpu = [g for g in groups if "nvidia.com/gpu" in
           g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no worker group requests nvidia.com/gpu"

    # the driver (reduce) lands on the head, which has the memory for it
    wanted = json.loads(spec["entrypointResources"])
    offered = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert wanted.keys() <= offered.keys() and spec["entrypointNumCpus"] <= int(
        head["rayStartParams"]["num-cpus"])
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert _bytes(head_limits["memory"]) >= REDUCE_PEAK_BYTES

    # the entrypoint's config resolves here, and its GPU tasks fit the GPU workers
    python, script, conf, *overrides = shlex.split(spec["entrypoint"])
    assert python == "python" and (REPO / script).is_file()
    cfg = load_job_config(REPO / conf, overrides)
    assert cfg.output_dir.startswith("/mnt/shared/")
    limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert 0 < cfg.resources.num_gpus <= int(limits["nvidia.com/gpu"])
    assert cfg.resources.num_cpus * int(limits["nvidia.com/gpu"]) / cfg.resources.num_gpus \
        <= int(limits["cpu"]), "a GPU's share of tasks needs more CPUs than the pod has"

    # the archive and the MLflow tag name the same commit, filled in at apply time
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.fullmatch(r"https://.+/archive/\$\{GIT_COMMIT\}\.zip", env["working_dir"])
    assert env["env_vars"]["CIRCUITRAY_GIT_COMMIT"] == "${GIT_COMMIT}"


def test_driver_joins_a_job_whose_runtime_env_sets_the_same_env_vars(monkeypatch) -> None:
    """Under `ray job submit --runtime-env deploy/runtime_env.yaml` the job's env_vars are in
    the driver's environment; the driver must not hand them to ray.init again, which Ray
    refuses ("Failed to merge the Job's runtime env ... because of a conflict")."""
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from circuitray.runtime import ray_utils

    job_env = _runtime_env_file()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    for key, value in job_env["env_vars"].items():  # as the job agent sets them
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not in the job's env: still handed on
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ray_utils.ensure_ray("127.0.0.1:1")
    (call,) = calls
    driver_env = RuntimeEnv(**(call["runtime_env"] or {}))
    assert _merge_runtime_env(RuntimeEnv(**job_env), driver_env) is not None
    assert driver_env["env_vars"] == {"HF_HUB_OFFLINE": "1"}
