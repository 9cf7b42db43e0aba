"""Atomic outputs: every stage writes to a temporary sibling and renames it into place.

A crash, a kill or an exception while writing leaves the previous output exactly as it was
(or no output at all), never a half-written file that a later stage would take as finished
(DVC's rule: outputs are rewritten whole).

A run killed mid-write (SIGKILL, power loss) cannot clean up after itself: its staging files
(`.<name>.tmp-*`) and a replaced folder on its way out (`.<name>.old-*`) stay beside the
output. Git and DVC ignore those names (.gitignore, .dvcignore), so they never show as
untracked files nor change a folder dependency's hash, and `remove_leftovers` deletes them
when a stage starts that writes the same output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


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


LEFTOVER_PATTERNS = (".{name}.tmp-*", ".{name}.old-*")  # what tempfile.mkstemp/mkdtemp make below


def remove_leftovers(targets: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete what killed runs left beside each target; returns the paths removed.

    A folder swap killed after moving the previous version aside but before the new one
    was in place leaves `.<name>.old-*/previous` and no target: that previous version is put
    back, so the output is as the last finished run left it.
    """
    removed = []
    for target in map(Path, targets):
        if not target.parent.is_dir():
            continue
        for pattern in LEFTOVER_PATTERNS:
            for leftover in sorted(target.parent.glob(pattern.format(name=glob.escape(target.name)))):
                previous = leftover / "previous"
                if ".old-" in leftover.name and not target.exists() and previous.exists():
                    os.replace(previous, target)
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
                removed.append(leftover)
    return removed


def staging_folder(target: Path) -> Path:
    """A new empty folder beside `target` (same file system, so it can be renamed onto it), with an
    ordinary folder's permissions (mkdtemp's are 0o700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def swap_folder(tmp: Path, target: Path) -> None:
    """Move the complete folder `tmp` to `target`, replacing what was there (if anything)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "previous", target)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty temporary folder; on success it replaces the path in one rename.

    (The same two steps as variants.io's, kept here so that stages which build no model — select —
    write folders without importing torch through the variants package.)"""
    target = Path(path)
    tmp = staging_folder(target)
    try:
        yield tmp
        swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
