"""How reduce should read discover's files: one verified read per file, or a pyarrow.dataset scan.

    .venv/bin/python bench/reads.py [--files 2400] [--rows 2000] [--repeats 3]

Writes `--files` edges-shaped Parquet files (EDGE_SCHEMA, `--rows` rows each) under
edges/<task>/<checkpoint>/<domain>.parquet in a local folder, then times reading all of them:

- `verified`: what reduce does (runtime/files.read_verified): the file's bytes, their
  checksum against the marker's, then Parquet parsed from those very bytes.
- `verified x8 threads`: the same in a thread pool (one checkpoint's files in parallel).
- `dataset`: one `pyarrow.dataset` scan over the folder, no checksum (not acceptable alone:
  it would parse a damaged file as a result).
- `dataset + checksums`: the scan plus a separate checksum read of every file (the bytes
  checked are then not the bytes parsed: a file rewritten in between passes).

Medians are printed as a table; JSON -> bench/results/reads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from circuitray.runtime.files import checksum_bytes, checksum_file, read_verified  # noqa: E402
from circuitray.tables import EDGE_SCHEMA  # noqa: E402


def _write(root: Path, n_files: int, rows: int) -> dict[Path, str]:
    rng = np.random.default_rng(0)
    sums = {}
    n_domains = 12
    for i in range(n_files):
        task, cid, dom = "toy", f"ckpt{i // n_domains}", f"d{i % n_domains}"
        table = pa.table({"task": [task] * rows, "checkpoint": [cid] * rows,
                          "domain": [dom] * rows, "method": ["eap-ig-inputs"] * rows,
                          "src": [f"s{j % 97}" for j in range(rows)],
                          "dst": [f"d{j % 89}" for j in range(rows)],
                          "src_depth": rng.integers(0, 9, rows).astype(np.int16),
                          "dst_depth": rng.integers(0, 9, rows).astype(np.int16),
                          "score": rng.normal(size=rows).astype(np.float32),
                          "n_examples": [64] * rows}, schema=EDGE_SCHEMA)
        path = root / "edges" / task / cid / f"{dom}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        sums[path] = checksum_file(path)
    return sums


def _verified(sums: dict[Path, str]) -> int:
    return sum(read_verified(p, c).num_rows for p, c in sums.items())


def _verified_threads(sums: dict[Path, str]) -> int:
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(lambda pc: read_verified(*pc).num_rows, sums.items()))


def _dataset(root: Path) -> int:
    return ds.dataset(root / "edges", format="parquet").to_table().num_rows


def _dataset_checksums(root: Path, sums: dict[Path, str]) -> int:
    for p, c in sums.items():
        if checksum_bytes(p.read_bytes()) != c:
            raise RuntimeError(p)
    return _dataset(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2400)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reads.json"))
    args = parser.parse_args()
    root = REPO / "runs" / "bench-reads"
    shutil.rmtree(root, ignore_errors=True)
    sums = _write(root, args.files, args.rows)
    ways = {"verified": lambda: _verified(sums),
            "verified x8 threads": lambda: _verified_threads(sums),
            "dataset": lambda: _dataset(root),
            "dataset + checksums": lambda: _dataset_checksums(root, sums)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():  # interleaved: all see the same background load
            start = time.perf_counter()
            rows = fn()
            times[name].append(time.perf_counter() - start)
            assert rows == args.files * args.rows, (name, rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.files} files x {args.rows} rows, page cache warm, medians of "
          f"{args.repeats} (load {os.getloadavg()[0]:.1f})\n| read | median s |\n|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"files": args.files, "rows": args.rows,
                                          "repeats": args.repeats, "seconds": times,
                                          "median_s": med, "cpus": os.cpu_count(),
                                          "load_avg_after": os.getloadavg()}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
