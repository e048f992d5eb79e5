"""What a domain folder holds (names, sizes, mtimes) and whether every image in it decodes.

The listing's digest is part of every fingerprint that reads the domain, so adding, removing
or rewriting an image makes exactly the affected domains stale. Validation decodes each image
once per listing, before any checkpoint task starts, so one unreadable file is reported once,
with all the others, instead of failing every checkpoint after it loaded its model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from circuitray.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Listing:
    """The visible files under root/domain: (relative path, size, mtime_ns), sorted."""

    folder: Path
    files: tuple[tuple[str, int, int], ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, size, mtime in self.files:
            h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()[:32]

    @property
    def images(self) -> list[Path]:
        return [self.folder / rel for rel, _, _ in self.files
                if Path(rel).suffix.lower() in IMAGE_SUFFIXES]


def list_domain(root: str | os.PathLike, domain: str) -> Listing:
    """List root/domain recursively (hidden files and folders skipped), or raise naming it."""
    folder = Path(root) / domain
    if not folder.is_dir():
        have = sorted(p.name for p in Path(root).iterdir() if p.is_dir()
                      and not p.name.startswith(".")) if Path(root).is_dir() else []
        raise DataError(folder, f"no such domain folder; domains under {root}: {have}")
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            st = path.stat()
            files.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return Listing(folder, tuple(sorted(files)))


def unreadable_images(listing: Listing) -> list[str]:
    """'path: reason' for every image of the listing that does not fully decode."""
    from PIL import Image

    bad = []
    for path in listing.images:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            bad.append(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return bad


def validate_listing(listing: Listing, cache_dir: Path | None = None) -> list[str]:
    """`unreadable_images`, remembered per listing digest so a re-run does not decode again."""
    cache = cache_dir / f"images-{listing.digest}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            return list(json.loads(cache.read_text())["unreadable"])
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    log.info(f"[plan] decoding {len(listing.images)} images of {listing.folder} once "
             "(remembered for this listing)")
    bad = unreadable_images(listing)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"folder": str(listing.folder), "unreadable": bad}))
        os.replace(tmp, cache)
    return bad
