"""Entrypoint for the reduce stage alone: metrics, evaluation, figures and MLflow runs.

    python jobs/reduce.py conf/cluster.yaml [key=value ...] [--force-reduce]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.runtime.pipeline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main([*sys.argv[1:], "stages=[reduce]"]))
