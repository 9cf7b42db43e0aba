"""VeRA — Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
arXiv 2310.11454.

One frozen random pair (A: r x max_in, B: max_out x r) is shared by every adapted
layer; each layer slices it to its own shape and trains only two scaling vectors:

    ΔW = diag(λ_b) B[:out, :] diag(λ_d) A[:, :in],      y = y0 + λ_b ⊙ ((λ_d ⊙ (drop(x) Aᵀ)) Bᵀ)

λ_b (out) starts at 0, so ΔW = 0 at step 0; λ_d (r) starts at the constant d_initial.
A and B are Kaiming-uniform (gain sqrt 2, bound sqrt(6/fan_in) with the fan of the
whole shared tensor), drawn A then B from `torch.Generator().manual_seed(key)` on the
CPU: the same key gives the same projections as PEFT's VeRA, so they can be
regenerated instead of saved. Trainable parameters: Σ over layers (out + r).

(The seed tutorial's VeRA gives each layer its own trainable, normal-initialised pair
and starts both vectors at ones: docs/vera.md.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import AdapterLayer, in_out_features, module_device
from .functional import vera_linear
from .layer_kind import LayerKind, adapter_kwargs
from .parts import Option, register
from .reference import vera_reference

PROJECTIONS_ATTR = "vera_projections"


def kaiming_uniform_from(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt 2, fan_in = shape[1]) drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen shared pair, as buffers (never trained, moved with the model)."""

    def __init__(self, r: int, max_in: int, max_out: int, key: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(key)
        self.register_buffer("A", kaiming_uniform_from((r, max_in), generator))
        self.register_buffer("B", kaiming_uniform_from((max_out, r), generator))


class VeRALayer(AdapterLayer):
    adapter_parameters = ("lambda_b", "lambda_d")

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, r: int, d_initial: float, dropout: float):
        super().__init__(base_layer, dropout)
        if projections.A.shape[1] < self.in_features or projections.B.shape[0] < self.out_features:
            raise ValueError(
                f"VeRA projections {tuple(projections.B.shape)} x {tuple(projections.A.shape)} are too small "
                f"for a layer of in={self.in_features}, out={self.out_features}"
            )
        # Held outside the module tree: the projections belong to the model root, once.
        object.__setattr__(self, "_projections", projections)
        self.r = r
        kw = adapter_kwargs(base_layer)
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **kw))

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices A[:, :in] and B[:out, :] of the shared projections."""
        p = self._projections
        return p.A[:, : self.in_features], p.B[: self.out_features, :]

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.sliced()
        return vera_linear(self, x, self.adapter_input(x), self.lambda_b, self.lambda_d, A, B)

    def reference_forward(self, x: torch.Tensor, xd: torch.Tensor | None = None) -> torch.Tensor:
        """The same output by plain autograd ops (tests compare the fused forward with it)."""
        A, B = self.sliced()
        return vera_reference(self, x, xd, self.lambda_b, self.lambda_d, A, B)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.sliced()
        return (self.lambda_b.unsqueeze(1) * B.to(self.lambda_b.dtype) * self.lambda_d) @ A.to(self.lambda_b.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, " + super().extra_repr()


@register
class VeRA(LayerKind):
    name = "vera"
    idea = "one frozen random pair shared by all layers; train only per-layer scaling vectors"
    idea_zh = "全模型共享一对冻结随机矩阵，每层只训练缩放向量"
    peft_type = "VERA"
    # no capability flags: the random pair is frozen and shared, and there is no alpha/r scale
    options = {
        "d_initial": Option(0.1, float, lambda v: v > 0, "> 0", "initial value of every λ_d entry"),
        "projection_prng_key": Option(0, int, lambda v: v >= 0, ">= 0", "seed of the shared random pair"),
        "save_projection": Option(True, bool, help="store the shared pair in the adapter file"),
    }
    requires = {"scaling": (frozenset({"standard"}), "VeRA has no alpha/r scale (the λ vectors carry the magnitude)")}

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        shapes = [in_out_features(m) for _, m in targets]
        max_in = max(i for i, _ in shapes)
        max_out = max(o for _, o in shapes)
        device = module_device(targets[0][1])
        self.projections = VeRAProjections(self.spec.r, max_in, max_out, self.opts.projection_prng_key).to(device)

    def create(self, name: str, base_layer: nn.Module) -> VeRALayer:
        return VeRALayer(base_layer, self.projections, self.spec.r, self.opts.d_initial, self.spec.dropout)

    def shared_modules(self) -> dict[str, nn.Module]:
        return {PROJECTIONS_ATTR: self.projections}
