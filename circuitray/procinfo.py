"""Who is this process, and is a process recorded earlier still alive (lock files, MLflow runs).

A pid alone is not an identity: pids are reused. Where /proc exists the process's start time
(in clock ticks since boot) is recorded beside it, so a recycled pid is recognized as gone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def _stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (state first), or [] where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and ')'


def process_start(pid: int) -> str | None:
    """The start time of `pid` (field 22 of /proc/<pid>/stat), or None where unknown."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


@dataclass(frozen=True)
class ProcessId:
    """host + pid + start time: enough to tell a live process from a dead or recycled one."""

    host: str
    pid: int
    start: str | None = None

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid))

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True/False on this host; None for another host (never guessed)."""
        if not self.on_this_host():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            pass
        fields = _stat(self.pid)
        if fields and fields[0] in ("Z", "X"):
            return False  # exited, not yet reaped by its parent
        if self.start is not None and len(fields) > 19 and fields[19] != self.start:
            return False  # the pid was reused by a younger process
        return True
