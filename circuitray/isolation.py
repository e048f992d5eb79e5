"""One metric that cannot be computed becomes NaN and a reason, never the end of a job.

Reduce computes each metric family per checkpoint and, where the family works per domain, per
domain (DESIGN §6: a failed checkpoint does not stop the job). `attempt` runs one such
computation; a data error (a CircuitrayError, a numeric or indexing error, an unreadable file)
is recorded as a `MetricFailure` — plain strings, so it crosses a Ray task boundary and lands
in failures/ — and the caller fills NaN. Interrupts and exits are never caught.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from circuitray.errors import CircuitrayError, StaleResultError

T = TypeVar("T")

# Errors that mean "these data do not support this metric", not "the program is broken".
# (Arrow's read errors are ValueError / OSError subclasses.)
RECOVERABLE: tuple[type[BaseException], ...] = (
    CircuitrayError, ValueError, ArithmeticError, IndexError, np.linalg.LinAlgError, OSError)


@dataclass(frozen=True)
class MetricFailure:
    """`what` (a family or family.metric) could not be computed for one checkpoint and domain."""

    what: str
    task: str
    checkpoint: str
    domain: str
    error_type: str
    error: str

    @property
    def reason(self) -> str:
        """The text for the `reason` column of the row that holds the NaN."""
        return f"{self.what}: {self.error}"

    def describe(self) -> str:
        """The same, naming where (unless the error already does): for failures/ and logs,
        read without the row beside it."""
        if f"checkpoint '{self.checkpoint}'" in self.error:
            return f"{self.what}: {self.error_type}: {self.error}"
        return (f"{self.what} of task '{self.task}', checkpoint '{self.checkpoint}', "
                f"domain '{self.domain}': {self.error_type}: {self.error}")


def attempt(fn: Callable[[], T], failures: list[MetricFailure], what: str, *, task: str,
            checkpoint: str, domain: str) -> T | None:
    """`fn()`, or None with its error appended to `failures` when the data do not allow it.
    A stale or damaged input (StaleResultError) is not a property of the data: it propagates,
    so the job stops naming the file rather than printing NaN in place of a number."""
    try:
        return fn()
    except StaleResultError:
        raise
    except RECOVERABLE as exc:
        message = str(exc).strip() or repr(exc)
        failures.append(MetricFailure(what, str(task), str(checkpoint), str(domain),
                                      type(exc).__name__, message))
        return None


def reasons(failures: Iterable[MetricFailure], domain: str, *extra: str) -> str:
    """The `reason` cell of one domain's row: its failures (and `extra` notes), in order."""
    parts = [f.reason for f in failures if f.domain == domain] + [e for e in extra if e]
    return "; ".join(dict.fromkeys(parts))
