"""`python -m circuitray ...` is the `circuitray` command."""

from circuitray.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
