"""Delta-LoRA — Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the
Delta of Low-Rank Matrices", arXiv 2309.02411 (Algorithm 1).

The model is LoRA without dropout on the adapter path (so that ∂L/∂W = ∂L/∂(sBA)); the
optimizer trains A and B, and after every optimizer step t past the start step K
(t > K, Algorithm 1; t is the 0-based step index the training loop passes) the frozen
weight moves by the change of the low-rank product:

    W ← W + λ · s · (B_{t+1} A_{t+1} − B_t A_t),     λ = `delta_update_ratio`

So K = 0 leaves W alone in step 0 and moves it from step 1 on. W gets no gradient and no
optimizer state. The sum telescopes: after the last step T, W_T = W_0 + λ·s·(B_T A_T −
B_{K+1} A_{K+1}), where (B_{K+1}, A_{K+1}) are the factors just before the first update
(after step K) — so a saved adapter stores them beside (B_T, A_T) and rebuilds W_T from
the original weights on load, instead of a full copy of W. Merge gives W_T + s·B_T A_T.

The update is one fused GEMM per layer: [B_{t+1} | B_t] @ [A_{t+1} ; −A_t] added into W.
A base kept in bf16/fp16 would lose small deltas, so for such a base the update is
accumulated in fp32 with a per-layer residual (what rounding to the base dtype dropped
is carried into the next step).
"""

from __future__ import annotations

from typing import Any

import torch

from . import distributed
from .parts import Option, Part, register


@register
class DeltaLoRA(Part):
    slot = "step"
    name = "delta_lora"
    idea = "after each step, also move W by λ times the change of s·BA"
    idea_zh = "每步之后再把 W 按 s·BA 的增量乘 λ 一并更新"
    peft_exportable = False  # the base weights change; PEFT's LoRA format cannot say so
    state_bytes_per_base_weight = 4.0  # the fp32 residual kept for a bf16/fp16 base
    options = {
        "delta_update_ratio": Option(2.0, float, lambda v: v > 0, "> 0", "λ, the update ratio"),
        "delta_start_step": Option(0, int, lambda v: v >= 0, ">= 0",
                                   "K: W moves after every step t > K (0-based), as Algorithm 1's 't > K'"),
    }
    requires = {"base": (frozenset({"full"}), "Delta-LoRA writes the base weights, which a quantized base cannot hold")}
    layer_needs = {"update_is_s_ba": "the W update λ·s·Δ(BA) is defined for a plain LoRA pair (ΔW = s·BA)"}

    def __init__(self, spec):
        super().__init__(spec)
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._residual: dict[str, torch.Tensor] = {}
        self._layers: dict = {}

    @classmethod
    def check_spec(cls, spec) -> None:
        super().check_spec(spec)
        if spec.dropout != 0.0:
            raise ValueError(
                f"incompatible combination: step=delta_lora with dropout={spec.dropout}: Delta-LoRA removes "
                "dropout from the adapter path so that the gradient of W equals that of s·BA"
            )

    def _active(self, step: int) -> bool:
        return step > self.opts.delta_start_step  # Algorithm 1: "if t > K"

    @torch.no_grad()
    def before_optimizer_step(self, adapted, step: int, optimizer) -> None:
        if not self._active(step):
            return
        for name, layer in adapted.layers.items():
            pair = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            self._before[name] = pair
            self.reference.setdefault(name, pair)

    @torch.no_grad()
    def after_optimizer_step(self, adapted, step: int, optimizer) -> None:
        if not self._active(step):
            return
        coeff = self.opts.delta_update_ratio * adapted.spec.scale
        for name, layer in adapted.layers.items():
            a_old, b_old = self._before.pop(name)
            self._add_to_weight(name, layer, torch.cat([layer.lora_B, b_old], 1), torch.cat([layer.lora_A, -a_old], 0), coeff)

    def _add_to_weight(self, name, layer, b_cat: torch.Tensor, a_cat: torch.Tensor, coeff: float) -> None:
        """W += coeff · b_cat @ a_cat, accumulated in fp32 when the base weight is lower precision.

        Under FSDP2 W is sharded by rows of its native layout: each rank adds the same rows of
        the whole product (from the whole A and B every rank holds) to the rows it holds.
        """
        w, rows = distributed.local_rows(layer.base_layer.weight)
        # the native layout: (out, in) = B @ A for nn.Linear, (in, out) = Aᵀ @ Bᵀ for Conv1D
        left, right = (a_cat.t()[rows], b_cat.t()) if layer.fan_in_fan_out else (b_cat[rows], a_cat)
        if w.dtype in (torch.float32, torch.float64):
            w.addmm_(left.to(w.dtype), right.to(w.dtype), alpha=coeff)
            return
        residual = self._residual.get(name)
        if residual is not None:  # sharded like W, or whole (restored from a checkpoint before sharding)
            residual = residual.to_local() if distributed.is_sharded(residual) else residual[rows]
        exact = w.float() + (left.float() @ right.float()) * coeff + (0.0 if residual is None else residual)
        w.copy_(exact.to(w.dtype))
        self._residual[name] = distributed.sharded_like(exact - w.float(), layer.base_layer.weight)

    # ----- persistence: (B_K, A_K) let a saved adapter rebuild W_T from the original W --------
    def adapter_tensors(self, adapted) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a_ref, b_ref) in self.reference.items():
            out[f"{name}.reference_A"] = a_ref
            out[f"{name}.reference_B"] = b_ref
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, adapted, tensors: dict[str, torch.Tensor]) -> None:
        names = {key.rsplit(".", 1)[0] for key in tensors}
        unknown = names - set(adapted.layers)
        if unknown:
            raise ValueError(f"Delta-LoRA reference factors for unknown layers: {sorted(unknown)[:5]}")
        coeff = self.opts.delta_update_ratio * adapted.spec.scale
        for name in sorted(names):
            layer = adapted.layers[name]
            a_ref = tensors[f"{name}.reference_A"].to(layer.lora_A)
            b_ref = tensors[f"{name}.reference_B"].to(layer.lora_B)
            self.reference[name] = (a_ref, b_ref)
            # W_T = W_0 + λ·s·(B_T A_T − B_K A_K)
            self._add_to_weight(name, layer, torch.cat([layer.lora_B, b_ref], 1), torch.cat([layer.lora_A, -a_ref], 0), coeff)

    def state_dict(self) -> dict[str, Any]:
        # The base weights are part of the training state here: W moved with every step.
        return {"reference": dict(self.reference), "residual": dict(self._residual),
                "weights": {name: layer.base_layer.weight for name, layer in self._layers.items()}}

    def configure(self, adapted) -> None:
        self._layers = adapted.layers

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = {k: tuple(v) for k, v in state.get("reference", {}).items()}
        self._residual = dict(state.get("residual", {}))
        for name, weight in state.get("weights", {}).items():
            self._layers[name].base_layer.weight.copy_(weight)
