"""Entrypoint for `ray job submit`: discover then reduce, on a config and key=value overrides.

    ray job submit --working-dir . -- python jobs/pipeline.py conf/cluster.yaml [key=value ...]
"""

import sys
from pathlib import Path

# the uploaded working dir (the repo) wins over an installed copy, as on the Ray workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.runtime.pipeline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
