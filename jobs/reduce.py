"""Entrypoint for the reduce stage alone: metrics, evaluation, figures and MLflow runs.

    python jobs/reduce.py conf/cluster.yaml [key=value ...] [--force]

Same as `circuitray reduce` (it calls the CLI).
"""

import sys
from pathlib import Path

# the uploaded working dir (the repo) wins over an installed copy, as on the Ray workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["reduce", *sys.argv[1:]]))
