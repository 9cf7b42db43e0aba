"""AdapterSpec: one validated description of an adapter, and the named presets.

A spec is a layer kind plus modifiers (see `parts.py`), the shared hyperparameters
(r, alpha, dropout, target modules) and the options of its parts. The eleven methods of
the project are presets, i.e. data:

    lora        layer=lora                      Hu et al. 2021, arXiv 2106.09685
    rslora      layer=lora, scaling=rslora      Kalajdzievski 2023, arXiv 2312.03732
    dora        layer=dora                      Liu et al. 2024, arXiv 2402.09353
    vera        layer=vera (r=256)              Kopiczko et al. 2024, arXiv 2310.11454
    lora_fa     layer=lora, optimizer=lora_fa   Zhang et al. 2023, arXiv 2308.03303
    lora_plus   layer=lora, optimizer=lora_plus Hayou et al. 2024, arXiv 2402.12354
    delta_lora  layer=lora, step=delta_lora     Zi et al. 2023, arXiv 2309.02411
    qlora       layer=lora, base=nf4, optimizer=paged_adamw (r 64, alpha 16)
                                                Dettmers et al. 2023, arXiv 2305.14314
    loftq       layer=lora, base=nf4, init=loftq
                                                Li et al. 2023, arXiv 2310.08659
    adalora     layer=adalora (init r 12, target_r 8)
                                                Zhang et al. 2023, arXiv 2303.10512
    sora        layer=sora                      Ding et al. 2023, arXiv 2311.11696
    pissa       layer=lora, init=pissa          Meng et al. 2024, arXiv 2404.02948
    olora       layer=lora, init=olora          Büyükakyüz 2024, arXiv 2406.01775
    eva         layer=lora, init=eva            Paischer et al. 2024, arXiv 2410.07170
    corda       layer=lora, init=corda          Yang et al. 2024, arXiv 2406.05223
    lora_ga     layer=lora, init=lora_ga        Wang et al. 2024, arXiv 2407.05000

Every check happens when the spec is built, before any model is touched: unknown parts,
bad numbers, unknown options and incompatible combinations raise a ValueError that
names the bad value (and, for combinations, both parts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import parts as _parts

ALL_LINEAR = "all-linear"

PRESETS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"scaling": "rslora"},
    "dora": {"layer": "dora"},
    "vera": {"layer": "vera", "r": 256},
    "lora_fa": {"optimizer": "lora_fa"},
    "lora_plus": {"optimizer": "lora_plus"},
    "delta_lora": {"step": "delta_lora"},
    "qlora": {"base": "nf4", "optimizer": "paged_adamw", "r": 64, "alpha": 16},
    "loftq": {"base": "nf4", "init": "loftq"},
    "adalora": {"layer": "adalora", "r": 12, "target_r": 8},
    "sora": {"layer": "sora"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "eva": {"init": "eva"},
    "corda": {"init": "corda"},
    "lora_ga": {"init": "lora_ga"},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_targets(value: Any) -> tuple[str, ...]:
    """Target patterns as a tuple: "all-linear", "q_proj,v_proj" and ["q_proj", "v_proj"] all work."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"target_modules must be a string or a list of strings, got {value!r}")
    if not items or any(not isinstance(v, str) or not v.strip() for v in items):
        raise ValueError(f"target_modules must be non-empty names, got {value!r}")
    items = [v.strip() for v in items]
    if ALL_LINEAR in items and len(items) > 1:
        raise ValueError(f"target_modules: {ALL_LINEAR!r} cannot be combined with other names, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class AdapterSpec:
    """A complete, validated adapter description (immutable)."""

    layer: str = "lora"
    scaling: str = "standard"
    base: str = "full"
    init: str = "default"
    optimizer: str = "adamw"
    step: str = "none"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    options: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None

    def __post_init__(self) -> None:
        _ensure_parts_registered()
        for slot in _parts.SLOTS:
            value = getattr(self, slot)
            if not isinstance(value, str):
                raise ValueError(f"{slot} must be a name, got {value!r}")
            _parts.part_class(slot, value)
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))
        object.__setattr__(self, "options", self._checked_options(dict(self.options)))
        for part_cls in self.part_classes():
            part_cls.check_spec(self)

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterSpec:
        """Build a spec from a flat mapping (a params.yaml entry).

        `preset` names a method; the other keys override its fields or set part options.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"an adapter spec must be a mapping, got {values!r}")
        values = dict(values)
        preset = values.pop("preset", None)
        merged: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown variant {preset!r} (known: {', '.join(sorted(PRESETS))})")
            merged.update(PRESETS[preset])
        merged.update(values)
        field_names = {f.name for f in fields(cls)} - {"options", "preset"}
        core = {k: v for k, v in merged.items() if k in field_names}
        options = {k: v for k, v in merged.items() if k not in field_names}
        return cls(**core, options=options, preset=preset)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AdapterSpec:
        """The preset `name` with overrides, e.g. `AdapterSpec.from_preset("vera", r=64)`."""
        return cls.from_dict({"preset": name, **overrides})

    def with_(self, **changes: Any) -> AdapterSpec:
        """A copy with some fields or options changed (re-validated)."""
        core = {k: v for k, v in changes.items() if k in {f.name for f in fields(self)}}
        opts = {k: v for k, v in changes.items() if k not in core}
        options = {**self.options, **opts, **core.pop("options", {})}
        return replace(self, **core, options=options)

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready mapping that `from_dict` turns back into an equal spec."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("options", "preset")}
        out["target_modules"] = list(self.target_modules)
        out.update(self.options)
        if self.preset is not None:
            out["preset"] = self.preset
        return out

    # ----- parts ----------------------------------------------------------------------------
    def part_classes(self) -> list[type[_parts.Part]]:
        """The part class of every slot, in slot order."""
        return [_parts.part_class(slot, getattr(self, slot)) for slot in _parts.SLOTS]

    @property
    def scale(self) -> float:
        """The factor s of the update s.BA, as the scaling part defines it."""
        return _parts.part_class("scaling", self.scaling).factor(self.r, self.alpha)

    @property
    def label(self) -> str:
        """A short human label: the preset name, or the non-default parts."""
        if self.preset:
            return self.preset
        bits = [self.layer] + [getattr(self, s) for s in _parts.SLOTS[1:] if getattr(self, s) not in _DEFAULT_PARTS.values()]
        return "+".join(bits)

    def _checked_options(self, options: dict[str, Any]) -> dict[str, Any]:
        selected = {cls.slot: cls for cls in self.part_classes()}
        out: dict[str, Any] = {}
        for key, value in options.items():
            if not isinstance(key, str):
                raise ValueError(f"option names must be strings, got {key!r}")
            owner = _parts.option_owner(key)
            if owner is None:
                known = sorted({f.name for f in fields(self)} - {"options"} | _selected_option_names(selected))
                raise ValueError(f"unknown option {key!r} = {value!r} (known for this spec: {', '.join(known)})")
            if not issubclass(selected[owner.slot], owner):
                raise ValueError(
                    f"option {key!r} belongs to {_parts.owner_label(owner)}, but this spec uses "
                    f"{owner.slot}={getattr(self, owner.slot)}"
                )
            out[key] = owner.options[key].coerce(key, value)
        for cls in selected.values():
            for key, opt in cls.options.items():
                out.setdefault(key, opt.default)
        return out


_DEFAULT_PARTS = {"scaling": "standard", "base": "full", "init": "default", "optimizer": "adamw", "step": "none"}


def _selected_option_names(selected: Mapping[str, type[_parts.Part]]) -> set[str]:
    return {key for cls in selected.values() for key in cls.options}


def _ensure_parts_registered() -> None:
    # The parts register themselves on import; importing the package does that, but a
    # user may import `variants.spec` alone.
    from . import registry  # noqa: F401
