"""The default part of every modifier slot: plain alpha/r scaling, a full-precision
base, the layer's own initialisation, AdamW, and no step hook (Hu et al. 2021,
arXiv 2106.09685: W = W0 + (alpha/r)·BA, A Kaiming-uniform, B = 0, trained with Adam)."""

from __future__ import annotations

from typing import ClassVar

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
    """An `init` part may overwrite a new layer's tensors (and its base) from the original module.

    Beyond `init_layer`, the init slot has the hooks of the initialisation family
    (docs/init-family.md): `rewrites_base` (the part replaces W0 by a residual, so `unload`
    and a failed `build` call `restore_base`), `calibration_batches` / `calibrate` (a
    data-aware init receives training batches after `build`, through
    `AdaptedModel.calibrate`), and the PEFT export hooks `peft_rank_multiplier` /
    `peft_factors` (the factors a PEFT LoRA against the original base needs).
    """

    slot = "init"
    # True for parts that write W0 − s·B0A0 into the base weights (PiSSA, OLoRA, ...).
    rewrites_base: ClassVar[bool] = False
    # A PEFT export writes rank r·multiplier per layer (2 for a base-rewriting init: [A; A0], [B, −B0]).
    peft_rank_multiplier: ClassVar[int] = 1
    # Set by `build(..., deferred_init=True)` (io.load): the adapter's tensors come from a file,
    # so the part must not compute an initialisation (no SVD, no calibration).
    deferred: bool = False

    def init_layer(self, name: str, layer, original: torch.nn.Module) -> None:
        """Called right after `layer` was built around the (converted) base of `original`."""

    # ----- data-aware initialisation (variants/init_base.py: DataInit) --------------------------
    def calibration_batches(self) -> int:
        """How many training batches `calibrate` needs (0: a data-free init)."""
        return 0

    def needs_calibration(self) -> bool:
        """True while the adapter waits for `calibrate` (training refuses it until then)."""
        return False

    def calibrate(self, adapted, batches, loss_fn) -> dict:
        """Initialise from calibration batches; data-free parts have nothing to calibrate."""
        raise ValueError(f"init={self.name} is data-free: it takes no calibration batches "
                         "(adapted.calibration_batches() is 0)")

    @torch.no_grad()
    def apply_factors(self, adapted_or_layers, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write (A, B) into each named layer's `lora_A` / `lora_B` (every shape checked before the first write).

        A base-rewriting part (init_base.RewritingInit) also writes the residual W0 − s·BA.
        """
        from .init_base import layers_of

        layers = layers_of(adapted_or_layers)
        prepared = _checked_factors(self.name, layers, factors)
        for name, (a, b) in prepared.items():
            layers[name].lora_A.copy_(a)
            layers[name].lora_B.copy_(b)
            layers[name].refresh_after_init()

    def restore_base(self, adapted_or_layers) -> None:
        """Put the original base weights back (no-op: this part leaves them alone)."""

    # ----- PEFT export (variants/peft_format.py) ----------------------------------------------------
    def peft_factors(self, name: str, layer, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of layer `name` a PEFT LoRA on the ORIGINAL base needs, from its plain factors
        (lora_A, lora_B, magnitude); rank `peft_rank_multiplier` times the layer's."""
        return factors


def _checked_factors(part: str, layers: dict, factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per layer in each layer's adapter dtype and device, or a ValueError naming the bad layer."""
    unknown = sorted(set(factors) - set(layers))
    if unknown:
        raise ValueError(f"init={part}: factors for layers this adapter does not have: {unknown[:5]}")
    out = {}
    for name, (a, b) in factors.items():
        layer = layers[name]
        if tuple(a.shape) != tuple(layer.lora_A.shape) or tuple(b.shape) != tuple(layer.lora_B.shape):
            raise ValueError(f"init={part}: factors of {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"the layer needs A {tuple(layer.lora_A.shape)}, B {tuple(layer.lora_B.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"init={part}: factors of {name} are not finite")
        out[name] = (a.detach().to(layer.lora_A).clone(), b.detach().to(layer.lora_B).clone())
    return out


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
