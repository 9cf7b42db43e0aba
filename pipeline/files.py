"""Atomic outputs: every stage writes to a temporary sibling and renames it into place.

A crash, a kill or an exception while writing leaves the previous output exactly as it was
(or no output at all), never a half-written file that a later stage would take as finished
(DVC's rule: outputs are rewritten whole).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from variants.io import staged_folder, staging_folder, swap_folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


# Yield an empty temporary folder; on success it replaces the path in one rename.
atomic_folder = staged_folder


def commit_outputs(files: dict[str, bytes | str] | None = None,
                   folders: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write several outputs so that a failure leaves every previous output as it was.

    Every file's bytes and every folder (built by `folders[path](tmp_folder)`) are first
    written to temporary siblings; only when all of them exist are they renamed into place.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in (files or {}).items():
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
            staged.append((Path(tmp), target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.chmod(tmp, 0o644)
        for path, build in (folders or {}).items():
            target = Path(path)
            tmp = staging_folder(target)
            staged.append((tmp, target))
            build(tmp)
    except BaseException:
        for tmp, _ in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        raise
    for tmp, target in staged:
        if tmp.is_dir():
            swap_folder(tmp, target)
        else:
            os.replace(tmp, target)
