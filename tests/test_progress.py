"""The progress line: every few seconds or every 5%, whichever is rarer; rate, ETA, failures."""

from __future__ import annotations

import pytest

from circuitray.progress import Progress, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(total: int, seconds_per_task: float, **kwargs) -> list[str]:
    clock = FakeClock()
    progress = Progress("discover", total, unit="checkpoints", clock=clock, **kwargs)
    lines = []
    for _ in range(total):
        clock.now += seconds_per_task
        line = progress.update()
        if line is not None:
            lines.append(line)
    return lines


@pytest.mark.parametrize(("total", "seconds_per_task", "n_lines", "why"), [
    (1000, 0.1, 10, "fast tasks: the 10 s interval is rarer (100 tasks each)"),
    (20, 60.0, 20, "slow tasks: 5% (one task) is rarer than 10 s"),
    (200, 1.0, 20, "5% = 10 tasks = 10 s: both at once"),
    (3, 1.0, 1, "a short job: only the final line"),
])
def test_a_line_is_due_only_when_both_the_interval_and_5_percent_have_passed(
        total: int, seconds_per_task: float, n_lines: int, why: str) -> None:
    lines = _lines(total, seconds_per_task, interval_s=10.0, step=0.05)
    assert len(lines) == n_lines, why
    assert lines[-1].startswith(f"[discover] {total}/{total} done (100%)")


def test_the_last_task_always_gets_a_line_even_right_after_another() -> None:
    clock = FakeClock()
    progress = Progress("train_zoo", 2, unit="models", clock=clock, interval_s=10.0)
    clock.now += 11
    assert progress.update() is not None  # 50% and 11 s
    assert progress.update() is not None  # 0 s later, but the last one


def test_line_reports_rate_per_hour_eta_and_failures_so_far() -> None:
    clock = FakeClock()
    progress = Progress("discover", 100, unit="checkpoints", clock=clock)
    for i in range(10):
        clock.now += 36.0
        progress.update(failed=i in (3, 7))
    line = progress.line()
    # 10 in 360 s = 100 per hour; 90 left at that rate = 54 minutes
    assert line == ("[discover] 10/100 done (10%), 100 checkpoints/hour, ETA 54m00s, "
                    "2 failed, 6m00s elapsed")
    assert progress.rate_per_hour() == pytest.approx(100.0)


def test_no_rate_before_time_has_passed() -> None:
    progress = Progress("reduce", 4, clock=FakeClock())
    assert "rate ? tasks/hour, ETA ?" in progress.line()


@pytest.mark.parametrize(("seconds", "text"), [(0, "0m00s"), (65, "1m05s"), (3723, "1h02m03s")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
