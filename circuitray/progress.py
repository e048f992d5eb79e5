"""Progress of many tasks as a few log lines: done/total, rate, ETA and failures so far.

A line is due when at least `interval_s` seconds AND at least `step` of the total have passed
since the last one (every few seconds or every 5%, whichever is rarer), and always when the
last task finishes: a 10,000-checkpoint job writes about 20 lines, a 3-checkpoint job one per
checkpoint at most, and the job log under `ray job submit` stays readable. Pure (the clock is
injectable), so the throttling is tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def format_seconds(seconds: float) -> str:
    """1h02m03s, 4m05s."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclass
class Progress:
    """Counts finished tasks; `update` returns the line to log when one is due, else None."""

    label: str
    total: int
    unit: str = "tasks"
    interval_s: float = 10.0
    step: float = 0.05
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    failed: int = 0
    start: float = field(init=False)
    _last_time: float = field(init=False)
    _last_done: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.start = self._last_time = self.clock()

    def update(self, *, failed: bool = False) -> str | None:
        """One more task finished (`failed`: with an error); the line if one is due now."""
        self.done += 1
        self.failed += failed
        now = self.clock()
        due = (now - self._last_time >= self.interval_s
               and self.done - self._last_done >= self.step * self.total)
        if not due and self.done < self.total:
            return None
        self._last_time, self._last_done = now, self.done
        return self.line(now)

    def rate_per_hour(self, now: float | None = None) -> float | None:
        """Finished tasks per hour so far (None before the first, or with no time elapsed)."""
        elapsed = (self.clock() if now is None else now) - self.start
        return self.done / elapsed * 3600 if self.done and elapsed > 0 else None

    def line(self, now: float | None = None) -> str:
        """`[label] 12/72 done (17%), 1,667 checkpoints/hour, ETA 2m10s, 1 failed, ...`"""
        now = self.clock() if now is None else now
        rate = self.rate_per_hour(now)
        pct = 100 * self.done / self.total if self.total else 100.0
        parts = [f"[{self.label}] {self.done}/{self.total} done ({pct:.0f}%)"]
        if rate is None:
            parts.append(f"rate ? {self.unit}/hour, ETA ?")
        else:
            eta = (self.total - self.done) / rate * 3600
            parts.append(f"{rate:,.0f} {self.unit}/hour, ETA {format_seconds(eta)}")
        parts.append(f"{self.failed} failed")
        parts.append(f"{format_seconds(now - self.start)} elapsed")
        return ", ".join(parts)
