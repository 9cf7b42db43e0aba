"""AdaLoRA — Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning" (ICLR), arXiv 2303.10512.

The update is in SVD form, ΔW = P Λ Q, with P = B (out x r), Λ = diag(E) (r), Q = A (r x in):

    y = y0 + (drop(x) (A ⊙ E)ᵀ Bᵀ) · alpha / (ranknum + 1e-5),    ranknum = init_r (never shrinks)

A and B start N(0, 0.02²), E at 0 (so ΔW = 0). After every optimizer step (the gradients
still there) the rank allocator scores every entry of A, E and B by smoothed sensitivity ×
uncertainty,

    I = |w · ∂L/∂w|,   Ī ← β1·Ī + (1−β1)·I,   Ū ← β2·Ū + (1−β2)·|I − Ī|,   s = Ī·Ū,

scores each triplet i as s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), and zeroes E for the
lowest-scoring triplets down to the budget, a cubic schedule from Σ init_r to
target_r × #layers:

    t ≤ tinit:                  budget = Σ init_r, no masking
    tinit < t ≤ T − tfinal:     budget = ⌊bT + (b0 − bT)(1 − (t − tinit)/(T − tfinal − tinit))³⌋,
                                masking every deltaT steps
    t > T − tfinal:             budget = bT, the mask fixed at t = T − tfinal and re-applied.

An orthogonality penalty keeps P and Q near-orthogonal:
    orth_reg_weight · mean over matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F.
These are exactly PEFT's RankAllocator and AdaLoraModel (its budget is floored, masking
starts after tinit, is forced at T − tfinal, and the norms are not squared — the paper
squares them; `adalora_orth_squared: true` gives the paper's form). The step index is the
0-based optimizer step the training loop passes. The final rank pattern (which triplets
each layer keeps) is saved with the adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core import AdapterLayer
from .functional import lora_linear
from .layer_kind import LayerKind, adapter_kwargs
from .parts import Option, register


class AdaLoRALayer(AdapterLayer):
    adapter_parameters = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__(base_layer, dropout)
        kw = adapter_kwargs(base_layer)
        self.r = r
        self.alpha = float(alpha)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.ranknum = float(r)  # PEFT's `ranknum`: init_r, not reduced by pruning

    @property
    def scale(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(self, x, self.adapter_input(x), self.lora_A * self.lora_E, self.lora_B, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def kept(self) -> torch.Tensor:
        """Boolean mask of the triplets whose singular value is not pruned."""
        return self.lora_E.detach().view(-1) != 0

    def extra_repr(self) -> str:
        return f"init_r={self.r}, kept={int(self.kept().sum())}, " + super().extra_repr()


@register
class AdaLoRA(LayerKind):
    name = "adalora"
    idea = "SVD-form update; prune singular values by importance to a rank budget"
    idea_zh = "奇异值分解形式的增量，按重要性剪枝奇异值以分配秩预算"
    peft_type = "ADALORA"  # PEFT saves only the kept triplets (rank_pattern masks); peft_format.py maps them
    trains_lora_pair = True  # scaled_by_spec stays off: the scale is alpha/init_r by definition; E sits between
    options = {
        "target_r": Option(8, int, lambda v: v >= 1, ">= 1", "average final rank per layer"),
        "tinit": Option(0, int, lambda v: v >= 0, ">= 0", "steps before budgeting starts"),
        "tfinal": Option(0, int, lambda v: v >= 0, ">= 0", "steps of final fine-tuning at the target budget"),
        "delta_t": Option(1, int, lambda v: v >= 1, ">= 1", "steps between two maskings"),
        "beta1": Option(0.85, float, lambda v: 0 < v < 1, "in (0, 1)", "sensitivity smoothing"),
        "beta2": Option(0.85, float, lambda v: 0 < v < 1, "in (0, 1)", "uncertainty smoothing"),
        "orth_reg_weight": Option(0.5, float, lambda v: v >= 0, ">= 0", "weight of the orthogonality penalty"),
        "adalora_orth_squared": Option(False, bool, help="square the Frobenius norms (the paper) instead of PEFT's"),
        "total_step": Option(None, int, lambda v: v >= 1, ">= 1", "training steps (the schedule's T)"),
    }
    requires = {"scaling": (frozenset({"standard"}), "AdaLoRA's scale is alpha/init_r by definition")}

    @classmethod
    def check_spec(cls, spec) -> None:
        super().check_spec(spec)
        o = spec.options
        if o["total_step"] is None:
            raise ValueError("layer=adalora needs total_step (the number of training steps) for its budget schedule")
        if o["target_r"] >= spec.r:
            # the allocator prunes init_bgt - budget >= 1 triplets per masking; at target_r = r
            # there is nothing to prune (and torch.kthvalue would be asked for k = 0)
            raise ValueError(f"layer=adalora: target_r ({o['target_r']}) must be smaller than the initial rank "
                             f"r ({spec.r}), or there is no rank to reallocate")
        if not o["tinit"] < o["total_step"] - o["tfinal"]:
            raise ValueError(f"layer=adalora: tinit ({o['tinit']}) must be smaller than total_step - tfinal "
                             f"({o['total_step']} - {o['tfinal']}), or no budgeting phase is left")

    def __init__(self, spec):
        super().__init__(spec)
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.rank_mask: dict[str, torch.Tensor] | None = None  # fixed at T - tfinal
        self.budget_history: list[tuple[int, int]] = []

    def create(self, name: str, base_layer: nn.Module) -> AdaLoRALayer:
        return AdaLoRALayer(base_layer, self.rank_for(name), self.spec.alpha, self.spec.dropout)

    # ----- the schedule --------------------------------------------------------------------------
    def budgets(self, adapted) -> tuple[int, int]:
        init = sum(layer.r for layer in adapted.layers.values())
        return init, self.opts.target_r * len(adapted.layers)

    def budget_schedule(self, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
        o = self.opts
        if step <= o.tinit:
            return init_bgt, False
        if step > o.total_step - o.tfinal:
            return target_bgt, True
        coeff = 1 - (step - o.tinit) / (o.total_step - o.tfinal - o.tinit)
        return int((init_bgt - target_bgt) * coeff**3 + target_bgt), step % o.delta_t == 0

    # ----- hooks -----------------------------------------------------------------------------------
    def extra_loss(self, adapted, step: int) -> torch.Tensor | None:
        if self.opts.orth_reg_weight == 0:
            return None
        terms = []
        for layer in adapted.layers.values():
            for cov in (layer.lora_A @ layer.lora_A.t(), layer.lora_B.t() @ layer.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                norm = torch.linalg.matrix_norm(cov - eye)
                terms.append(norm * norm if self.opts.adalora_orth_squared else norm)
        return self.opts.orth_reg_weight * torch.stack(terms).mean()

    @torch.no_grad()
    def _update_importance(self, adapted) -> None:
        b1, b2 = self.opts.beta1, self.opts.beta2
        for name, layer in adapted.layers.items():
            for key, p in (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B)):
                if p.grad is None:
                    raise RuntimeError(f"AdaLoRA's allocator needs gradients; {name}.lora_{key} has none "
                                       "(call after_optimizer_step before zero_grad)")
                k = f"{name}.{key}"
                if k not in self.ipt:
                    self.exp_avg_ipt[k] = torch.zeros_like(p)
                    self.exp_avg_unc[k] = torch.zeros_like(p)
                ipt = (p * p.grad).abs()
                self.ipt[k] = ipt
                self.exp_avg_ipt[k] = b1 * self.exp_avg_ipt[k] + (1 - b1) * ipt
                self.exp_avg_unc[k] = b2 * self.exp_avg_unc[k] + (1 - b2) * (ipt - self.exp_avg_ipt[k]).abs()

    def _triplet_scores(self, adapted) -> dict[str, torch.Tensor]:
        scores = {}
        for name in adapted.layers:
            s = {key: self.exp_avg_ipt[f"{name}.{key}"] * self.exp_avg_unc[f"{name}.{key}"] for key in "AEB"}
            ab = torch.cat([s["A"].mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1).sum(dim=1)
            scores[name] = s["E"].view(-1) + ab
        return scores

    @torch.no_grad()
    def _mask_to_budget(self, adapted, budget: int, init_bgt: int) -> dict[str, torch.Tensor]:
        scores = self._triplet_scores(adapted)
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=init_bgt - budget)[0].item()
        masks = {}
        for name, layer in adapted.layers.items():
            keep = ~(scores[name] <= threshold)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            masks[name] = keep
        return masks

    @torch.no_grad()
    def after_optimizer_step(self, adapted, step: int, optimizer) -> None:
        init_bgt, target_bgt = self.budgets(adapted)
        final = self.opts.total_step - self.opts.tfinal
        budget, mask_now = self.budget_schedule(step, init_bgt, target_bgt)
        if step < final:
            self._update_importance(adapted)
            if mask_now:
                self._mask_to_budget(adapted, budget, init_bgt)
        elif step == final:  # as PEFT: no importance update at the final allocation
            self.rank_mask = self._mask_to_budget(adapted, budget, init_bgt)
            self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        else:
            if self.rank_mask is None:  # training resumed past the final step without its state
                raise RuntimeError("AdaLoRA's final rank mask is missing past total_step - tfinal")
            for name, layer in adapted.layers.items():
                layer.lora_E.masked_fill_(~self.rank_mask[name].view(-1, 1), 0.0)
        self.budget_history.append((step, budget))

    def finalize(self, adapted) -> None:
        if self.rank_mask is None:
            self.rank_mask = {name: layer.kept() for name, layer in adapted.layers.items()}

    def summary(self, adapted) -> dict[str, Any]:
        ranks = self.kept_ranks(adapted)
        return {"rank_pattern": ranks, "budget_final": sum(ranks.values()),
                "budget_initial": sum(layer.r for layer in adapted.layers.values()),
                "budget_history": [b for _, b in self.budget_history]}

    def kept_ranks(self, adapted) -> dict[str, int]:
        """Triplets each layer keeps (the final rank pattern)."""
        masks = self.rank_mask or {name: layer.kept() for name, layer in adapted.layers.items()}
        return {name: int(mask.sum()) for name, mask in masks.items()}

    # ----- persistence ----------------------------------------------------------------------------
    def adapter_tensors(self, adapted) -> dict[str, torch.Tensor]:
        if self.rank_mask is None:
            return {}
        return {f"{name}.rank_mask": mask.to(torch.uint8) for name, mask in self.rank_mask.items()}

    def load_adapter_tensors(self, adapted, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.rank_mask = {key.rsplit(".", 1)[0]: t.bool() for key, t in tensors.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": self.ipt, "exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc,
                "rank_mask": self.rank_mask, "budget_history": list(self.budget_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt = dict(state.get("ipt", {}))
        self.exp_avg_ipt = dict(state.get("exp_avg_ipt", {}))
        self.exp_avg_unc = dict(state.get("exp_avg_unc", {}))
        self.rank_mask = state.get("rank_mask")
        self.budget_history = [tuple(entry) for entry in state.get("budget_history", [])]
