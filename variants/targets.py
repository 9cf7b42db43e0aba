"""Which modules of a model get an adapter.

Patterns are module-name suffixes as in PEFT's list form: "q_proj" matches
"model.layers.0.self_attn.q_proj" (a full name matches itself). "all-linear" takes every
linear layer (nn.Linear, GPT-2's Conv1D) except the output head. Every pattern must match
at least one module, and every match must be a supported linear layer; otherwise a
ValueError names the pattern, before anything is modified.
"""

from __future__ import annotations

from torch import nn

from .core import FOREIGN_QUANTIZED, SUPPORTED_BASE_LAYERS, AdapterLayer
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
    if any(isinstance(m, AdapterLayer) for _, m in named):
        raise ValueError(f"{type(model).__name__} already carries adapter layers; build on a fresh base model")
    if patterns == (ALL_LINEAR,):
        head = _output_head(model)
        foreign = [n for n, m in named if type(m).__name__ in FOREIGN_QUANTIZED]
        if foreign:
            raise ValueError(f"{foreign[0]!r} is a {type(model.get_submodule(foreign[0])).__name__} quantized by "
                             "another library; load the base in full precision and use base=nf4")
        found = [(n, m) for n, m in named
                 if isinstance(m, SUPPORTED_BASE_LAYERS) and m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
        if not found:
            raise ValueError(f"target_modules={ALL_LINEAR!r} matches no linear layer in {type(model).__name__}")
        return found
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [(n, m) for n, m in named if n == pattern or n.endswith("." + pattern)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, SUPPORTED_BASE_LAYERS)})
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
            if not isinstance(m, SUPPORTED_BASE_LAYERS):
                raise ValueError(
                    f"target pattern {pattern!r} matches {n!r}, a {type(m).__name__}; only linear layers "
                    f"({', '.join(t.__name__ for t in SUPPORTED_BASE_LAYERS)}) can be adapted"
                )
            chosen.add(n)
    return [(n, m) for n, m in named if n in chosen]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
