"""What a domain folder holds (names, sizes, mtimes) and whether every image in it decodes.

A domain of an image list (`circuitray.data.image_list`, a .csv/.parquet source instead of a
root folder) has the same interface: its rows with their files' sizes and mtimes.

The listing's digest is part of every fingerprint that reads the domain, so adding, removing
or rewriting an image makes exactly the affected domains stale. Validation decodes each image
once per listing, before any checkpoint task starts, so one unreadable file is reported once,
with all the others, instead of failing every checkpoint after it loaded its model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from circuitray.data.image_list import ListedDomain, is_image_list, list_listed_domain
from circuitray.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Listing:
    """The visible files under root/domain: (relative path, size, mtime_ns), sorted."""

    folder: Path
    files: tuple[tuple[str, int, int], ...]

    @functools.cached_property  # planning asks once per checkpoint of the folder's task
    def digest(self) -> str:
        h = hashlib.sha256()
        for rel, size, mtime in self.files:
            h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()[:32]

    @property
    def images(self) -> list[Path]:
        return [self.folder / rel for rel, _, _ in self.files
                if Path(rel).suffix.lower() in IMAGE_SUFFIXES]

    def describe(self, path: Path) -> str:
        """How a message names one image of the listing."""
        return str(path)


def list_domain(root: str | os.PathLike, domain: str) -> Listing | ListedDomain:
    """List root/domain recursively (hidden files and folders skipped), or raise naming it.

    When `root` is an image list (.csv/.parquet), the domain's rows of that list instead.
    """
    if is_image_list(root):
        return list_listed_domain(root, domain)
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


def _undecodable(listing: Listing | ListedDomain) -> list[tuple[str, str]]:
    """(path, reason) for every image of the listing that does not fully decode."""
    from PIL import Image

    bad = []
    for path in listing.images:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            bad.append((str(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return bad


def validate_listing(listing: Listing | ListedDomain, cache_dir: Path | None = None) -> list[str]:
    """'path: reason' ('list row N (path): reason' for an image list) for every image of the
    listing that does not fully decode, remembered per listing digest so a re-run does not
    decode again.

    The cache keeps paths, not messages: a list row's number can move (rows of another
    domain inserted above) without changing this domain's digest.
    """
    cache = cache_dir / f"images-{listing.digest}.json" if cache_dir is not None else None
    bad = None
    if cache is not None and cache.is_file():
        try:
            bad = [(str(p), str(why)) for p, why in json.loads(cache.read_text())["bad"]]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged (or older) cache entry is recomputed
    if bad is None:
        log.info(f"[plan] decoding {len(listing.images)} images of {listing.folder} once "
                 "(remembered for this listing)")
        bad = _undecodable(listing)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"folder": str(listing.folder), "bad": bad}))
            os.replace(tmp, cache)
    return [f"{listing.describe(Path(p))}: {why}" for p, why in bad]
