"""Entrypoint for the map stage alone: one Ray task per checkpoint, tables under output_dir.

    ray job submit --working-dir . -- python jobs/discover.py conf/cluster.yaml [key=value ...]

Same as `circuitray discover` (it calls the CLI).
"""

import sys
from pathlib import Path

# the uploaded working dir (the repo) wins over an installed copy, as on the Ray workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["discover", *sys.argv[1:]]))
