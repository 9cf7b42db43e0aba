"""Adapter files: our own format, and PEFT's for the methods PEFT has.

Our format is a folder with `adapter_config.json` (format tag, the full spec, the adapted
layer names) and `adapter.safetensors` (only adapter tensors). `load` rebuilds the
adapter on a fresh copy of the same base model from those two files alone.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` as PEFT 0.21
names them (peft_type LORA with use_rslora / use_dora, SoRA as LORA with rank_pattern /
alpha_pattern, VERA, ADALORA with its rank masks; see `peft_format`), so that
`PeftModel.from_pretrained(base, folder)` reproduces our logits. Methods PEFT lacks, or
whose result a PEFT adapter cannot express (Delta-LoRA changes the base weights), are
refused with a message that says why. The other direction is `peft_load.load_peft`.

Writes are atomic: files go to a temporary sibling folder that replaces the target
only once complete, so a crash never leaves a half-written adapter behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import AdaptedModel, build
from .peft_format import to_peft
from .spec import AdapterSpec

FORMAT = "lora-variants-workbench/adapter/1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


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


def staging_folder(target: Path) -> Path:
    """A new empty folder beside `target` (same file system, so it can be renamed onto it).

    mkdtemp makes it private (0o700); it gets an ordinary folder's permissions (0o777 minus the
    umask) so that the renamed result looks like any other folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `directory` in one rename, on an
    error it is removed and `directory` stays as it was."""
    target = Path(directory)
    tmp = staging_folder(target)
    try:
        yield tmp
        swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh staging folder, then move it to `directory` in one rename."""
    with staged_folder(directory) as tmp:
        write(tmp)
    return Path(directory)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, imported adapters)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save(adapted: AdaptedModel, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Save the adapter (config + tensors) to `directory`, atomically."""
    config = {
        "format": FORMAT,
        "spec": adapted.spec.to_dict(),
        "layers": list(adapted.layers),
        "rank_pattern": adapted.rank_pattern(),
        "metadata": metadata or {},
    }

    def write(tmp: Path) -> None:
        save_file(_contiguous(adapted.adapter_state_dict()), tmp / WEIGHTS_NAME, metadata={"format": FORMAT})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    return write_folder_atomically(directory, write)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an adapter of this library (format {config.get('format')!r}, expected {FORMAT!r})")
    return config


def load(model: nn.Module, directory: str | os.PathLike) -> AdaptedModel:
    """Rebuild a saved adapter on `model` (a fresh copy of the base it was trained on)."""
    config = read_config(directory)
    spec = AdapterSpec.from_dict(config["spec"])
    # deferred: the init runs no SVD and no calibration; a base-rewriting init rebuilds its
    # residual from the saved initial factors (the same formula: bitwise the training-time base)
    adapted = build(model, spec, rank_pattern=config.get("rank_pattern") or None, deferred_init=True)
    if list(adapted.layers) != config["layers"]:
        raise ValueError(f"the adapter was saved for layers {config['layers'][:3]}..., this model's targets are "
                         f"{list(adapted.layers)[:3]}...")
    adapted.load_adapter_state_dict(load_file(str(Path(directory) / WEIGHTS_NAME)))
    return adapted


def file_bytes(directory: str | os.PathLike) -> int:
    """Size of a saved adapter's tensor file in bytes."""
    return (Path(directory) / WEIGHTS_NAME).stat().st_size


# ----- PEFT format -----------------------------------------------------------------------------------
def export_peft(adapted: AdaptedModel, directory: str | os.PathLike) -> Path:
    """Write the adapter in PEFT's format (atomically); `peft_format` has the mapping per PEFT type."""
    config, tensors = to_peft(adapted)
    tensors = _contiguous(tensors)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))

    return write_folder_atomically(directory, write)
