"""One job at a time per output folder: `<out>/.lock` names its holder.

Two jobs on one output folder would both compute the same checkpoints, race on the reduce
tables and log two MLflow jobs over each other. The lock file is created with
O_CREAT|O_EXCL (atomic, also on NFS v3+), holds the holder's host, pid (with its start time,
so a recycled pid is not mistaken for the holder), start time and job name, and is removed
when the job ends. A lock left by a job that died on this host is taken over with a notice;
a lock from another host is never assumed stale (we cannot see its processes): the message
says how to remove it.

On an object store (`output_dir` a URI) the lock is the object `<out>/.lock`, created with a
conditional PUT (If-None-Match: *, which S3 and MinIO honour; through boto3) so that of two
jobs starting together exactly one gets it. Where that is not available (gs://, abfs://, an
S3 without conditional writes, or no boto3) it is best effort: written only if absent, then
read back, which catches all but two jobs starting within the same second; a warning says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TextIO

from circuitray import storage
from circuitray.errors import JobLockedError, OutputError
from circuitray.procinfo import ProcessId
from circuitray.storage import ObjectPath, create_if_absent

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_TAKEOVER_NAME = ".lock.takeover"
_TAKEOVER_STALE_S = 60.0  # a takeover takes milliseconds; an older guard was left by a crash
_READ_RETRIES = 20  # a lock just created may be empty for an instant before its JSON lands


@dataclass(frozen=True)
class LockHolder:
    """What the lock file says about the job holding it."""

    host: str
    pid: int
    pid_start: str | None
    started: float  # epoch seconds
    job: str
    token: str  # unique per acquisition: release removes only its own lock

    @property
    def process(self) -> ProcessId:
        return ProcessId(self.host, self.pid, self.pid_start)

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")
        age = max(0.0, time.time() - self.started)
        return (f"job '{self.job}' (host {self.host}, pid {self.pid}, since {since}, "
                f"{age / 60:.0f} min ago)")


class JobLock:
    """Context manager holding `<output_dir>/.lock` for the duration of a job."""

    def __init__(self, output_dir: str | os.PathLike, job: str = "circuitray", *,
                 stream: TextIO | None = None):
        self.path = storage.as_path(output_dir) / LOCK_NAME
        self.job = job
        self.stream = stream
        self.holder: LockHolder | None = None

    # ------------------------------------------------------------------ public

    def acquire(self) -> JobLock:
        """Take the lock, or raise JobLockedError naming the holder and the lock file."""
        me = ProcessId.current()
        mine = LockHolder(me.host, me.pid, me.start, time.time(), self.job, uuid.uuid4().hex)
        for _ in range(5):  # a takeover can lose a race to another fresh job: look again
            if self._create(mine):
                self.holder = mine
                return self
            holder = self._read()
            if holder is None:
                if not storage.exists(self.path):
                    continue  # released between our attempt and the read
                raise JobLockedError(str(self.path), "an unreadable lock file",
                                     f"if no circuitray job is using this folder, delete "
                                     f"{self.path} and run again")
            alive = holder.process.alive()
            if alive is False:
                self._take_over(holder)
                continue
            if alive is None:
                hint = (f"a lock from another host is never assumed stale; if that job is no "
                        f"longer running, delete {self.path} and run again")
            else:
                hint = (f"wait for it to finish, stop it (kill {holder.pid}), or use another "
                        f"output_dir")
            raise JobLockedError(str(self.path), holder.describe(), hint)
        raise JobLockedError(str(self.path), "jobs starting at the same moment",
                             "run again in a few seconds")

    def release(self) -> None:
        """Remove the lock if it is still ours (someone may have deleted and retaken it)."""
        if self.holder is None:
            return
        current = self._read()
        if current is not None and current.token == self.holder.token:
            storage.delete(self.path)
        elif current is not None:
            self._say(f"WARNING {self.path} now belongs to {current.describe()}; left in place")
        self.holder = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # ------------------------------------------------------------------ internals

    def _say(self, text: str) -> None:
        if self.stream is not None:  # a test's or caller's own stream
            print(f"[circuitray] {text}", file=self.stream, flush=True)
        else:
            log.warning(f"[circuitray] {text}")

    def _create(self, holder: LockHolder) -> bool:
        """Write the lock exclusively; False if it exists. Errors of the folder name it."""
        if isinstance(self.path, ObjectPath):
            return self._create_remote(holder)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError.from_os_error(self.path, exc) from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(asdict(holder), fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:  # disk full right now: do not leave an empty lock behind
            self.path.unlink(missing_ok=True)
            raise OutputError.from_os_error(self.path, exc) from exc
        return True

    def _create_remote(self, holder: LockHolder) -> bool:
        """The lock object, created only if absent (see the module docstring)."""
        assert isinstance(self.path, ObjectPath)
        try:
            created = create_if_absent(self.path, json.dumps(asdict(holder)).encode())
            if created is not None:
                return created
            self._say(f"WARNING {self.path}: this store offers no conditional write here; the "
                      "lock is best effort (two jobs started within a second are not kept "
                      "apart)")
            if storage.exists(self.path):
                return False
            storage.write_text(self.path, json.dumps(asdict(holder)))
        except OSError as exc:
            raise OutputError.from_os_error(self.path, exc) from exc
        return self._read() == holder  # a job racing us may have written after us: it wins

    def _read(self) -> LockHolder | None:
        """The holder, or None if the lock is gone or stays unreadable (waits out a lock
        created an instant ago whose content is not written yet)."""
        for _ in range(_READ_RETRIES):
            try:
                data = json.loads(storage.read_text(self.path))
                return LockHolder(host=str(data["host"]), pid=int(data["pid"]),
                                  pid_start=data.get("pid_start"),
                                  started=float(data["started"]), job=str(data["job"]),
                                  token=str(data["token"]))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return None

    def _take_over(self, stale: LockHolder) -> None:
        """Remove a dead holder's lock, under a guard so that two jobs doing this at once
        cannot remove each other's fresh lock; the caller then creates its own."""
        guard = self.path.with_name(_TAKEOVER_NAME)
        if not _create_guard(guard):
            found = storage.stat(guard)
            if found is not None and time.time() - found[1] / 1e9 > _TAKEOVER_STALE_S:
                with contextlib.suppress(OSError):
                    storage.delete(guard)
            time.sleep(0.1)
            return
        try:
            if self._read() == stale:
                storage.delete(self.path)
                self._say(f"taking over the stale lock {self.path}: {stale.describe()} is no "
                          f"longer running")
        finally:
            storage.delete(guard)


def _create_guard(guard: Path | ObjectPath) -> bool:
    """Create the (empty) takeover guard exclusively; False when it exists."""
    try:
        if isinstance(guard, ObjectPath):
            created = create_if_absent(guard, b"")
            if created is None:  # best effort, as for the lock itself
                if storage.exists(guard):
                    return False
                storage.write_bytes(guard, b"")
                return True
            return created
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise OutputError.from_os_error(guard, exc) from exc
