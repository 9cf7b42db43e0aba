"""LoRA-FA — Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning", arXiv 2308.03303, with the gradient correction of its v2
as PEFT's `LoraFAOptimizer` implements it.

A is frozen at its random (Kaiming-uniform) initialisation and only B trains, so the
backward needs x Aᵀ (r values per token) instead of x (in values per token) for the
weight gradient. With A fixed, ΔW = s·ΔB·A; the optimizer replaces B's gradient by the
solution of  min ‖s·g̃_B·A − g‖_F  over g̃_B:

    g̃_B = (1/s²) · g_B · (A Aᵀ + 1e-8·I)⁺          (so s·g̃_B·A = g·Aᵀ(AAᵀ)⁻¹A, g projected on row(A))

and then takes an AdamW step in transformers' "adamw-hf" form (bias correction folded
into the step size, ε added to sqrt(v), decoupled weight decay applied after the
update) — exactly PEFT's update. Other trainable tensors get the same AdamW without the
projection. Because A never changes, (AAᵀ + 1e-8 I)⁺ is computed once per layer, not
every step (it is recomputed if A is ever modified). PEFT evaluates the projection
under bf16 autocast when the machine supports bf16, which moves its step by ~0.3%;
this implementation keeps the parameter dtype. Adam's ε defaults to PEFT's 1e-6 (not
AdamW's 1e-8) unless the run sets one.
"""

from __future__ import annotations

import math

import torch

from .defaults import OptimizerPart, resolve_lr, strip_names
from .parts import register


class LoRAFAAdamW(torch.optim.Optimizer):
    """AdamW (adamw-hf form) with LoRA-FA's projected gradient for each LoRA B."""

    def __init__(self, params, pairs: dict[int, tuple[torch.Tensor, float]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})
        # id(B) -> (A, s); the projector cache is keyed by A's version counter.
        self._pairs = pairs
        self._projectors: dict[int, tuple[int, torch.Tensor]] = {}

    def _projector(self, b: torch.Tensor) -> torch.Tensor:
        """(1/s²)·(AAᵀ + 1e-8 I)⁺ for the A paired with B."""
        a, s = self._pairs[id(b)]
        cached = self._projectors.get(id(b))
        if cached is not None and cached[0] == a._version:
            return cached[1]
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        proj = torch.linalg.pinv(a @ a.t() + 1e-8 * eye).to(b.dtype) / (s * s)
        self._projectors[id(b)] = (a._version, proj)
        return proj

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, step_sizes = [], [], [], [], []
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if id(p) in self._pairs:
                    grad = grad @ self._projector(p)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                step_sizes.append(-step_size)
            if not params:
                continue
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            if group["weight_decay"] > 0.0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        return loss


@register
class LoRAFA(OptimizerPart):
    name = "lora_fa"
    idea = "A frozen at init; B's gradient projected onto row(A)"
    idea_zh = "冻结随机初始化的 A，B 的梯度投影到 A 的行空间"
    # PEFT's LoraFAOptimizer defaults to eps 1e-6 and create_lorafa_optimizer never sets it;
    # a run that sets eps explicitly (TrainSettings.eps) overrides this.
    default_eps = 1e-6
    layer_needs = {"update_is_s_ba": "LoRA-FA freezes A and projects the gradient of B for a plain LoRA pair "
                                     "(ΔW = s·BA); this layer kind has no such pair or changes what B's gradient means"}

    def configure(self, adapted) -> None:
        for layer in adapted.layers.values():
            layer.lora_A.requires_grad_(False)

    def make_optimizer(self, adapted, groups, *, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
        pairs = {id(layer.lora_B): (layer.lora_A, layer.scale) for layer in adapted.layers.values()}
        return LoRAFAAdamW(strip_names(resolve_lr(groups, lr)), pairs, lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)
