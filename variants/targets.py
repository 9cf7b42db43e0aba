"""Which modules of a model get an adapter.

Patterns are module-name suffixes as in PEFT's list form: "q_proj" matches
"model.layers.0.self_attn.q_proj" (a full name matches itself). "all-linear" takes every
linear layer (nn.Linear, GPT-2's Conv1D) except the output head. Every pattern must match
at least one module, and every match must be a supported linear layer; otherwise a
ValueError names the pattern, before anything is modified.

A target whose weight is shared with another module (a tied `lm_head`, whose weight is
the input embedding matrix in SmolLM2 and GPT-2) is refused: merging the adapter, or
Delta-LoRA's update of W, would write into the shared tensor and change the other module
too. PEFT only warns here; untie the weight first if the head must be adapted.
"""

from __future__ import annotations

from torch import nn

from .core import FOREIGN_QUANTIZED, AdapterLayer, supported_base_layers
from .spec import ALL_LINEAR


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def find_targets(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module to adapt, in the model's module order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    supported = supported_base_layers()
    if any(isinstance(m, AdapterLayer) for _, m in named):
        raise ValueError(f"{type(model).__name__} already carries adapter layers; build on a fresh base model")
    if patterns == (ALL_LINEAR,):
        head = _output_head(model)
        foreign = [n for n, m in named if type(m).__name__ in FOREIGN_QUANTIZED]
        if foreign:
            raise ValueError(f"{foreign[0]!r} is a {type(model.get_submodule(foreign[0])).__name__} quantized by "
                             "another library; load the base in full precision and use base=nf4")
        found = [(n, m) for n, m in named
                 if isinstance(m, supported) and m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
        if not found:
            raise ValueError(f"target_modules={ALL_LINEAR!r} matches no linear layer in {type(model).__name__}")
        _refuse_tied(model, found)
        return found
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [(n, m) for n, m in named if n == pattern or n.endswith("." + pattern)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, supported)})
            raise ValueError(
                f"target pattern {pattern!r} matches no module of {type(model).__name__} "
                f"(its linear layers are named: {', '.join(leaves)})"
            )
        for n, m in hits:
            if type(m).__name__ in FOREIGN_QUANTIZED:
                raise ValueError(
                    f"target pattern {pattern!r} matches {n!r}, a {type(m).__name__} quantized by another library; "
                    "load the base in full precision and use base=nf4 (this library quantizes it itself)"
                )
            if not isinstance(m, supported):
                raise ValueError(
                    f"target pattern {pattern!r} matches {n!r}, a {type(m).__name__}; only linear layers "
                    f"({', '.join(t.__name__ for t in supported)}) can be adapted"
                )
            chosen.add(n)
    found = [(n, m) for n, m in named if n in chosen]
    _refuse_tied(model, found)
    return found


def _refuse_tied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Raise if a target's weight tensor is also reachable under another name (tied weights)."""
    names_of: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    for name, module in targets:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue  # a 4-bit base holds codes, which nothing else shares
        others = [n for n in names_of.get(id(weight), []) if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"{name}.weight is tied to {others[0]} (one shared tensor): merging an adapter on {name} "
                f"(or Delta-LoRA's update of W) would also change {others[0]}. Leave {name} out of "
                f"target_modules, or untie it first ({name}.weight = nn.Parameter({name}.weight.detach().clone()) "
                "and config.tie_word_embeddings = False)"
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
