"""Where every table of a job lives under its output folder (DESIGN §6).

    <out>/edges/<task>/<checkpoint>/<domain>.parquet     one circuit (EDGE_SCHEMA)
    <out>/outputs/<task>/<checkpoint>/<domain>.parquet   per-example outputs (OUTPUT_SCHEMA)
    <out>/checkpoints/<checkpoint>.parquet               completion marker: one row per domain
    <out>/failures/<checkpoint>.parquet                  why a checkpoint failed (FAILURE_SCHEMA)
    <out>/failures/reduce/<checkpoint>.parquet           metrics reduce could not compute (NaN)
    <out>/running/<checkpoint>.json                      the worker (host, pid) on it right now
    <out>/cache/                                         image-validation results per listing
                                                         (a local folder for a URI output)
    <out>/classes/<task>.json                            the task's class names in label order
    <out>/metrics/, <out>/evaluation/, <out>/figures/    reduce outputs
    <out>/mlflow.db, <out>/mlartifacts/                  the default MLflow store and its artifacts
                                                         (the store in `local` for a URI output)

`<out>` is a local folder (Path) or an object-store URI (circuitray.storage.ObjectPath,
`s3://bucket/run`); every path below has the type of the root, and all I/O on them goes
through circuitray.storage.

A domain is complete exactly when its checkpoint's marker has a row for it whose fingerprint
is the one the current config plans (circuitray.runtime.plan) and whose two files still have
the recorded size and checksum. The marker is written (atomically) after all the domain files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from circuitray.storage import AnyPath, ObjectPath, as_path

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")

# One row per (checkpoint, domain) a checkpoint was run on: what reduce needs to tell ID,
# OOD, post-deployment shifts and alarm proxies apart, plus per-domain cost.
DOMAIN_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("checkpoint", pa.string()),
        ("domain", pa.string()),
        ("role", pa.string()),  # id | ood | shift | proxy
        ("source", pa.string()),  # the domain folder the images come from
        ("kind", pa.string()),  # corruption kind (null for id/ood)
        ("severity", pa.int64()),
        ("n_examples", pa.int64()),
        ("n_attributed", pa.int64()),
        ("seconds", pa.float64()),
        ("resumed", pa.bool_()),  # computed by an earlier attempt of this checkpoint
        # attribution batches whose plain forward the scoring pass took from the mean pass
        # (null when resumed or written before this column existed)
        ("plain_runs_reused", pa.int64()),
        # what determined the two files (circuitray.runtime.plan) and what they looked like
        ("fingerprint", pa.string()),
        ("inputs", pa.string()),  # JSON of the fingerprint's inputs: says why one changed
        ("weights_hash", pa.string()),
        ("weights_size", pa.int64()),
        ("weights_mtime_ns", pa.int64()),
        *[(f"{which}_{part}", typ) for which in ("edges", "outputs")
          for part, typ in (("rows", pa.int64()), ("size", pa.int64()),
                            ("mtime_ns", pa.int64()), ("checksum", pa.string()))],
        # -- per checkpoint (same on each of its rows): what its inputs were prepared with
        ("norm_source", pa.string()),  # where mean/std came from (circuitray/data/preprocess.py)
        ("mean", pa.list_(pa.float64())),
        ("std", pa.list_(pa.float64())),
        ("class_source", pa.string()),  # where the class -> label map came from
    ]
)


def safe_name(name: str) -> str:
    """A file-name-safe form of an id; ids that needed changes get a short hash (no clashes)."""
    clean = _UNSAFE.sub("_", name)
    if clean != name or clean.startswith("."):
        clean = f"{clean.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return clean


@dataclass(frozen=True)
class JobLayout:
    """Paths of one job's output folder (local, or on an object store)."""

    root: AnyPath

    @classmethod
    def of(cls, output_dir: str | os.PathLike | ObjectPath) -> JobLayout:
        root = as_path(output_dir)
        return cls(root.resolve() if isinstance(root, Path) else root)

    @property
    def remote(self) -> bool:
        return isinstance(self.root, ObjectPath)

    @property
    def edges(self) -> AnyPath:
        return self.root / "edges"

    @property
    def outputs(self) -> AnyPath:
        return self.root / "outputs"

    @property
    def checkpoints(self) -> AnyPath:
        return self.root / "checkpoints"

    @property
    def failures(self) -> AnyPath:
        return self.root / "failures"

    @property
    def running(self) -> AnyPath:
        return self.root / "running"

    @property
    def local(self) -> Path:
        """Where what needs local file I/O lives: the output folder itself, or for an
        object-store output a local folder named after the URI
        (`~/.cache/circuitray/<uri>`; CIRCUITRAY_CACHE_DIR moves it)."""
        if isinstance(self.root, Path):
            return self.root
        base = Path(os.environ.get("CIRCUITRAY_CACHE_DIR")
                    or Path.home() / ".cache" / "circuitray")
        return base / safe_name(str(self.root).replace("://", "_").replace("/", "_"))

    @property
    def cache(self) -> Path:
        """Image-validation results (an optimisation, read and written with local file I/O):
        `<local>/cache`."""
        return self.local / "cache"

    @property
    def metrics(self) -> AnyPath:
        return self.root / "metrics"

    @property
    def evaluation(self) -> AnyPath:
        return self.root / "evaluation"

    @property
    def figures(self) -> AnyPath:
        return self.root / "figures"

    def edges_file(self, task: str, checkpoint: str, domain: str) -> AnyPath:
        return self.edges / safe_name(task) / safe_name(checkpoint) / f"{safe_name(domain)}.parquet"

    def outputs_file(self, task: str, checkpoint: str, domain: str) -> AnyPath:
        return (self.outputs / safe_name(task) / safe_name(checkpoint)
                / f"{safe_name(domain)}.parquet")

    def marker(self, checkpoint: str) -> AnyPath:
        return self.checkpoints / f"{safe_name(checkpoint)}.parquet"

    def failure_file(self, checkpoint: str) -> AnyPath:
        return self.failures / f"{safe_name(checkpoint)}.parquet"

    def reduce_failure_file(self, checkpoint: str) -> AnyPath:
        """Why reduce could not compute some metrics of a checkpoint (FAILURE_SCHEMA, stage
        "reduce"). A folder of its own: a discover success, which removes `failure_file`,
        leaves it alone, and no checkpoint id can collide with it."""
        return self.failures / "reduce" / f"{safe_name(checkpoint)}.parquet"

    def running_file(self, checkpoint: str) -> AnyPath:
        return self.running / f"{safe_name(checkpoint)}.json"

    def class_map_file(self, task: str) -> AnyPath:
        """The task's class map, written once by discover (circuitray.data.classes)."""
        return self.root / "classes" / f"{safe_name(task)}.json"
