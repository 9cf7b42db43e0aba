"""LoRA-GA — Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000 (§3.2-3.3), in the form PEFT 0.21.2 implements (`peft/tuners/lora/loraga.py`,
`LoraLayer.lora_ga_init`).

The adapter starts aligned with the first step of full fine-tuning. With G the mean gradient of
the loss w.r.t. each target weight over the calibration batches (one backward per batch, no
zeroing in between; G = ΣgradW / #backward passes),

    U S Vᵀ ≈ svd_lowrank(G, q = min(4r, out, in), niter = 4)         (keep the first 2r triplets)
    direction ArB2r:  A = Vᵀ[:r],       B = U[:, r:2r] diag(S[r:2r])
              A2rBr:  A = Vᵀ[r:2r],     B = U[:, :r] diag(S[:r])
              ArBr:   A = Vᵀ[1:2r:2],   B = U[:, 0:2r:2] diag(S[0:2r:2])
              random: i = randperm(2r)[:r];  A = Vᵀ[i],  B = U[:, i] diag(S[i])
    scale     stable:     B ← B · out^(1/4) / √γ
              weight_svd: B ← B · σ1(W) / S_B[0]        (σ1 by svd_lowrank(W, q = r, niter = 4))
              gd_scale:   A ← A/s,  B ← B/s
              unit:       nothing
    W_res = W − s·B A                                    (so the model equals the base at step 0)

PEFT's form is not the paper's: the paper (and its official code, Outsider565/LoRA-GA) takes
B = U[:, r:2r] *without* singular values and, for "stable", scales *both* A and B by
out^(1/4)/√γ. PEFT multiplies B by S and scales only B, so its B is orders of magnitude smaller
(|B|max ≈ 3e-4 on the tiny test Llama). Issue 13 asks for PEFT parity, so this is PEFT's form;
docs/init-data-aware.md spells out the difference.

The randomized SVDs (and the `random` direction's permutation) draw from a generator seeded per
layer (`lora_ga_seed` + the layer's index, under a forked RNG), where PEFT draws from the global
RNG; the tests seed PEFT's per-layer init the same way. "stable" uses the layer's out_features
(PEFT reads weight.shape[0], which is in_features for GPT-2's Conv1D).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .init_base import DataInit, RewritingInit
from .parts import Option, register

LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def estimate_gradients(model: nn.Module, weights: Mapping[str, nn.Parameter],
                       batches: Sequence[Mapping[str, torch.Tensor]],
                       loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
                       modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """G per layer: the gradient of `loss_fn` w.r.t. each weight summed over `batches`, divided by the
    number of backward passes through that layer's `module` (PEFT's `estimate_gradients`).

    The caller puts the model in training mode and sets requires_grad on `weights` only; the
    gradients are taken out of the weights (`.grad` is None again) before returning.
    """
    counts = dict.fromkeys(weights, 0)

    def counter(name):
        # PEFT counts with a full backward hook on the module; a gradient hook on the module's output
        # fires exactly as often (once per backward through the module) without torch's warning that
        # no input of the module requires a gradient
        def count(_grad):
            counts[name] += 1

        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(count)
        return hook

    handles = [modules[n].register_forward_hook(counter(n)) for n in weights]
    try:
        with torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
    grads = {}
    try:
        for name, w in weights.items():
            if counts[name] == 0 or w.grad is None:
                raise ValueError(f"LoRA-GA: the calibration loss has no gradient for {name}'s weight "
                                 "(the layer is not on the loss's path)")
            grads[name] = w.grad.detach() / counts[name]
    finally:
        for w in weights.values():
            w.grad = None
    return grads


@torch.no_grad()
def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scale: float, *, direction: str = "ArB2r",
                    scale_mode: str = "stable", gamma: float = 16.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) from one layer's mean gradient G and weight W, both (out, in), as PEFT's `lora_ga_init`.

    Draws from the global RNG (the randomized SVDs, `random`'s permutation): the caller seeds it.
    """
    if direction not in LORA_GA_DIRECTIONS:
        raise ValueError(f"lora_ga_direction must be one of {', '.join(LORA_GA_DIRECTIONS)}, got {direction!r}")
    if scale_mode not in LORA_GA_SCALES:
        raise ValueError(f"lora_ga_scale must be one of {', '.join(LORA_GA_SCALES)}, got {scale_mode!r}")
    grad = grad.to(torch.float32)
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.t()
    u, s, vh = u[:, : 2 * r], s[: 2 * r], vh[: 2 * r, :]
    if direction == "ArBr":
        a, b, s_b = vh[1: 2 * r: 2, :], u[:, 0: 2 * r: 2], s[0: 2 * r: 2]
    elif direction == "A2rBr":
        a, b, s_b = vh[r: 2 * r, :], u[:, :r], s[:r]
    elif direction == "ArB2r":
        a, b, s_b = vh[:r, :], u[:, r: 2 * r], s[r: 2 * r]
    else:
        index = torch.randperm(2 * r)[:r]
        a, b, s_b = vh[index, :], u[:, index], s[index]
    b = b @ torch.diag(s_b)
    if scale_mode == "stable":
        b = b * ((weight.shape[0] ** 0.25) / (gamma ** 0.5))
    elif scale_mode == "weight_svd":
        _, weight_s, _ = torch.svd_lowrank(weight.to(torch.float32), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif scale_mode == "gd_scale":
        a = a / scale
        b = b / scale
    return a.contiguous(), b.contiguous()


# ----- the init part ------------------------------------------------------------------------------------
@register
class LoraGAInit(DataInit, RewritingInit):
    name = "lora_ga"
    idea = "start from the SVD of the full-weight gradient on training batches; the base keeps the residual"
    idea_zh = "以训练批次上全权重梯度的 SVD 初始化适配器，基座保留残差"
    options = {
        **DataInit.options,
        "lora_ga_direction": Option("ArB2r", str, lambda v: v in LORA_GA_DIRECTIONS, " or ".join(LORA_GA_DIRECTIONS),
                                    "which singular vectors go to A and B"),
        "lora_ga_scale": Option("stable", str, lambda v: v in LORA_GA_SCALES, " or ".join(LORA_GA_SCALES),
                                "how B (and A) are scaled"),
        "lora_ga_gamma": Option(16.0, float, lambda v: v > 0, "> 0", "γ of the 'stable' scale out^(1/4)/sqrt(γ)"),
        "lora_ga_seed": Option(0, int, lambda v: v >= 0, ">= 0",
                               "seed of the randomized SVDs (plus the layer's index), drawn under a forked RNG"),
    }

    def ranks_needed(self, r: int) -> int:
        return 2 * r  # A and B take 2r distinct singular directions of G

    def check_batches(self, adapted, batches) -> None:
        super().check_batches(adapted, batches)
        for i, batch in enumerate(batches):
            labels = batch.get("labels")
            if not isinstance(labels, torch.Tensor) or not bool((labels != -100).any()):
                raise ValueError(f"init=lora_ga: calibration batch {i} has no label tokens (labels != -100); the "
                                 "gradient needs a loss")

    def compute_factors(self, adapted, batches, loss_fn):
        model = adapted.model
        model.train()  # as PEFT's estimate_gradients (the scope restores modes, flags and gradients)
        model.requires_grad_(False)
        weights = {n: layer.base_layer.weight for n, layer in adapted.layers.items()}
        for w in weights.values():
            w.requires_grad_(True)
        grads = estimate_gradients(model, weights, batches, loss_fn,
                                   {n: layer.base_layer for n, layer in adapted.layers.items()})
        factors = {}
        with torch.no_grad():
            for index, (name, layer) in enumerate(adapted.layers.items()):
                grad = grads.pop(name)
                grad = grad.t() if layer.fan_in_fan_out else grad  # (out, in)
                torch.manual_seed(self.opts.lora_ga_seed + index)  # inside the scope's forked RNG
                factors[name] = lora_ga_factors(
                    grad, layer.base_weight().detach(), layer.r, layer.scale, direction=self.opts.lora_ga_direction,
                    scale_mode=self.opts.lora_ga_scale, gamma=self.opts.lora_ga_gamma)
        return factors
