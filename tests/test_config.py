"""Configs fail before any work starts, naming the key; overrides and paths behave."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from circuitray.config import build_config, load_config, parse_overrides, to_dict
from circuitray.errors import ConfigError
from circuitray.job_config import JobConfig, load_job_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Inner:
    rate: float = 0.1
    kinds: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    name: str
    steps: int = 3
    inner: Inner = field(default_factory=Inner)
    path: Path | None = None


def test_overrides_are_parsed_as_nested_yaml_values() -> None:
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 3}, "c": [1, 2], "d": True, "e": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_build_config_converts_int_to_float_and_builds_sections() -> None:
    cfg = build_config(Outer, {"name": "n", "inner": {"rate": 1}}, ["steps=7", "path=/x"])
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.steps == 7 and cfg.path == Path("/x")
    assert to_dict(cfg) == {"name": "n", "steps": 7, "inner": {"rate": 1.0, "kinds": ["a"]},
                            "path": "/x"}


@pytest.mark.parametrize(("data", "overrides", "key"), [
    ({"name": "n", "stepz": 1}, [], "stepz"),
    ({"name": "n"}, ["inner.rat=0.2"], "inner.rat"),
    ({"name": "n", "steps": "3"}, [], "steps"),
    ({"name": "n", "steps": 2.5}, [], "steps"),
    ({"name": "n", "steps": True}, [], "steps"),
    ({"name": "n", "inner": {"kinds": "a"}}, [], "inner.kinds"),
    ({"name": "n", "inner": {"kinds": ["a", 3]}}, [], "inner.kinds[1]"),
    ({"name": "n", "inner": 5}, [], "inner"),
    ({}, [], "name"),
])
def test_bad_key_or_type_fails_naming_the_key(data: dict, overrides: list[str],
                                              key: str) -> None:
    with pytest.raises(ConfigError, match=f"'?{key.replace('[', r'.').replace(']', r'.')}"):
        build_config(Outer, data, overrides)


def test_every_shipped_job_config_validates(tmp_path: Path) -> None:
    names = ["tiny.yaml", "demo.yaml", "cluster.yaml", "user-data.yaml"]
    for name in names:
        cfg = load_job_config(CONF / name, base=tmp_path)
        assert isinstance(cfg, JobConfig)
        assert Path(cfg.output_dir).is_absolute() or "://" in cfg.output_dir, name
        assert Path(cfg.manifest).is_absolute() or "://" in cfg.manifest, name


def test_job_config_paths_resolve_against_base(tmp_path: Path) -> None:
    cfg = load_job_config(None, ["manifest=m.csv", "output_dir=out", "data.root=d"],
                          base=tmp_path)
    assert cfg.manifest == str(tmp_path / "m.csv")
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.data.root == str(tmp_path / "d")
    remote = load_job_config(None, ["manifest=s3://bucket/m.csv"], base=tmp_path)
    assert remote.manifest == "s3://bucket/m.csv"


@pytest.mark.parametrize(("override", "key"), [
    ("resources.num_gpu=0.5", "resources.num_gpu"),
    ("resources.num_gpus=-1", "resources.num_gpus"),
    ("resources.num_gpus=1.5", "resources.num_gpus"),
    ("attribution.method=eap-ig", "attribution.method"),
    ("data.limit=0", "data.limit"),
    ("data.shift_severities=[1, 6]", "data.shift_severities[1]"),
    ("data.proxy_kinds=[gaussian_noise]", "data.proxy_kinds"),
    ("reduce.taus=[0.7]", "reduce.taus[0]"),
    ("data.shift_kinds=[gaussian_noise, snowfall]", "data.shift_kinds[1]"),
    ("stages=[discover, train]", "stages[1]"),
])
def test_job_config_errors_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job_config(CONF / "tiny.yaml", [override], base=tmp_path)
    assert f"'{key}'" in str(info.value) and "tiny.yaml" in str(info.value)


def test_fractional_gpu_share_is_accepted(tmp_path: Path) -> None:
    cfg = load_job_config(CONF / "tiny.yaml", ["resources.num_gpus=0.25"], base=tmp_path)
    assert cfg.resources.num_gpus == 0.25


def test_missing_or_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(JobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml.*mapping"):
        load_config(JobConfig, bad)


def _job_values() -> list[tuple[str, str]]:
    """Every (attribution key, value) `circuitray.attribute` accepts that a job can run."""
    from circuitray.attribution import ABLATIONS, DATASET_ABLATIONS, DTYPES, METHODS, METRICS

    assert set(ABLATIONS) - set(DATASET_ABLATIONS) == {"corrupted"}
    return [(key, value) for key, values in (("method", METHODS), ("ablation", DATASET_ABLATIONS),
                                             ("metric", METRICS), ("dtype", DTYPES))
            for value in values]


@pytest.mark.parametrize(("key", "value"), _job_values())
def test_every_attribution_value_the_job_accepts_runs_in_attribute(tmp_path: Path, key: str,
                                                                    value: str) -> None:
    """Config -> attribute: what the config accepts, `circuitray.attribute` runs (fp64 too)."""
    import dataclasses

    import numpy as np
    import torch
    from _tiny import images, tiny_vit

    from circuitray import attribute

    cfg = load_job_config(CONF / "tiny.yaml", [f"attribution.{key}={value}"], base=tmp_path)
    assert getattr(cfg.attribution, key) == value
    model, x = tiny_vit(dtype=torch.float32), images(n=3, dtype=torch.float32)
    scores = attribute(model, [(x, torch.arange(3))], **dataclasses.asdict(cfg.attribution))
    assert np.isfinite(scores.scores).all() and np.abs(scores.scores).max() > 0


def test_eap_with_kl_is_accepted(tmp_path: Path) -> None:
    """EAP's gradient is taken at the ablated end, where KL's gradient is not 0 (DESIGN §2)."""
    cfg = load_job_config(CONF / "tiny.yaml", ["attribution.method=eap", "attribution.metric=kl"],
                          base=tmp_path)
    assert (cfg.attribution.method, cfg.attribution.metric) == ("eap", "kl")


@pytest.mark.parametrize(("key", "value"), [
    ("method", "eap-ig"), ("method", "EAP"), ("ablation", "resample"), ("metric", "acc"),
    ("dtype", "fp16"), ("dtype", "float64"),
])
def test_attribution_values_attribute_refuses_are_refused_listing_the_allowed(
        tmp_path: Path, key: str, value: str) -> None:
    from circuitray import attribution

    allowed = {"method": attribution.METHODS, "ablation": attribution.DATASET_ABLATIONS,
               "metric": attribution.METRICS, "dtype": attribution.DTYPES}[key]
    with pytest.raises(ConfigError) as info:
        load_job_config(CONF / "tiny.yaml", [f"attribution.{key}={value}"], base=tmp_path)
    msg = str(info.value)
    assert f"'attribution.{key}'" in msg and repr(value) in msg
    assert all(a in msg for a in allowed), msg


def test_corrupted_ablation_is_refused_for_the_job_saying_why(tmp_path: Path) -> None:
    """The API keeps 'corrupted' (with corrupted_batches); a job has no paired images."""
    with pytest.raises(ConfigError, match=r"'attribution.ablation': 'corrupted' needs paired "
                                          r"corrupted images"):
        load_job_config(CONF / "tiny.yaml", ["attribution.ablation=corrupted"], base=tmp_path)


def test_fp64_from_the_config_runs_a_float32_model_in_float64_and_restores_it(
        tmp_path: Path) -> None:
    """attribution.dtype=fp64 gives the scores of the model's float64 copy (oracle precision)
    and leaves the caller's float32 model as it was, also when attribution fails."""
    import copy
    import dataclasses

    import numpy as np
    import torch
    from _tiny import images, tiny_vit

    from circuitray import attribute
    from circuitray.errors import InputError

    cfg = load_job_config(CONF / "tiny.yaml", ["attribution.dtype=fp64"], base=tmp_path)
    kwargs = dataclasses.asdict(cfg.attribution)
    model, x = tiny_vit(dtype=torch.float32), images(n=3, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    got = attribute(model, [x], **kwargs)
    want = attribute(copy.deepcopy(model).double(), [x.double()], **{**kwargs, "dtype": "fp32"})
    np.testing.assert_array_equal(got.scores, want.scores)
    fp32 = attribute(model, [x], **{**kwargs, "dtype": "fp32"})
    assert not np.array_equal(got.scores, fp32.scores)  # float32 rounding differs
    with pytest.raises(InputError, match="NaN"):
        attribute(model, [x.clone().fill_(float("nan"))], **kwargs)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
