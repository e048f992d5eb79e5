"""Train the demo model zoo (Ray entrypoint).

    python jobs/train_zoo.py conf/zoo-demo.yaml --out runs/zoo-demo [key=value ...]
    ray job submit --working-dir . -- python jobs/train_zoo.py conf/zoo-demo.yaml --out ...

Trains only configurations that are missing (pass --retrain to redo them all) and writes
<out>/manifest.csv (final models) and <out>/checkpoints.csv (every saved checkpoint).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from circuitray import log  # noqa: E402
from circuitray.config import load_config  # noqa: E402
from circuitray.runtime.zoo import train_zoo  # noqa: E402
from circuitray.training import ZooConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="zoo YAML, e.g. conf/zoo-demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grid.seed=[1]")
    parser.add_argument("--out", default=None, help="output folder (default runs/<config name>)")
    parser.add_argument("--retrain", action="store_true", help="ignore finished models")
    parser.add_argument("--inline", action="store_true", help="train in this process, no Ray")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="DEBUG output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings only")
    args = parser.parse_intermixed_args(argv)
    log.setup(log.level_for(args.verbose - args.quiet))
    config = load_config(ZooConfig, args.config, args.overrides)
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    manifest = train_zoo(config, out, reuse=not args.retrain,
                         executor="inline" if args.inline else "ray")
    print(manifest)  # the command's output; progress went to stderr


if __name__ == "__main__":
    main()
