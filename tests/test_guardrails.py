"""The driver's guardrails: where a job may write, one job per output folder, clear errors.

A URI, a file, a read-only folder or a full disk as `output_dir` is refused naming the path
(no raw traceback, nothing half-written, a re-run resumes); a second job on a locked folder is
refused naming the holder; a lock whose process died is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints

from circuitray.errors import ConfigError, JobLockedError, OutputError
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.lock import LOCK_NAME, JobLock
from circuitray.runtime.outputdir import check_output_dir
from circuitray.tables import write_parquet_atomic

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "tiny.yaml"


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at `path` (a real full or read-only disk); skips where mounting is not
    allowed (not root, no mount binary)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started although the output folder should have been refused")


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".write-probe" in p.name]


# ----------------------------------------------------------------------- output_dir: URIs


def test_output_dir_of_an_unknown_scheme_is_refused_by_the_config_naming_the_key(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tiny.yaml: config key 'output_dir'.*ftp://"):
        load_job_config(CONF, ["output_dir=ftp://host/run"], base=tmp_path)
    cfg = load_job_config(CONF, [f"output_dir=file://{tmp_path}/run"], base=tmp_path)
    assert cfg.output_dir == str(tmp_path / "run")  # file:// is a local folder
    cfg = load_job_config(CONF, ["output_dir=s3://bucket/run/"], base=tmp_path)
    assert cfg.output_dir == "s3://bucket/run"  # an object store is kept as a URI
    assert cfg.tracking.enabled  # MLflow logs such a job (tests/test_object_store.py)


@pytest.mark.parametrize("scheme, fix", [("gcs", "'gs://bucket/run'"),
                                         ("abfs", "'abfss://bucket/run'")])
def test_tracking_of_an_output_uri_mlflow_cannot_store_artifacts_at_is_refused_naming_the_fix(
        scheme: str, fix: str, tmp_path: Path) -> None:
    from mlflow.store.artifact.artifact_repository_registry import (
        _artifact_repository_registry as mlflow_artifact_repos,
    )

    from circuitray.job_config import MLFLOW_ARTIFACT_SCHEMES

    assert set(MLFLOW_ARTIFACT_SCHEMES) <= set(mlflow_artifact_repos._registry)
    assert scheme not in mlflow_artifact_repos._registry
    out = f"{scheme}://bucket/run"
    with pytest.raises(ConfigError, match=rf"tiny.yaml: config key 'tracking.enabled'.*"
                                          rf"'{scheme}://' URI.*write output_dir as {fix}"):
        load_job_config(CONF, [f"output_dir={out}"], base=tmp_path)
    cfg = load_job_config(CONF, [f"output_dir={out}", "tracking.enabled=false"], base=tmp_path)
    assert cfg.output_dir == out


def test_run_pipeline_refuses_an_unknown_scheme_before_ray_starts_and_creates_no_folder(
        tmp_path: Path, monkeypatch) -> None:
    from circuitray.runtime import pipeline, ray_utils

    monkeypatch.setattr(ray_utils, "ensure_ray", _no_ray)
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig(manifest=str(tmp_path / "m.csv"), output_dir="ftp://host/run")
    with pytest.raises(OutputError, match=r"ftp://host/run.*'ftp://'"):
        pipeline.run_pipeline(cfg)
    assert list(tmp_path.iterdir()) == [], "a local 'ftp:' folder was created"


# ------------------------------------------------------------ output_dir: file, read-only


def test_output_dir_that_is_a_file_is_refused_by_the_cli_naming_it(
        tmp_path: Path, monkeypatch, capsys) -> None:
    from circuitray import cli
    from circuitray.runtime import ray_utils

    monkeypatch.setattr(ray_utils, "ensure_ray", _no_ray)
    manifest = write_checkpoints(tmp_path, 1)
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    code = cli.main(["run", str(CONF), f"manifest={manifest}", f"output_dir={target}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot write {target}: is a file, not a folder" in err
    assert target.read_text() == "not a folder"
    with pytest.raises(OutputError, match=r"its parent .*results.txt is a file"):
        check_output_dir(target / "job")


def test_read_only_output_dir_is_refused_naming_it(tmp_path: Path, monkeypatch) -> None:
    from circuitray.runtime import pipeline, ray_utils

    monkeypatch.setattr(ray_utils, "ensure_ray", _no_ray)
    manifest = write_checkpoints(tmp_path, 1)
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={ro}"])
        with pytest.raises(OutputError, match=rf"cannot write {ro}: read-only file system"):
            pipeline.run_pipeline(cfg)
        with pytest.raises(OutputError, match=rf"cannot write {ro / 'job'}: read-only"):
            check_output_dir(ro / "job")


def test_unwritable_output_dir_is_refused_even_where_chmod_cannot_show_it(
        tmp_path: Path, monkeypatch) -> None:
    """The write probe's EACCES (root ignores chmod, so it is injected) names the folder."""
    import builtins

    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if ".write-probe" in str(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'out'}: permission denied"):
        check_output_dir(tmp_path / "out")
    assert _temporaries(tmp_path) == []


# -------------------------------------------------------------------- full disk, tables


def _table(rows: int) -> pa.Table:
    return pa.table({"x": pa.array(range(rows), pa.int64()),
                     "y": pa.array([float(i) for i in range(rows)])})


def test_full_disk_is_an_output_error_naming_the_file_and_leaves_no_temporary(
        tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "64k") as small:
        target = small / "edges" / "big.parquet"
        with pytest.raises(OutputError, match=rf"cannot write {target}: disk full"):
            write_parquet_atomic(_table(200_000), target)
        assert not target.exists() and _temporaries(small) == []
        write_parquet_atomic(_table(10), small / "edges" / "small.parquet")  # still usable


def test_enospc_anywhere_in_the_write_is_an_output_error(tmp_path: Path, monkeypatch) -> None:
    """The same without a tmpfs (any machine): pyarrow's ENOSPC mid-write."""
    from circuitray import tables

    def full(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half")  # a partial temporary, as a real failure leaves
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space")

    monkeypatch.setattr(tables.pq, "write_table", full)
    with pytest.raises(OutputError, match="disk full"):
        write_parquet_atomic(_table(3), tmp_path / "a.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_table_folder_should_be_names_that_folder(tmp_path: Path) -> None:
    (tmp_path / "metrics").write_text("oops")
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'metrics'}: is a file"):
        write_parquet_atomic(_table(3), tmp_path / "metrics" / "depth.parquet")
    (tmp_path / "edges").write_text("oops")
    with pytest.raises(OutputError, match="a part of the path is a file"):
        write_parquet_atomic(_table(3), tmp_path / "edges" / "t" / "c.parquet")


def test_transient_os_errors_still_propagate_for_the_caller_to_retry(tmp_path: Path,
                                                                     monkeypatch) -> None:
    from circuitray import tables

    def stale(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(tables.pq, "write_table", stale)
    with pytest.raises(OSError) as info:
        write_parquet_atomic(_table(3), tmp_path / "a.parquet")
    assert not isinstance(info.value, OutputError) and info.value.errno == errno.ESTALE
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_discover_fails_the_write_stage_and_a_rerun_resumes(
        tmp_path: Path) -> None:
    """A checkpoint whose tables do not fit: its failure row names the file and 'disk full',
    nothing half-written remains, and after space is freed a re-run completes it."""
    from circuitray.runtime.discover import discover_checkpoint
    from circuitray.runtime.plan import manifest_rows

    manifest = write_checkpoints(tmp_path, 1)
    # room for the image-validation cache (2 pages), the class map (1) and the first domain only
    with _tmpfs(tmp_path / "disk", "32k") as disk:
        cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={disk / 'job'}",
                                     "data.shift_kinds=[]", "data.proxy_kinds=[]"])
        row = manifest_rows(cfg)[0]
        result = discover_checkpoint(row, cfg)
        assert result["status"] == "failed" and result["stage"] == "write"
        assert result["error_type"] == "OutputError" and "disk full" in result["error"]
        assert str(disk / "job") in result["error"]
        layout = JobLayout.of(cfg.output_dir)
        assert not layout.marker("ckpt0").exists() and _temporaries(disk) == []
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = discover_checkpoint(row, cfg)
        assert again["status"] == "done" and layout.marker("ckpt0").exists()
        marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
        assert marker.set_index("domain").resumed.to_dict() == {"id": True, "ood": False}


def test_unwritable_running_marker_is_a_write_failure_naming_it_not_a_crashed_task(
        tmp_path: Path) -> None:
    """The `running/<ckpt>.json` note is the checkpoint's first write: where it cannot be
    written the checkpoint fails at stage write with OutputError naming the path (before, the
    OSError escaped the task and Ray retried it, then crashed the driver with a traceback)."""
    from circuitray.runtime.discover import discover_checkpoint
    from circuitray.runtime.plan import manifest_rows

    manifest = write_checkpoints(tmp_path, 1)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}"])
    layout = JobLayout.of(cfg.output_dir)
    layout.root.mkdir(parents=True)
    layout.running_file("ckpt0").parent.write_text("a file where the folder should be")
    result = discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "failed" and result["stage"] == "write"
    assert result["error_type"] == "OutputError"
    assert str(layout.running_file("ckpt0")) in result["error"]


def test_job_stops_at_the_first_checkpoint_that_cannot_write_and_reduce_never_runs(
        tmp_path: Path, local_ray, monkeypatch) -> None:
    """Write failures (disk full) are not the checkpoints' fault: discover cancels the rest
    and the job stops with an OutputError naming the path, instead of failing every
    checkpoint in turn and reducing them as bad checkpoints."""
    from circuitray.runtime import pipeline

    manifest = write_checkpoints(tmp_path, 3)

    def reduce(cfg, force=False):
        raise AssertionError("reduce ran after the disk filled up")

    monkeypatch.setattr(pipeline, "run_reduce", reduce)
    with _tmpfs(tmp_path / "disk", "32k") as disk:
        cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={disk / 'job'}",
                                     "data.shift_kinds=[]", "data.proxy_kinds=[]"])
        with pytest.raises(OutputError, match=r"could not write its tables .*disk full.*"
                                              r"the job stopped there"):
            pipeline.run_pipeline(cfg)
        assert not (disk / "job" / LOCK_NAME).exists(), "the lock outlived the job"


# ------------------------------------------------------------------------------ the lock


def test_second_concurrent_run_on_the_same_output_dir_is_refused_naming_the_holder(
        tmp_path: Path, monkeypatch) -> None:
    from circuitray.runtime import pipeline
    from circuitray.runtime.discover import DiscoverSummary

    manifest = write_checkpoints(tmp_path, 1)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "stages=[discover]"])
    inside, leave = threading.Event(), threading.Event()

    def slow_discover(cfg):
        inside.set()
        assert leave.wait(30)
        return DiscoverSummary()

    monkeypatch.setattr(pipeline, "run_discover", slow_discover)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault("r", pipeline.run_pipeline(cfg)))
    thread.start()
    try:
        assert inside.wait(30)
        with pytest.raises(JobLockedError) as info:
            pipeline.run_pipeline(cfg)
        msg = str(info.value)
        assert str(tmp_path / "job" / LOCK_NAME) in msg and "job 'tiny'" in msg
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in msg
    finally:
        leave.set()
        thread.join(30)
    assert "r" in first and not (tmp_path / "job" / LOCK_NAME).exists()
    pipeline.run_pipeline(cfg)  # free again once the first job ended


_HOLD = """
import sys, time
from circuitray.runtime.lock import JobLock
JobLock(sys.argv[1], "old-job").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_lock_of_a_live_process_refuses_and_of_a_killed_one_is_taken_over(
        tmp_path: Path) -> None:
    out = tmp_path / "job"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobLockedError, match=rf"job 'old-job' \(host .*, pid {holder.pid}, "
                                                 rf"since .*kill {holder.pid}"):
            JobLock(out, "new-job").acquire()
    finally:
        holder.kill()
        holder.wait(30)
    notices: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            notices.append(text)

        def flush(self) -> None:
            pass

    with JobLock(out, "new-job", stream=Stream()) as lock:
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.holder is not None and lock.holder.job == "new-job"
    text = "".join(notices)
    assert "taking over the stale lock" in text and f"pid {holder.pid}" in text
    assert not (out / LOCK_NAME).exists()


def test_a_recycled_pid_does_not_keep_a_dead_jobs_lock(tmp_path: Path, capsys) -> None:
    """Same host, a live pid, but another process start time: the holder is gone."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1",
        "started": time.time() - 3600, "job": "old", "token": "t"}))
    with JobLock(tmp_path, "new"):
        pass
    assert "taking over the stale lock" in capsys.readouterr().err


def test_a_lock_from_another_host_is_never_assumed_stale(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "gpu-node-7", "pid": 1234, "pid_start": None,
                                "started": time.time() - 7200, "job": "zoo", "token": "t"}))
    with pytest.raises(JobLockedError) as info:
        JobLock(tmp_path, "mine").acquire()
    msg = str(info.value)
    assert "job 'zoo' (host gpu-node-7, pid 1234" in msg and "120 min ago" in msg
    assert f"never assumed stale; if that job is no longer running, delete {lock}" in msg
    assert json.loads(lock.read_text())["host"] == "gpu-node-7"


def test_an_unreadable_lock_is_refused_with_how_to_remove_it(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(JobLockedError, match=rf"unreadable lock file.*delete {tmp_path}"):
        JobLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    lock = JobLock(tmp_path, "a").acquire()
    (tmp_path / LOCK_NAME).unlink()  # someone removed it by hand and another job took it
    other = JobLock(tmp_path, "b").acquire()
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "b"
    other.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_on_a_full_disk_is_an_output_error_and_leaves_no_empty_lock(
        tmp_path: Path, monkeypatch) -> None:
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=rf"{tmp_path / LOCK_NAME}: disk full"):
        JobLock(tmp_path).acquire()
    monkeypatch.setattr(os, "fsync", real)
    assert not (tmp_path / LOCK_NAME).exists()


def test_config_yaml_is_written_under_the_lock(tmp_path: Path, monkeypatch) -> None:
    from circuitray.runtime import pipeline

    manifest = write_checkpoints(tmp_path, 1)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "stages=[discover]"])
    seen = {}

    def discover(cfg):
        seen["lock"] = (Path(cfg.output_dir) / LOCK_NAME).exists()
        seen["config"] = (Path(cfg.output_dir) / "config.yaml").exists()
        from circuitray.runtime.discover import DiscoverSummary

        return DiscoverSummary()

    monkeypatch.setattr(pipeline, "run_discover", discover)
    pipeline.run_pipeline(cfg)
    assert seen == {"lock": True, "config": True}
    assert _temporaries(tmp_path / "job") == []


def test_sigterm_ends_the_job_through_its_cleanup_and_releases_the_lock(
        tmp_path: Path, monkeypatch) -> None:
    """`ray job stop` sends SIGTERM: the job must leave through its `finally`s (lock removed,
    MLflow run marked KILLED), not vanish holding the lock."""
    import signal

    from circuitray.runtime import pipeline

    manifest = write_checkpoints(tmp_path, 1)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "stages=[discover]"])

    def stopped(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the job")

    monkeypatch.setattr(pipeline, "run_discover", stopped)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        pipeline.run_pipeline(cfg)
    assert info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "job" / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is before
