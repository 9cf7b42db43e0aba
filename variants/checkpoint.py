"""Training checkpoints as safetensors + JSON, so a killed run resumes to the same result.

A checkpoint holds everything the next step depends on: the adapter tensors, the optimizer
and scheduler state, the RNG states (torch, Python, NumPy), the step, every part's own
state (AdaLoRA's importance averages, SoRA's gate optimizer, Delta-LoRA's base weights and
reference factors) and an optional caller payload (e.g. the loss curve so far). Resuming
from it on CPU with the same thread count gives bit-identical weights to a run that was
never interrupted.

Nothing is pickled: nested state is split into a JSON skeleton and a flat safetensors file
of its tensors, and read back without executing anything. Each save writes a complete new
folder and swaps it in with one rename, so a kill at any moment leaves either the previous
checkpoint or the new one. A checkpoint carries a fingerprint of the run's configuration
and is ignored when it does not match (another spec, another budget, other data).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io import write_folder_atomically

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT = "lora-variants-workbench/checkpoint/1"


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


class Checkpointer:
    """Periodic, atomic checkpoints of one training run in `folder` (every `every` steps)."""

    def __init__(self, folder: str | os.PathLike, every: int, fingerprint: str,
                 get_extra: Callable[[], Any] | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"checkpoint interval must be a positive integer, got {every!r}")
        self.folder = Path(folder)
        self.every = every
        self.fingerprint = fingerprint
        self.get_extra = get_extra  # caller's state saved beside the training state ("extra")
        self._loaded: dict[str, Any] | None = None

    @property
    def current(self) -> Path:
        return self.folder / "current"

    def save(self, state: dict[str, Any]) -> None:
        payload = {**state, "extra": self.get_extra() if self.get_extra else None}
        skeleton, tensors = flatten_state(payload)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "step": state["step"], "state": skeleton}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": FORMAT})
            (tmp / STATE_JSON).write_text(json.dumps(meta))

        write_folder_atomically(self.current, write)
        self._loaded = None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none for this fingerprint.

        Read from disk once: the caller (e.g. the pipeline, for its "extra") and the training
        loop both ask for it at the start of a resumed run.
        """
        if self._loaded is not None:
            return self._loaded
        meta_path = self.current / STATE_JSON
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            return None
        self._loaded = unflatten_state(meta["state"], load_file(str(self.current / STATE_TENSORS)))
        return self._loaded

    def clear(self) -> None:
        """Remove the checkpoint (the run finished)."""
        shutil.rmtree(self.current, ignore_errors=True)
        self._loaded = None
