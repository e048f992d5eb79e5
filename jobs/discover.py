"""Entrypoint for the map stage alone: one Ray task per checkpoint, tables under output_dir.

    ray job submit --working-dir . -- python jobs/discover.py conf/cluster.yaml [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.runtime.pipeline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main([*sys.argv[1:], "stages=[discover]"]))
