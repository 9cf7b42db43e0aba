"""SoRA — Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models"
(EMNLP), arXiv 2311.11696; reference code TsinghuaC3I/SoRA.

A gate vector g (r_max) sits between A and B and is driven to exact zeros:

    y = y0 + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ,     s = alpha / r_max

A starts Kaiming-uniform, B at 0, g ~ N(0, 1) (official code). A and B train with the main
optimizer; g is taken out of it and gets its own step after each main step, as the official
`SparseAdamW` does: an AdamW step at the main learning rate in force at that step (the
schedule included, as the official gate optimizer follows the same warmup + linear
schedule; here with the main rate, the official code takes a separate `sparse_lr`), then
the proximal soft-threshold of the paper,

    g ← sign(g) · max(|g| − ξ, 0)        (ξ = `sora_xi`, not multiplied by the learning rate),

and the loss carries the official L1 term `sora_l1 · mean|g|`. When training ends, every
layer is pruned into a plain LoRA of the rank it kept: with K = {i : g_i ≠ 0},
A' = A[K], B' = B[:, K]·diag(g_K), g' = 1 (frozen) — the outputs are unchanged, and the
adapter file stores only the kept rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .core import AdapterLayer
from .defaults import base_lr
from .functional import lora_linear
from .layer_kind import LayerKind, adapter_kwargs
from .parts import Option, register


class SoRALayer(AdapterLayer):
    adapter_parameters = ("lora_A", "lora_B", "gate")

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float):
        super().__init__(base_layer, dropout)
        kw = adapter_kwargs(base_layer)
        self.r = r
        self.scale = float(scale)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.gate = nn.Parameter(torch.randn(r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(self, x, self.adapter_input(x), self.lora_A, self.lora_B * self.gate, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_B * self.gate) @ self.lora_A) * self.scale

    @torch.no_grad()
    def prune(self) -> int:
        """Fold the gate into B and drop zero gates: a plain LoRA of the kept rank. Returns it."""
        keep = self.gate != 0
        self.lora_A = nn.Parameter(self.lora_A[keep].clone())
        self.lora_B = nn.Parameter((self.lora_B[:, keep] * self.gate[keep]).clone())
        self.gate = nn.Parameter(torch.ones_like(self.gate[keep]), requires_grad=False)
        self.r = int(keep.sum())
        return self.r

    def extra_repr(self) -> str:
        return f"r={self.r}, nonzero gates={int((self.gate != 0).sum())}, " + super().extra_repr()


@register
class SoRA(LayerKind):
    name = "sora"
    idea = "a gate between A and B, sparsified by a proximal step; prune to the kept rank"
    idea_zh = "A 与 B 之间加门控向量，用近端梯度稀疏化，训练后剪枝到保留的秩"
    peft_type = "LORA"  # exported as LoRA with per-layer ranks (rank_pattern), gates folded into B
    trains_lora_pair = scaled_by_spec = True  # update_is_s_ba stays off: the gate sits between A and B
    options = {
        "sora_xi": Option(1e-3, float, lambda v: v >= 0, ">= 0", "ξ, the soft-threshold of the proximal step"),
        "sora_l1": Option(1e-3, float, lambda v: v >= 0, ">= 0", "weight of the L1 term mean|g| in the loss"),
    }

    def __init__(self, spec):
        super().__init__(spec)
        self._state: dict[str, dict[str, Any]] = {}
        self.kept: dict[str, int] = {}

    def create(self, name: str, base_layer: nn.Module) -> SoRALayer:
        return SoRALayer(base_layer, self.rank_for(name), self.spec.scale, self.spec.dropout)

    def param_groups(self, adapted, groups: list[dict]) -> list[dict]:
        gates = {id(layer.gate) for layer in adapted.layers.values()}
        out = []
        for g in groups:
            keep = [(n, p) for n, p in zip(g["names"], g["params"], strict=True) if id(p) not in gates]
            out.append({**g, "params": [p for _, p in keep], "names": [n for n, _ in keep]})
        return out

    def extra_loss(self, adapted, step: int) -> torch.Tensor | None:
        if self.opts.sora_l1 == 0:
            return None
        gates = [layer.gate for layer in adapted.layers.values() if layer.gate.requires_grad]
        if not gates:
            return None
        return self.opts.sora_l1 * torch.cat(gates).abs().mean()

    @torch.no_grad()
    def after_optimizer_step(self, adapted, step: int, optimizer) -> None:
        # The gate's AdamW step uses the main optimizer's hyperparameters as they are at this
        # step: the base learning rate with the schedule's factor applied (the official code runs
        # its gate optimizer under the same warmup + decay schedule as the main one).
        group = optimizer.param_groups[0]
        missing = [k for k in ("lr", "betas", "eps") if k not in group]
        if missing:
            raise ValueError(f"SoRA's gate step is an AdamW step with the main optimizer's lr, betas and eps; "
                             f"{type(optimizer).__name__}'s parameter group has no {', '.join(missing)}")
        lr, (beta1, beta2), eps = base_lr(group), group["betas"], group["eps"]
        for name, layer in adapted.layers.items():
            g = layer.gate
            if g.grad is None or not g.requires_grad:
                continue
            st = self._state.setdefault(name, {"step": 0, "m": torch.zeros_like(g), "v": torch.zeros_like(g)})
            st["step"] += 1
            st["m"].mul_(beta1).add_(g.grad, alpha=1 - beta1)
            st["v"].mul_(beta2).addcmul_(g.grad, g.grad, value=1 - beta2)
            m_hat = st["m"] / (1 - beta1 ** st["step"])
            v_hat = st["v"] / (1 - beta2 ** st["step"])
            g.sub_(lr * m_hat / (v_hat.sqrt() + eps))
            # proximal step of the L1 penalty: soft-threshold by ξ
            g.copy_(torch.sign(g) * torch.clamp(g.abs() - self.opts.sora_xi, min=0.0))
            g.grad = None  # consumed here; the main optimizer never sees the gate

    def finalize(self, adapted) -> None:
        self.kept = {name: layer.prune() for name, layer in adapted.layers.items()}

    def summary(self, adapted) -> dict[str, Any]:
        kept = self.kept or {name: int((layer.gate != 0).sum()) for name, layer in adapted.layers.items()}
        return {"kept_ranks": kept, "rank_max": self.spec.r, "kept_total": sum(kept.values()),
                "rank_total": self.spec.r * len(kept)}

    def state_dict(self) -> dict[str, Any]:
        return {"gates": self._state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state.get("gates", {}))
