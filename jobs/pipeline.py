"""Entrypoint for `ray job submit`: discover then reduce, on a config and key=value overrides.

    ray job submit --working-dir . -- python jobs/pipeline.py conf/cluster.yaml [key=value ...]

Same as `circuitray run` (it calls the CLI), so the two cannot drift apart: -v/-q work
the same, and the progress lines land in the job log (`ray job logs <submission id>`).
"""

import sys
from pathlib import Path

# the uploaded working dir (the repo) wins over an installed copy, as on the Ray workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuitray.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
