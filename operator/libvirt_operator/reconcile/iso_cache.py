"""The operator's ISOImage cache: one verified file per image (and its partial download), removed
after any failure, once every target host has the volume, and on deletion."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .runtime import Runtime


def cache_paths(rt: Runtime, uid: str) -> tuple[Path, Path]:
    base = Path(rt.settings.iso_cache_dir)
    return base / f"{uid}.img", base / f"{uid}.part"


def remove_cache(rt: Runtime, uid: str) -> None:
    for path in cache_paths(rt, uid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
