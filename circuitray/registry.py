"""The one list of metrics: what each column reduce writes is, and how it is evaluated.

Every column a metric family produces has a `MetricSpec` here: its kind (circuit-based,
output-based, shift detector, or a descriptor that is never evaluated), the sign of its
expected relation to accuracy (fixed before seeing any result, DESIGN §5), and the stages of
the protocol that evaluate it. Reduce's families, the evaluation's metric lists and
directions, the report's order and the MLflow keys are all read from it, so a new metric is
one `register` call, and a column nobody registered is an error instead of a silent drop.

Built-in families (depth, CSS, baselines, detectors, accuracy) keep their vectorized code in
`metrics/` and `baselines.py`; their specs only say which columns they produce. A plug-in
metric brings its own `compute(domain_table, id_table, **params) -> float`, run by reduce
for every domain of every checkpoint (DESIGN §6: failures become NaN with a reason).

Pure: no Ray, no torch, no pandas needed to import it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from circuitray.errors import MetricError

Stage = Literal["pre", "post", "alarm"]
Kind = Literal["circuit", "output", "detector", "descriptor"]
Source = Literal["edges", "outputs"]

STAGES: tuple[Stage, ...] = ("pre", "post", "alarm")
KINDS: tuple[Kind, ...] = ("circuit", "output", "detector", "descriptor")  # report order
SOURCES: tuple[Source, ...] = ("edges", "outputs")  # reduce reads edges first, then outputs
PLUGINS = "plugins"  # the family (and metrics/ table) of every metric with its own `compute`

PRE: tuple[Stage, ...] = ("pre",)  # across the zoo, against OOD accuracy
POST: tuple[Stage, ...] = ("post", "alarm")  # across shifted domains, and the failure alarm
EVERY: tuple[Stage, ...] = ("pre", "post", "alarm")


@dataclass(frozen=True)
class MetricSpec:
    """One metric column (`name`), or a family of them (`name` an fnmatch pattern: ddb_*).

    `stages`: where the protocol evaluates it — "pre" (per task across the zoo, against OOD
    accuracy), "post" (per model across shifted domains), "alarm" (silent-failure alarm);
    empty for descriptors. `direction`: +1 if larger should mean higher accuracy, −1 if
    lower, 0 for descriptors. `family`: the reduce family that computes it; a plug-in gives
    `compute(domain_table, id_table, **params) -> float` and `source` ("outputs": the
    per-example outputs table of one domain; "edges": its circuit's edge table) instead.
    `param`: the name of the number a pattern's columns end with (ddb_out_0.3: "tau"), so
    tracking keys read `ddb_out_tau0.3` rather than a dotted `ddb_out_0.3`.
    """

    name: str
    kind: Kind
    direction: int
    why: str
    stages: tuple[Stage, ...] = ()
    family: str = ""
    source: Source = "outputs"
    compute: Callable[..., float] | None = field(default=None, compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    param: str = ""

    def __post_init__(self) -> None:
        where = f"metric spec '{self.name}'"
        if self.kind not in KINDS:
            raise MetricError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
        if self.source not in SOURCES:
            raise MetricError(f"{where}: source {self.source!r} is not one of {SOURCES}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise MetricError(f"{where}: stage(s) {bad} not among {STAGES}")
        if self.kind == "descriptor":
            if self.direction != 0 or self.stages:
                raise MetricError(f"{where}: a descriptor is never evaluated: direction 0, "
                                  "no stages")
        elif self.direction not in (1, -1) or not self.stages:
            raise MetricError(f"{where}: a {self.kind} metric needs direction +1 or -1 and "
                              f"at least one stage of {STAGES} (got {self.direction}, "
                              f"{self.stages})")
        if self.compute is not None:
            if self.is_pattern:
                raise MetricError(f"{where}: a metric with its own compute is one column; "
                                  "give an exact name, not a pattern")
            object.__setattr__(self, "family", PLUGINS)
            object.__setattr__(self, "params", dict(self.params))
        elif not self.family:
            raise MetricError(f"{where}: give `compute` (a plug-in metric) or the built-in "
                              "`family` that produces it")

    @property
    def is_pattern(self) -> bool:
        return any(c in self.name for c in "*?[")

    def matches(self, column: str) -> bool:
        return fnmatch.fnmatchcase(column, self.name) if self.is_pattern else column == self.name

    @property
    def evaluated(self) -> bool:
        return self.kind != "descriptor"


def _builtins() -> list[MetricSpec]:
    """The built-in columns, in report order within each kind (directions: DESIGN §3–§5)."""
    acc, depth, shift, base, det = "accuracy", "depth", "shift", "baselines", "detectors"
    return [
        MetricSpec("accuracy", "descriptor", 0, "the domain's true accuracy: what the "
                   "metrics predict, never a predictor itself", family=acc),
        MetricSpec("n", "descriptor", 0, "examples in the domain's outputs", family=acc),
        MetricSpec("n_labeled", "descriptor", 0, "labeled examples behind `accuracy`",
                   family=acc),
        MetricSpec("ddb_*", "circuit", +1, "deep-layer reliance generalizes better "
                   "(paper §DDB)", PRE, family=depth, source="edges", param="tau"),
        MetricSpec("lam_*_*", "descriptor", 0, "one cell of Λ: the CCA motif's input, not a "
                   "predictor on its own", family=depth, source="edges"),
        MetricSpec("css_*", "circuit", -1, "a circuit that moved away from its ID form "
                   "predicts an accuracy drop", POST, family=shift, source="edges"),
        MetricSpec("id_acc", "output", +1, "better in distribution, better out of it "
                   "(accuracy-on-the-line); one value per model, so pre-deployment only", PRE,
                   family=base),
        MetricSpec("ac", "output", +1, "average max-softmax confidence", EVERY, family=base),
        MetricSpec("ac_ts", "output", +1, "average max-softmax confidence after temperature "
                   "scaling", EVERY, family=base),
        MetricSpec("ane", "output", +1, "average negative entropy: less uncertain outputs",
                   EVERY, family=base),
        MetricSpec("energy", "output", -1, "mean energy −logsumexp(logits): lower is more "
                   "in-distribution", EVERY, family=base),
        *(MetricSpec(f"atc_{v}", "output", +1, "ATC is itself a predicted accuracy", EVERY,
                     family=base) for v in ("mc", "ne", "mc_ts", "ne_ts")),
        MetricSpec("doc", "output", +1, "DoC is itself a predicted accuracy", EVERY,
                   family=base),
        MetricSpec("nuclear", "output", +1, "confident and dispersed predictions (Deng 2023)",
                   EVERY, family=base),
        MetricSpec("nuclear_lo", "descriptor", 0, "lower bound of the nuclear norm for this "
                   "n, k", family=base),
        MetricSpec("nuclear_hi", "descriptor", 0, "upper bound of the nuclear norm for this "
                   "n, k", family=base),
        MetricSpec("mano", "output", +1, "larger normalized-logit norm, higher accuracy "
                   "(MaNo)", EVERY, family=base),
        MetricSpec("mde", "output", +1, "MDE = log(logsumexp E − mean E): wider energy gap, "
                   "more ID-like (Peng 2024)", EVERY, family=base),
        MetricSpec("rankme", "output", +1, "higher effective rank of features, better "
                   "representation (RankMe)", EVERY, family=base),
        MetricSpec("temperature", "descriptor", 0, "the temperature fitted on ID validation "
                   "labels (used by ac_ts, atc_*_ts)", family=base),
        MetricSpec("bbsd_stat", "detector", -1, "larger KS statistic, larger label/covariate "
                   "shift", POST, family=det),
        MetricSpec("bbsd_p", "detector", +1, "higher p-value, less evidence of shift", POST,
                   family=det),
        MetricSpec("bbsd_shift", "descriptor", 0, "BBSD's decision at alpha (a boolean)",
                   family=det),
        MetricSpec("mmd2", "detector", -1, "larger MMD², larger feature shift", POST,
                   family=det),
        MetricSpec("mmd_p", "detector", +1, "higher p-value, less evidence of shift", POST,
                   family=det),
        MetricSpec("mmd_shift", "descriptor", 0, "MMD's decision at alpha (a boolean)",
                   family=det),
    ]


_SPECS: list[MetricSpec] = _builtins()


def specs() -> tuple[MetricSpec, ...]:
    """Every registered spec, built-ins first, in registry order."""
    return tuple(_SPECS)


def register(spec: MetricSpec) -> MetricSpec:
    """Add `spec` after the others. A name an existing spec already claims is an error (it
    would be shadowed, or would shadow a built-in)."""
    for other in _SPECS:
        if other.name == spec.name or other.matches(spec.name) or spec.matches(other.name):
            raise MetricError(f"metric '{spec.name}' is already claimed by the registered "
                              f"spec '{other.name}' ({other.family})")
    _SPECS.append(spec)
    return spec


def unregister(name: str) -> None:
    """Remove the spec registered under `name` (MetricError if there is none)."""
    for i, s in enumerate(_SPECS):
        if s.name == name:
            del _SPECS[i]
            return
    raise MetricError(f"metric '{name}' is not registered")


@contextmanager
def registered(*new: MetricSpec) -> Iterator[tuple[MetricSpec, ...]]:
    """`register` each spec for the duration of a with-block (tests, notebooks)."""
    done: list[MetricSpec] = []
    try:
        for spec in new:
            done.append(register(spec))
        yield tuple(done)
    finally:
        for spec in reversed(done):
            unregister(spec.name)


def spec_for(column: str) -> MetricSpec:
    """The spec that claims `column`; MetricError naming it when none does."""
    for spec in _SPECS:
        if spec.matches(column):
            return spec
    raise MetricError(f"column '{column}' is not a registered metric: register a MetricSpec "
                      "for it (circuitray.registry.register) with its kind, direction and "
                      "stages before computing it")


def is_registered(column: str) -> bool:
    return any(spec.matches(column) for spec in _SPECS)


def direction(column: str) -> int:
    """+1 if larger values should mean higher accuracy, −1 if lower; MetricError for an
    unknown column or a descriptor (never evaluated, so it has no direction)."""
    spec = spec_for(column)
    if not spec.evaluated:
        raise MetricError(f"'{column}' is a descriptor ({spec.why}), not a metric to "
                          "evaluate: it has no expected direction")
    return spec.direction


def is_circuit(column: str) -> bool:
    """Computed from circuits (DDB, CSS, …) rather than from the model's outputs."""
    return spec_for(column).kind == "circuit"


def kind(column: str) -> Kind:
    return spec_for(column).kind


def _rank(column: str) -> tuple[int, int]:
    """(kind, registry position): circuit metrics first, then output-based, then detectors."""
    for i, spec in enumerate(_SPECS):
        if spec.matches(column):
            return KINDS.index(spec.kind), i
    return len(KINDS), len(_SPECS)  # unknown names last: printing never fails on them


def ordered(columns: Iterable[str]) -> list[str]:
    """`columns` in registry order (kind, then spec); a pattern's columns keep their order."""
    return sorted(columns, key=_rank)  # stable: ddb_out_0.3 before ddb_deep_0.3 as given


def metric_columns(columns: Iterable[str], *, stage: Stage | None = None,
                   kind: Kind | None = None) -> list[str]:
    """The registered columns among `columns` (a frame's columns, or any names) that `stage`
    evaluates and are of `kind`, in registry order; descriptors only when kind="descriptor".
    Unregistered names (keys, manifest hyperparameters) are not metrics and are left out."""
    out = []
    for col in columns:
        if not isinstance(col, str) or not is_registered(col):
            continue
        spec = spec_for(col)
        if (not spec.evaluated) if kind is None else spec.kind != kind:
            continue
        if stage is not None and stage not in spec.stages:
            continue
        out.append(col)
    return ordered(out)


_TRAILING_NUMBER = re.compile(r"(.*_)(-?\d+(?:\.\d+)?(?:e-?\d+)?)")


def tracking_key(column: str, scope: str, stat: str = "") -> str:
    """The MLflow metric key of a registered column: `<scope>/<name>[/<stat>]`, where
    `scope` says where the value comes from (`ood`, `id`, `shift_mean` of one checkpoint;
    `corr` for a job-level statistic such as `stat="pre_srcc"`) and a spec's `param` names
    the number a column ends with (`ood/ddb_out_tau0.3`). The one place tracking keys are
    made, so the UI's `/` sections and the compare view line up across runs and jobs."""
    spec = spec_for(column)
    name = column
    match = _TRAILING_NUMBER.fullmatch(column) if spec.param else None
    if match:
        name = f"{match[1]}{spec.param}{match[2]}"
    return "/".join(part for part in (scope, name, stat) if part)


def check_columns(columns: Iterable[str], where: str) -> None:
    """MetricError naming every column of `where` that no spec claims."""
    unknown = [c for c in columns if not is_registered(c)]
    if unknown:
        raise MetricError(f"{where} produced column(s) {unknown} that are not registered "
                          "metrics: register a MetricSpec for each (circuitray.registry."
                          "register) with its kind, direction and stages")


def families(source: Source | None = None) -> list[str]:
    """The built-in families in registry order (of `source`), plug-ins excluded."""
    return list(dict.fromkeys(s.family for s in _SPECS if s.compute is None
                              and (source is None or s.source == source)))


def family_columns(family: str) -> tuple[str, ...]:
    """The exact column names a built-in family declares, in registry order."""
    return tuple(s.name for s in _SPECS if s.family == family and not s.is_pattern)


def plugins(source: Source | None = None) -> tuple[MetricSpec, ...]:
    """The registered metrics with their own `compute` (of `source`)."""
    return tuple(s for s in _SPECS if s.compute is not None
                 and (source is None or s.source == source))


def describe(spec: MetricSpec) -> dict[str, Any]:
    """What identifies a spec's numbers (reduce's fingerprint: re-registering a metric with
    another function or parameters recomputes)."""
    fn = spec.compute
    return {"name": spec.name, "kind": spec.kind, "direction": spec.direction,
            "stages": list(spec.stages), "source": spec.source,
            "compute": None if fn is None else f"{fn.__module__}.{fn.__qualname__}",
            "params": {k: repr(v) for k, v in sorted(spec.params.items())}}


# ---- Λ cells: lam_{i}_{j} ------------------------------------------------------------------

_LAMBDA = re.compile(r"lam_(\d+)_(\d+)")


def lambda_column(i: int, j: int) -> str:
    """Column of Λ[i, j] (source depth i, destination depth j)."""
    return f"lam_{i}_{j}"


def lambda_columns(d: int) -> list[str]:
    """The d×d cells of Λ, row-major: vec(Λ) in the order CCA and the heatmaps read it."""
    return [lambda_column(i, j) for i in range(d) for j in range(d)]


def lambda_cell(column: str) -> tuple[int, int] | None:
    """(i, j) of a lam_{i}_{j} column, None for any other name."""
    m = _LAMBDA.fullmatch(column)
    return (int(m[1]), int(m[2])) if m else None


def lambda_size(columns: Sequence[str]) -> int:
    """D of the D×D Λ whose cells are among `columns` (0 when none is); MetricError when the
    cells present are not exactly one full square."""
    cells = [c for c in columns if isinstance(c, str) and lambda_cell(c) is not None]
    if not cells:
        return 0
    d = int(round(len(cells) ** 0.5))
    if sorted(cells) != sorted(lambda_columns(d)):
        raise MetricError(f"lam_ columns do not form a full square Λ: {len(cells)} cells, "
                          f"expected lam_0_0 … lam_{d - 1}_{d - 1}")
    return d
