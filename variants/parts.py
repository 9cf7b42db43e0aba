"""The composable parts of an adapter spec, their options and their registry.

A LoRA-family method is one *layer kind* plus orthogonal *modifiers* (docs/README.md):

    slot       values (this module's registry)          what it decides
    ---------  ---------------------------------------  -----------------------------------------
    layer      lora, dora, vera, ...                    forward pass, trainable tensors, merge
    scaling    standard (alpha/r), rslora (alpha/sqrt r)  the factor s in  W0 + s.BA
    base       full, ...                                how the frozen base weights are stored
    init       default, ...                             how the adapter tensors start
    optimizer  adamw, lora_plus, lora_fa, ...           optimizer and its parameter groups
    step       none, delta_lora, ...                    what happens around each optimizer step

Every part implements the same training hooks (`param_groups`, `extra_loss`,
`before_optimizer_step`, `after_optimizer_step`, `finalize`, `state_dict`); the base
class makes them no-ops, so a training loop calls all of them for every variant and
never branches on a variant's name. The optimizer-step hooks receive the optimizer that
steps (a part that needs its learning rate reads the rate in force, schedule included).

A modifier that only works on some layer kinds says which *capabilities* it needs
(`layer_needs`, flags declared on the layer-kind classes such as `trains_lora_pair`),
not which layer kinds it knows: a new layer kind declares its flags and every modifier
accepts or refuses it without being edited.

A part's options are flat keys of the spec (`loraplus_ratio`, `d_initial`, ...), so a
params.yaml entry stays scalar and `dvc exp run -S variants.vera.d_initial=0.05` works.
Option names are unique across all parts; registering a clash is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .model import AdaptedModel
    from .spec import AdapterSpec

SLOTS: tuple[str, ...] = ("layer", "scaling", "base", "init", "optimizer", "step")


@dataclass(frozen=True)
class Option:
    """One typed option of a part, with its default and the rule its value must obey."""

    default: Any
    kind: type
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    help: str = ""

    def coerce(self, key: str, value: Any) -> Any:
        """Return `value` as this option's type, or raise a ValueError naming key and value."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"option {key!r} must be true or false, got {value!r}")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"option {key!r} must be an integer, got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"option {key!r} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"option {key!r} must be finite, got {value!r}")
        elif self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"option {key!r} must be a string, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"option {key!r} must be {self.rule}, got {value!r}")
        return value


class Part:
    """Base class of every part: metadata plus no-op training hooks.

    Subclasses set `slot`, `name`, `idea` (one line, used by the report), `options`,
    `requires`: for another slot, the names this part can be combined with and why, and
    `layer_needs`: capability flags the spec's layer kind must declare true, and why.
    """

    slot: ClassVar[str]
    name: ClassVar[str]
    idea: ClassVar[str] = ""
    idea_zh: ClassVar[str] = ""  # the same in Chinese, for the report's Chinese twin
    options: ClassVar[dict[str, Option]] = {}
    requires: ClassVar[dict[str, tuple[frozenset[str], str]]] = {}
    layer_needs: ClassVar[dict[str, str]] = {}  # capability flag of the layer kind -> why it is needed
    # False where the adapter cannot be written in PEFT's format (PEFT lacks the method,
    # or the part changes what a PEFT adapter can express, e.g. the base weights).
    peft_exportable: ClassVar[bool] = True
    # False where merging the update into the base cannot be exact (a 4-bit base).
    merge_is_exact: ClassVar[bool] = True
    # Bytes of state the part keeps per element of every adapted base weight during training
    # on a half-precision base (Delta-LoRA: its fp32 residual of W's updates); memory projections use it.
    state_bytes_per_base_weight: ClassVar[float] = 0.0

    def __init__(self, spec: AdapterSpec):
        self.spec = spec
        self.opts = SimpleNamespace(**{k: spec.options.get(k, o.default) for k, o in self.options.items()})

    # ----- validation -------------------------------------------------------------------
    @classmethod
    def check_spec(cls, spec: AdapterSpec) -> None:
        """Raise ValueError if this part cannot be combined with the rest of `spec`."""
        for other_slot, (allowed, why) in cls.requires.items():
            other = getattr(spec, other_slot)
            if other not in allowed:
                raise ValueError(
                    f"incompatible combination: {cls.slot}={cls.name} with {other_slot}={other}: {why}"
                )
        if cls.layer_needs:
            layer = part_class("layer", spec.layer)
            for flag, why in cls.layer_needs.items():
                if not hasattr(layer, flag):
                    raise TypeError(f"{cls.slot}={cls.name} asks for the capability {flag!r}, "
                                    "which no layer kind declares")
                if not getattr(layer, flag):
                    raise ValueError(
                        f"incompatible combination: {cls.slot}={cls.name} with layer={spec.layer}: {why}"
                    )

    # ----- model-time hooks ------------------------------------------------------------------
    def check_target(self, name: str, module: torch.nn.Module) -> None:
        """Raise ValueError if this part cannot work on `module` (called for every target before any change)."""

    def configure(self, adapted: AdaptedModel) -> None:
        """Called once after the adapter layers exist (e.g. LoRA-FA freezes A, LoftQ initialises)."""

    # ----- training hooks (no-ops unless a part needs them) --------------------------------
    def param_groups(self, adapted: AdaptedModel, groups: list[dict]) -> list[dict]:
        """Rewrite the optimizer's parameter groups (e.g. LoRA+ splits A and B)."""
        return groups

    def extra_loss(self, adapted: AdaptedModel, step: int) -> torch.Tensor | None:
        """A term added to the task loss before backward (e.g. an orthogonality penalty)."""
        return None

    def before_optimizer_step(self, adapted: AdaptedModel, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after backward and gradient clipping, right before `optimizer.step()`."""

    def after_optimizer_step(self, adapted: AdaptedModel, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called right after `optimizer.step()` and before `zero_grad()` and the scheduler's step
        (gradients still there; `optimizer`'s groups hold the learning rate this step used)."""

    def finalize(self, adapted: AdaptedModel) -> None:
        """Called once when training ends (e.g. prune, fix a rank pattern)."""

    def summary(self, adapted: AdaptedModel) -> dict[str, Any]:
        """What this part wants reported after training (e.g. AdaLoRA's ranks), JSON-ready."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Training state this part keeps between steps (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    # ----- persistence ----------------------------------------------------------------------------
    def adapter_tensors(self, adapted: AdaptedModel) -> dict[str, torch.Tensor]:
        """Tensors beyond the layers' own that a saved adapter needs (keys unique to the part)."""
        return {}

    def load_adapter_tensors(self, adapted: AdaptedModel, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `adapter_tensors` saved, after the layers' tensors are loaded."""


_REGISTRY: dict[str, dict[str, type[Part]]] = {slot: {} for slot in SLOTS}
_OPTION_OWNER: dict[str, type[Part]] = {}


def register(cls: type[Part]) -> type[Part]:
    """Class decorator: add a part to the registry of its slot.

    Names are lowercase identifiers, unique within a slot; option keys are unique across
    all parts (they share the spec's flat namespace).
    """
    slot, name = getattr(cls, "slot", None), getattr(cls, "name", None)
    if slot not in _REGISTRY:
        raise ValueError(f"part {cls.__name__} has unknown slot {slot!r} (slots: {', '.join(SLOTS)})")
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"part name must be a lowercase identifier, got {name!r}")
    if name in _REGISTRY[slot]:
        raise ValueError(f"{slot} part {name!r} is registered twice")
    # An option belongs to the class that declares it (a subclass, or a sibling sharing an
    # unregistered base class, accepts it too); the same key declared twice is a clash. The
    # declarer is the most basic class listing the key, so a subclass may spread its base's
    # options into its own (`options = {**DataInit.options, ...}`).
    def declarer_of(key: str) -> type:
        return next(c for c in reversed(cls.__mro__) if key in c.__dict__.get("options", {}))

    for key in cls.options:
        declarer = declarer_of(key)
        owner = _OPTION_OWNER.get(key)
        if owner is not None and owner is not declarer:
            raise ValueError(f"option {key!r} of {slot}={name} is already declared by {owner.__name__}")
    for key in cls.options:
        _OPTION_OWNER[key] = declarer_of(key)
    _REGISTRY[slot][name] = cls
    return cls


def part_class(slot: str, name: str) -> type[Part]:
    """The registered part `name` of `slot`, or a ValueError listing the known ones."""
    known = _REGISTRY[slot]
    if name not in known:
        label = "layer kind" if slot == "layer" else f"{slot} part"
        raise ValueError(f"unknown {label} {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


def names(slot: str) -> list[str]:
    """Registered part names of one slot, sorted."""
    return sorted(_REGISTRY[slot])


def option_owner(key: str) -> type[Part] | None:
    """The part class that declares option `key` (its subclasses accept it too), if any."""
    return _OPTION_OWNER.get(key)


def owner_label(owner: type[Part]) -> str:
    """"slot=name" of the registered parts that accept an owner's options, e.g. "base=nf4/fp4"."""
    accepting = [c.name for c in _REGISTRY[owner.slot].values() if issubclass(c, owner)]
    return f"{owner.slot}={'/'.join(accepting)}"
