"""mimalloc for the benchmarks: glibc's allocator made ViT-sized steps swing 5-10x run to run
on this machine, a preloaded mimalloc (the cmeel-mimalloc wheel) steadied them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parents[1] / ".venv"


def find_mimalloc() -> str | None:
    """Path of the venv's libmimalloc, or None when the wheel is not installed."""
    libs = sorted(VENV.rglob("libmimalloc*.so*"))
    return str(libs[0]) if libs else None


def reexec_with_mimalloc(disabled: bool = False) -> None:
    """Re-run this script with mimalloc LD_PRELOADed (once; a no-op if it is already there)."""
    lib = find_mimalloc()
    if disabled or lib is None or "mimalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    os.environ["LD_PRELOAD"] = ":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
    os.execv(sys.executable, [sys.executable, *sys.argv])
