"""The default part of every modifier slot: plain alpha/r scaling, a full-precision
base, the layer's own initialisation, AdamW, and no step hook (Hu et al. 2021,
arXiv 2106.09685: W = W0 + (alpha/r)·BA, A Kaiming-uniform, B = 0, trained with Adam)."""

from __future__ import annotations

import torch

from .parts import Part, register


@register
class StandardScaling(Part):
    slot = "scaling"
    name = "standard"
    idea = "s = alpha / r"

    @staticmethod
    def factor(r: int, alpha: float) -> float:
        return alpha / r


class BaseStorage(Part):
    """A `base` part decides how the frozen base layers are stored (full precision, 4-bit, ...)."""

    slot = "base"

    def convert(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """The base layer the adapter wraps (default: the module itself)."""
        return module


@register
class FullPrecisionBase(BaseStorage):
    name = "full"
    idea = "frozen base weights kept in their own dtype"

    def check_target(self, name: str, module: torch.nn.Module) -> None:
        from .core import is_quantized

        if is_quantized(module):
            raise ValueError(f"{name} is stored quantized; a spec with base=full needs full-precision weights "
                             "(use base=nf4 to train on a 4-bit base)")


class InitPart(Part):
    """An `init` part may overwrite a new layer's tensors (and its base) from the original module."""

    slot = "init"

    def init_layer(self, name: str, layer, original: torch.nn.Module) -> None:
        """Called right after `layer` was built around the (converted) base of `original`."""


@register
class DefaultInit(InitPart):
    name = "default"
    idea = "each layer kind's own initialisation (LoRA: A Kaiming-uniform, B = 0)"


@register
class NoStepHook(Part):
    slot = "step"
    name = "none"
    idea = "nothing happens around the optimizer step"


def strip_names(groups: list[dict]) -> list[dict]:
    """Parameter groups without our bookkeeping key `names` (torch optimizers get only params and hyperparameters)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def resolve_lr(groups: list[dict], lr: float) -> list[dict]:
    """Turn a group's relative `lr_scale` (set by parts that know ratios, not rates) into its `lr`.

    `lr_scale` stays in the group (torch optimizers keep extra keys and ignore them), so a hook
    can recover the base rate the schedule is at: lr / lr_scale (SoRA's gate step).
    """
    out = []
    for g in groups:
        g = dict(g)
        g["lr_scale"] = float(g.get("lr_scale", 1.0))
        g["lr"] = lr * g["lr_scale"]
        out.append(g)
    return out


def base_lr(group: dict) -> float:
    """The base learning rate in force for a group built by `resolve_lr` (the schedule included).

    A group without `lr_scale` (an optimizer built by hand) runs at the base rate itself.
    """
    return group["lr"] / group.get("lr_scale", 1.0)


class OptimizerPart(Part):
    """An `optimizer` part builds the optimizer from the final parameter groups."""

    slot = "optimizer"
    # Adam's ε when the run does not set one (TrainSettings.eps = None): the reference's value.
    default_eps: float = 1e-8  # torch.optim.AdamW

    def make_optimizer(self, adapted, groups: list[dict], *, lr: float, weight_decay: float,
                       betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
        # foreach: one batched kernel per moment update instead of a Python loop over tensors.
        return torch.optim.AdamW(strip_names(resolve_lr(groups, lr)), lr=lr, betas=betas, eps=eps,
                                 weight_decay=weight_decay, foreach=True)


@register
class AdamW(OptimizerPart):
    name = "adamw"
    idea = "AdamW over all adapter tensors"
