"""The command line: --version, python -m, config show, --help's config sections, -v/-q, and
where a config name resolves."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _jobdata import write_checkpoints

import circuitray
from circuitray import cli
from circuitray.job_config import JobConfig, load_job_config
from circuitray.training import ZooConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "tiny.yaml"


def test_version_flag_prints_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"circuitray {circuitray.__version__}"


def test_python_dash_m_circuitray_is_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "circuitray", "--version"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"circuitray {circuitray.__version__}"


def test_help_lists_every_config_section_with_its_purpose() -> None:
    text = cli.build_parser().format_help()
    for f in dataclasses.fields(JobConfig):
        assert f"\n  {f.name}" in text or f.name in text.split("(top level)")[1].splitlines()[0]
    assert "Which domains every checkpoint is run on" in text  # DataConfig's docstring


def test_config_show_prints_every_key_with_defaults_and_overrides(capsys, tmp_path,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "show", str(CONF), "data.limit=3", "reduce.top_n=7"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# {CONF}"
    shown = yaml.safe_load(out)
    assert shown["data"]["limit"] == 3 and shown["reduce"]["top_n"] == 7  # overrides
    assert shown["data"]["seed"] == 0 and shown["resources"]["torch_threads"] == 1  # defaults
    assert set(shown) == {f.name for f in dataclasses.fields(JobConfig)}
    # what is printed is the config a run would use, exactly
    (tmp_path / "shown.yaml").write_text(out)
    assert load_job_config(tmp_path / "shown.yaml") == load_job_config(
        CONF, ["data.limit=3", "reduce.top_n=7"])


def test_config_show_reads_a_zoo_config_as_one(capsys) -> None:
    assert cli.main(["config", "show", "zoo-tiny"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) == {f.name for f in dataclasses.fields(ZooConfig)}


def test_config_show_names_a_bad_key_and_exits_2(capsys) -> None:
    assert cli.main(["config", "show", "tiny", "data.limt=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuitray: error:") and "data.limt" in err


@pytest.mark.parametrize(("name", "expect"), [
    ("demo", "shipped"), ("demo.yaml", "shipped"), ("conf/demo.yaml", "shipped"),
    ("local", "local"), ("conf/local.yaml", "local"),
])
def test_a_config_resolves_to_the_path_first_then_the_shipped_copy(
        name: str, expect: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "local.yaml").write_text("manifest: m.csv\n")
    got = cli.resolve_config(name).resolve()
    if expect == "shipped":
        assert got == (REPO / "conf" / "demo.yaml").resolve()
    else:
        assert got == (tmp_path / "conf" / "local.yaml").resolve()


def test_a_local_file_beats_the_shipped_config_of_the_same_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "demo.yaml").write_text("manifest: mine.csv\n")
    assert cli.resolve_config("conf/demo.yaml") == Path("conf/demo.yaml")  # as typed
    assert cli.resolve_config("demo").resolve() == (tmp_path / "conf" / "demo.yaml").resolve()
    # without its suffix too: `conf/demo` is the local file, not the shipped namesake
    assert cli.resolve_config("conf/demo").resolve() == (tmp_path / "conf" / "demo.yaml").resolve()


def test_a_folder_is_not_a_config(tmp_path, monkeypatch) -> None:
    from circuitray.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    with pytest.raises(ConfigError, match="conf: not a config file"):
        cli.resolve_config("conf")


@pytest.mark.parametrize("name", ["elsewhere/demo.yaml", "no-such-config"])
def test_a_missing_path_is_an_error_not_a_shipped_namesake(name, tmp_path, monkeypatch) -> None:
    from circuitray.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such config file"):
        cli.resolve_config(name)


@pytest.mark.parametrize(("argv", "level"), [
    (["config", "show", "tiny"], logging.INFO),
    (["-q", "config", "show", "tiny"], logging.WARNING),
    (["config", "show", "-q", "tiny"], logging.WARNING),
    (["-v", "config", "show", "tiny"], logging.DEBUG),
    (["config", "show", "tiny", "-v"], logging.DEBUG),
])
def test_verbosity_flags_before_or_after_the_subcommand(argv, level, capsys) -> None:
    assert cli.main(argv) == 0
    assert logging.getLogger("circuitray").level == level
    capsys.readouterr()
    logging.getLogger("circuitray.runtime.discover").info("[plan] an info line")
    logging.getLogger("circuitray.runtime.discover").warning("[discover] a warning")
    err = capsys.readouterr().err
    assert ("an info line" in err) == (level <= logging.INFO)
    assert "a warning" in err


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_worker_per_domain_lines_are_debug_only(level, tmp_path, capsys) -> None:
    """The level handed to a discover task decides whether its per-domain lines appear (under
    Ray every worker would print them, deduplicated into noise)."""
    from circuitray.runtime.discover import discover_checkpoint
    from circuitray.runtime.plan import manifest_rows

    manifest = write_checkpoints(tmp_path, 1, n_per_class=2)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "data.shift_kinds=[]", "data.proxy_kinds=[]",
                                 "intermediate=false"])
    capsys.readouterr()
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg, log_level=level)
    assert result["status"] == "done", result
    err = capsys.readouterr().err
    assert ("[discover ckpt0] id:" in err) == (level == logging.DEBUG)


def test_quiet_also_quiets_ray_and_mlflow_info_lines(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # restored after the test
    before = {name: logging.getLogger(name).level for name in ("mlflow", "ray")}
    try:
        assert cli.main(["-q", "config", "show", "tiny"]) == 0
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # mlflow reads it at import
        assert all(logging.getLogger(name).level == logging.WARNING for name in before)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
