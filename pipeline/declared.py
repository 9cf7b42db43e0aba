"""A stage's view of params.yaml: only the keys that dvc.yaml declares for that stage.

DVC reruns a stage when one of the params in its `params:` list changes, and never for any
other key. A stage that reads an undeclared key therefore produces results that silently do
not follow that key (measured: `train` read `model.dtype` without declaring it, so switching
to bfloat16 retrained nothing and float32 results carried the bfloat16 label).

`restrict(params, stage)` wraps the validated `Params` of the whole file: reading a key that
the stage's `params:` entries do not cover raises `UndeclaredParamError` at once, naming the
key, the stage and what it declares; every read is recorded in `reads` so tests can compare
them with dvc.yaml. A fully declared section (`train`) is handed out as the real object; a
partly declared one (`data` when only `data.max_length` is declared) as a view that checks
each field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import SAFE_LOADER, Params, ParamsError

# The dvc.yaml that ships with this code (the project root): the stage scripts and their
# declarations always come from the same checkout, also in DVC's temporary experiment copies.
DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
PARAMS_FILE = "params.yaml"


class UndeclaredParamError(RuntimeError):
    """A stage read a params.yaml key that its dvc.yaml entry does not declare (a bug in the stage or in dvc.yaml)."""


def declared_params(stage: str, dvc_yaml: str | os.PathLike = DVC_YAML) -> tuple[str, ...]:
    """The params.yaml keys that dvc.yaml declares for `stage` ("train@lora-0-1", "select@lora", "compare", ...)."""
    dvc_yaml = Path(dvc_yaml)
    try:
        stages = (yaml.load(dvc_yaml.read_text(encoding="utf-8"), Loader=SAFE_LOADER) or {}).get("stages") or {}
    except OSError as err:
        raise UndeclaredParamError(f"cannot read the stage declarations in {dvc_yaml}: {err}") from None
    entry, values = stage_entry(stage, stages, dvc_yaml.name)
    keys: list[str] = []
    for item in entry.get("params") or []:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, Mapping):  # {params.yaml: [keys]}; other files are not ours
            keys.extend(item.get(PARAMS_FILE) or [])
    resolved = tuple(substitute(k, values) for k in keys)
    unresolved = [k for k in resolved if "${" in k]
    if unresolved:
        raise UndeclaredParamError(f"{dvc_yaml.name}: stage {stage!r} declares params {unresolved} that only "
                                   f"{', '.join(values) or 'nothing'} may parametrize")
    return resolved


def stage_entry(stage: str, stages: Mapping, where: str = "dvc.yaml") -> tuple[Mapping, dict[str, str]]:
    """The dvc.yaml entry that runs `stage`, and the values of its `${...}` placeholders.

    `name@key` names one stage of a `foreach` (`${item}` for a list, `${key}` and `${item}` for a
    mapping: the key) or of a `matrix`, whose key is its values joined by '-' in the matrix's
    order: `train@lora-0-1` is variant lora, seed 0, lr 1 (`${item.variant}`, ...). Only the last
    value may hold a '-' (an lr label such as 1e-05; variant names and seeds cannot).
    """
    name, at, key = stage.partition("@")
    entry = stages.get(name)
    if entry is None:
        raise UndeclaredParamError(f"{where} has no stage {name!r} (stages: {', '.join(stages)})")
    if "foreach" in entry:
        if not key:
            raise UndeclaredParamError(f"{where}: stage {name!r} is a foreach stage; name it as {name}@<key>, "
                                       f"got {stage!r}")
        return entry["do"], {"${item}": key, "${key}": key}
    if "matrix" in entry:
        dims = list(entry["matrix"])
        parts = key.split("-", len(dims) - 1) if key else []
        if len(parts) != len(dims) or not all(parts):
            form = "-".join(f"<{d}>" for d in dims)
            raise UndeclaredParamError(f"{where}: stage {name!r} is a matrix stage; name it as {name}@{form}, "
                                       f"got {stage!r}")
        return entry, {f"${{item.{d}}}": part for d, part in zip(dims, parts, strict=True)}
    if at:
        raise UndeclaredParamError(f"{where}: stage {name!r} is neither a foreach nor a matrix stage, got {stage!r}")
    return entry, {}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`text` with each placeholder of `values` (from `stage_entry`) replaced."""
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def restrict(params: Params, stage: str, declared: tuple[str, ...] | None = None) -> StageParams:
    """`params` as `stage` may read them (its dvc.yaml `params:` list unless `declared` is given)."""
    if declared is None:
        declared = declared_params(stage)
    return StageParams(params, _Guard(stage, tuple(declared)))


class _Guard:
    def __init__(self, stage: str, declared: tuple[str, ...]):
        self.stage = stage
        self.declared = declared
        self.reads: set[str] = set()

    def covers(self, path: str) -> bool:
        return any(path == d or path.startswith(d + ".") for d in self.declared)

    def read(self, path: str, value: Any) -> Any:
        if self.covers(path):
            self.reads.add(path)
            return value
        if any(d.startswith(path + ".") for d in self.declared):
            # partly declared: the caller gets a view that checks each field it reads
            return _MappingView(value, path, self) if isinstance(value, Mapping) else _View(value, path, self)
        raise UndeclaredParamError(
            f"stage {self.stage} reads params.yaml key {path!r}, which its `params:` list in dvc.yaml does not "
            f"declare (declared: {', '.join(self.declared) or 'nothing'}); declare it there, or DVC will not rerun "
            "the stage when it changes")

    def used(self) -> set[str]:
        """The declared entries that some read touched."""
        return {d for d in self.declared
                if any(r == d or r.startswith(d + ".") or d.startswith(r + ".") for r in self.reads)}


class _View:
    """A dataclass whose fields are declared one by one."""

    __slots__ = ("_guard", "_obj", "_path")

    def __init__(self, obj: Any, path: str, guard: _Guard):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_guard", guard)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._guard.read(f"{self._path}.{name}", getattr(self._obj, name))

    @property
    def __dict__(self) -> dict:  # vars(view) reads every field: the whole section must be declared
        return vars(self._guard.read(self._path + ".*", self._obj))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"params are read-only ({self._path}.{name})")


class _MappingView(Mapping):
    """A mapping (the `variants` section) whose entries are declared one by one."""

    def __init__(self, obj: Mapping, path: str, guard: _Guard):
        self._obj, self._path, self._guard = obj, path, guard

    def __getitem__(self, key: str) -> Any:
        return self._guard.read(f"{self._path}.{key}", self._obj[key])

    def _whole(self) -> Mapping:  # listing the entries reads them all
        return self._guard.read(self._path + ".*", self._obj)

    def __iter__(self) -> Iterator[str]:
        return iter(self._whole())

    def __len__(self) -> int:
        return len(self._whole())

    def __contains__(self, key: object) -> bool:
        return key in self._whole()


class StageParams:
    """The params one stage may read; see the module docstring."""

    def __init__(self, params: Params, guard: _Guard):
        self._params = params
        self._guard = guard

    @property
    def stage(self) -> str:
        return self._guard.stage

    @property
    def declared(self) -> tuple[str, ...]:
        return self._guard.declared

    @property
    def reads(self) -> set[str]:
        """Every key path read so far."""
        return set(self._guard.reads)

    def used(self) -> set[str]:
        """The declared entries that some read touched."""
        return self._guard.used()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if not hasattr(self._params, name) or callable(getattr(self._params, name)):
            raise AttributeError(name)
        return self._guard.read(name, getattr(self._params, name))

    def get_variant(self, name: str):
        """variants.<name>, or a ParamsError naming the variants there are."""
        if name not in self._params.variants:
            raise ParamsError(f"params.yaml: unknown variant {name!r} (variants: {', '.join(self._params.variants)})")
        return self._guard.read(f"variants.{name}", self._params.variants[name])
