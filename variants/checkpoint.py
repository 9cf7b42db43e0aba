"""Training checkpoints as safetensors + JSON, so a killed run resumes to the same result.

A checkpoint holds everything the next step depends on: the adapter tensors, the optimizer
and scheduler state, the RNG states (torch, Python, NumPy), the step, every part's own
state (AdaLoRA's importance averages, SoRA's gate optimizer, Delta-LoRA's base weights and
reference factors) and an optional caller payload (e.g. the loss curve so far). Resuming
from it on CPU with the same thread count gives bit-identical weights to a run that was
never interrupted.

Nothing is pickled: nested state is split into a JSON skeleton and a flat safetensors file
of its tensors, and read back without executing anything. A checkpoint carries a
fingerprint of the run's configuration and is ignored when it does not match (another spec,
another budget, other data).

Layout of the folder: `current/` (the newest) and `previous/` (the one before), each with
state.safetensors, state.json and, written last, manifest.json (size and SHA-256 of each
file). A save builds the new checkpoint in a staging folder, moves `current` to `previous`
and the new one to `current`, each by one rename, so a kill at any moment leaves at least
one complete checkpoint. Before resuming, a checkpoint is checked against its manifest (a
disk that filled up, a copy cut short, a flipped bit, a deleted file); a bad one is moved
aside to `<name>.bad` with a one-line warning naming it, and training resumes from the
previous good checkpoint, or from scratch when there is none.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed
from .io import file_sha256, staging_folder

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
MANIFEST = "manifest.json"
FORMAT = "lora-variants-workbench/checkpoint/2"  # 2: with manifest.json and a previous/ checkpoint


# ----- nested state <-> (JSON skeleton, flat tensors) -------------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A JSON-able skeleton of `obj` with every tensor replaced by a reference into `tensors`."""
    tensors = {} if tensors is None else tensors

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": walk(torch.from_numpy(x.copy()))}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return {"__float__": repr(x)}
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a {type(x).__name__}")

    return walk(obj), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return walk(x["__ndarray__"]).numpy()
            if "__dict__" in x:
                return {walk(k): walk(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__float__" in x:
                return float(x["__float__"])
            raise ValueError(f"unknown checkpoint node {sorted(x)}")
        return x

    return walk(skeleton)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(tuple(state["numpy"]))


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in `folder` (call it last)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))


def verify(folder: Path) -> str | None:
    """Why `folder` is not the complete checkpoint its manifest describes, or None when it is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"{MANIFEST} is not a checkpoint manifest of format {FORMAT}"
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name in (STATE_JSON, STATE_TENSORS):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


class Checkpointer:
    """Periodic, atomic, verified checkpoints of one training run in `folder` (every `every` steps)."""

    def __init__(self, folder: str | os.PathLike, every: int, fingerprint: str,
                 get_extra: Callable[[], Any] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"checkpoint interval must be a positive integer, got {every!r}")
        self.folder = Path(folder)
        self.every = every
        self.fingerprint = fingerprint
        self.get_extra = get_extra  # caller's state saved beside the training state ("extra")
        self._loaded: dict[str, Any] | None = None
        self._checked = False
        self.resumed_from: Path | None = None  # the checkpoint `load` returned

    @property
    def current(self) -> Path:
        return self.folder / "current"

    @property
    def previous(self) -> Path:
        return self.folder / "previous"

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` (whole tensors) as the new current checkpoint; under a process group only
        rank 0 writes (the other ranks return at once)."""
        if distributed.world().rank != 0:
            return
        payload = {**state, "extra": self.get_extra() if self.get_extra else None}
        skeleton, tensors = flatten_state(payload)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "step": state["step"], "state": skeleton}
        self._remove_leftovers()
        tmp = staging_folder(self.current)
        try:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": FORMAT})
            (tmp / STATE_JSON).write_text(json.dumps(meta))
            write_manifest(tmp)
            self._rotate(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._loaded = None

    def _rotate(self, new: Path) -> None:
        # current -> previous, new -> current; at every moment one complete checkpoint exists
        trash = None
        if self.current.exists():
            if self.previous.exists():
                trash = self.folder / f".previous.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.previous, trash)
            os.replace(self.current, self.previous)
        os.replace(new, self.current)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def load(self) -> dict[str, Any] | None:
        """The newest good saved state for this fingerprint, or None (start from scratch).

        Read from disk once: the caller (e.g. the pipeline, for its "extra") and the training
        loop both ask for it at the start of a resumed run. A checkpoint that fails its
        manifest is moved aside with a one-line warning, and the previous one is tried.
        """
        if self._checked:
            return self._loaded
        self._checked = True
        if distributed.world().world_size > 1:
            # every rank calls load; rank 0 reads first and sets bad checkpoints aside, the others
            # read after it, so no two processes move the same folder
            if distributed.world().rank == 0:
                self._load()
                distributed.barrier()
            else:
                distributed.barrier()
                self._load()
            return self._loaded
        self._load()
        return self._loaded

    def _load(self) -> None:
        self._remove_leftovers()
        bad: list[tuple[Path, str, Path]] = []
        for folder in (self.current, self.previous):
            if not folder.is_dir():
                continue
            state, reason = self._read(folder)
            if reason is not None:
                aside = folder.with_name(folder.name + ".bad")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(folder, aside)
                bad.append((folder, reason, aside))
                continue
            if state is not None:
                self._loaded, self.resumed_from = state, folder
                break
        then = (f"resuming from {self.resumed_from} (step {self._loaded['step']})" if self._loaded is not None
                else "training starts from scratch")
        for folder, reason, aside in bad:
            print(f"WARNING: checkpoint {folder} is unusable ({reason}); moved to {aside}; {then}",
                  file=sys.stderr, flush=True)

    def _read(self, folder: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(state, None) for a good checkpoint of this run, (None, None) for another run's, (None, why) for a bad one."""
        reason = verify(folder)
        if reason is not None:
            return None, reason
        try:
            meta = json.loads((folder / STATE_JSON).read_text())
            if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
                return None, None
            return unflatten_state(meta["state"], load_file(str(folder / STATE_TENSORS))), None
        except Exception as err:  # noqa: BLE001 - verified yet unreadable (a broken writer): treat as bad
            return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    def _remove_leftovers(self) -> None:
        # staging folders and replaced checkpoints of a run killed while saving
        if self.folder.is_dir():
            for leftover in [*self.folder.glob(".current.tmp-*"), *self.folder.glob(".*.old-*")]:
                shutil.rmtree(leftover, ignore_errors=True)

    def clear(self) -> None:
        """Remove the checkpoints (the run finished); checkpoints set aside as bad stay for inspection.
        Under a process group only rank 0 removes files."""
        if distributed.world().rank != 0:
            return
        for path in (self.current, self.previous):
            shutil.rmtree(path, ignore_errors=True)
        self._remove_leftovers()
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
        self._loaded = None
        self._checked = False
        self.resumed_from = None
