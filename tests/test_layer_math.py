"""The fused LoRA, DoRA and VeRA layers against their plain reference forwards (variants/reference.py),
DoRA's magnitude gradient at m = 0, and the adapter compute dtype over a bfloat16 base.

Odd shapes (in 13, out 9, r 3; GPT-2's transposed Conv1D included), float64, both evaluation
orders of the fused layers (3 tokens: factored; 40 tokens: merged), with and without dropout
(the dropped input is passed explicitly, so both sides see the same mask).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import peft_param, peft_twin, randomize_adapter
from torch import nn

import variants
from variants import functional, reference
from variants.dora import DoRALayer
from variants.lora import LoRALayer
from variants.vera import VeRALayer, VeRAProjections

IN, OUT, R = 13, 9, 3
FACTORED, MERGED = (3,), (4, 10)  # token shapes: 3 tokens stay factored, 40 merge (checked below)


def base_layer(kind: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    layer = nn.Linear(IN, OUT, bias=True) if kind == "linear" else Conv1D(OUT, IN)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer.to(dtype).requires_grad_(False)


def adapter_layer(method: str, base: nn.Module) -> nn.Module:
    if method == "lora":
        layer = LoRALayer(base, R, scale=1.7, dropout=0.0)
    elif method == "dora":
        layer = DoRALayer(base, R, scale=1.7, dropout=0.0)
    else:
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        layer = VeRALayer(base, VeRAProjections(R, IN + 2, OUT + 1, key=3).to(dtype), R, 0.1, 0.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in layer.adapter_state().values():
            t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3)
    return layer


def fused_and_reference(method: str, layer):
    """(fused, reference) functions of (x, xd, *adapter tensors) for one layer."""
    if method == "lora":
        tensors = [layer.lora_A, layer.lora_B]
        return (lambda x, xd, *t: functional.lora_linear(layer, x, xd, *t, layer.scale),
                lambda x, xd, *t: reference.lora_reference(layer, x, xd, *t, layer.scale), tensors)
    if method == "dora":
        tensors = [layer.lora_A, layer.lora_B, layer.magnitude]
        return (lambda x, xd, *t: functional.dora_linear(layer, x, xd, *t, layer.scale),
                lambda x, xd, *t: reference.dora_reference(layer, x, xd, *t, layer.scale), tensors)
    A, B = layer.sliced()
    tensors = [layer.lambda_b, layer.lambda_d]
    return (lambda x, xd, *t: functional.vera_linear(layer, x, xd, *t, A, B),
            lambda x, xd, *t: reference.vera_reference(layer, x, xd, *t, A, B), tensors)


def outputs_and_grads(fn, x, xd, tensors, g):
    leaves = [t.detach().clone().requires_grad_() for t in [x] + ([] if xd is None else [xd]) + tensors]
    xx, rest = leaves[0], leaves[1:]
    xdd = None if xd is None else rest.pop(0)
    y = fn(xx, xdd, *rest)
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("tokens", [FACTORED, MERGED], ids=["factored", "merged"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_fused_layer_equals_reference_forward_and_gradients(method, kind, tokens, dropout):
    layer = adapter_layer(method, base_layer(kind))
    assert layer.fan_in_fan_out == (kind == "conv1d")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*tokens, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(*tokens, OUT, generator=gen, dtype=torch.float64)
    xd = (x * (torch.rand(x.shape, generator=gen, dtype=torch.float64) > 0.3) / 0.7) if dropout else None
    fused, ref, tensors = fused_and_reference(method, layer)
    y, grads = outputs_and_grads(fused, x, xd, tensors, g)
    y_ref, grads_ref = outputs_and_grads(ref, x, xd, tensors, g)
    assert (y - y_ref).abs().max().item() < 1e-12
    for got, want in zip(grads, grads_ref, strict=True):
        assert want.abs().max() > 0
        assert (got - want).abs().max().item() < 1e-12 * max(1.0, want.abs().max().item())


def _fused_and_reference_run(method: str, layer, tokens: tuple[int, ...], seed: int):
    """((output, gradients) of the fused layer, the same of its plain reference) on one float64 input
    and upstream gradient of shape `tokens`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(*tokens, OUT, generator=gen, dtype=torch.float64)
    fused, ref, tensors = fused_and_reference(method, layer)
    return outputs_and_grads(fused, x, None, tensors, g), outputs_and_grads(ref, x, None, tensors, g)


@pytest.mark.parametrize("route", ["projected", "gram"])
@pytest.mark.parametrize("plan", [functional.FACTORED, functional.MERGED, functional.MERGED_KEPT])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_every_vera_plan_equals_reference(kind, plan, route, monkeypatch):
    """Each plan, and for the merged plans each way of forming H = gᵀ x Aᵀ for the λ gradients."""
    monkeypatch.setattr(functional, "vera_plan", lambda *args: plan)
    monkeypatch.setattr(functional, "lambda_grad_route", lambda *args: route)
    (y, grads), (y_ref, grads_ref) = _fused_and_reference_run("vera", adapter_layer("vera", base_layer(kind)),
                                                              MERGED, seed=5)
    assert (y - y_ref).abs().max().item() < 1e-12
    for got, want in zip(grads, grads_ref, strict=True):
        assert (got - want).abs().max().item() < 1e-12 * max(1.0, want.abs().max().item())


def test_vera_plan_on_smollm2_shapes():
    """SmolLM2-135M, 512 tokens, r 256: attention and up/gate keep W_eff (no larger than the factored
    path's kept products), the 1536-wide down projection stays factored, generation is factored."""
    T, r = 512, 256
    assert functional.vera_plan(T, 576, 576, r, True) == functional.MERGED_KEPT
    assert functional.vera_plan(T, 576, 192, r, True) == functional.MERGED_KEPT
    assert functional.vera_plan(T, 576, 1536, r, True) == functional.MERGED_KEPT
    assert functional.vera_plan(T, 1536, 576, r, True) == functional.FACTORED
    assert functional.vera_plan(1, 576, 576, r, False) == functional.FACTORED


def test_vera_layers_reading_one_input_form_its_projection_once_in_backward(monkeypatch):
    """q/k/v-like layers on one input (outputs 13, 2, 2; r 12; 40 tokens): read alone, the narrow ones
    would form H = (gᵀ x) Aᵀ (cheaper than x Aᵀ for one layer), but x Aᵀ is shared by the three, so the
    backward forms it once and every layer uses it; outputs and gradients equal the reference."""
    r, tokens = 12, 40
    assert functional.lambda_grad_route(tokens, IN, 2, r, projection_shared=False) == "gram"
    assert functional.lambda_grad_route(tokens, IN, 2, r, projection_shared=True) == "projected"
    projections = VeRAProjections(r, IN, IN, key=3).to(torch.float64)
    layers = []
    for out, seed in ((IN, 0), (2, 1), (2, 2)):
        torch.manual_seed(seed)
        base = nn.Linear(IN, out, bias=False).to(torch.float64).requires_grad_(False)
        layer = VeRALayer(base, projections, r, 0.1, 0.0)
        with torch.no_grad():
            layer.lambda_b.normal_()
            layer.lambda_d.normal_()
        layers.append(layer)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, IN, generator=gen, dtype=torch.float64)
    gs = [torch.randn(tokens, layer.out_features, generator=gen, dtype=torch.float64) for layer in layers]

    def run(forward):
        xx = x.clone().requires_grad_()
        sum((forward(layer, xx) * g).sum() for layer, g in zip(layers, gs, strict=True)).backward()
        grads = [xx.grad] + [t.grad for layer in layers for t in (layer.lambda_b, layer.lambda_d)]
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        return grads

    want = run(lambda layer, xx: layer.reference_forward(xx))
    formed = []
    real = functional.projected_input
    monkeypatch.setattr(functional, "projected_input", lambda A_, x2: formed.append(real(A_, x2)) or formed[-1])
    got = run(lambda layer, xx: layer(xx))
    assert {functional.vera_plan(tokens, IN, layer.out_features, r, True) for layer in layers} == {functional.MERGED_KEPT}
    assert len(formed) == 3 and all(f is formed[0] for f in formed)  # one product, used by all three layers
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() < 1e-12 * max(1.0, w.abs().max().item())


def test_merged_vera_keeps_the_projected_input_not_the_input(monkeypatch):
    """A merged VeRA layer forms x Aᵀ (T x r) in forward and keeps it for H = gᵀ x Aᵀ, instead of
    keeping x (T x in) and forming x Aᵀ again in backward; gradients still equal the reference."""
    layer = adapter_layer("vera", base_layer("linear"))
    tokens = 40
    assert functional.vera_plan(tokens, IN, OUT, R, True) == functional.MERGED_KEPT
    assert functional.lambda_grad_route(tokens, IN, OUT, R, projection_shared=False) == "projected"
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, OUT, generator=gen, dtype=torch.float64)

    def grads(forward, xx):
        (forward(xx) * g).sum().backward()
        out = [xx.grad, layer.lambda_b.grad, layer.lambda_d.grad]
        layer.zero_grad(set_to_none=True)
        return out

    want = grads(layer.reference_forward, x.clone().requires_grad_())
    saved = []
    xx = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(xx)
    assert not any(t.untyped_storage().data_ptr() == xx.untyped_storage().data_ptr() for t in saved)
    assert any(t.shape == (tokens, R) for t in saved)
    formed = []
    real = functional.projected_input
    monkeypatch.setattr(functional, "projected_input", lambda A_, x2: formed.append(real(A_, x2)) or formed[-1])
    (y * g).sum().backward()
    got = [xx.grad, layer.lambda_b.grad, layer.lambda_d.grad]
    assert formed == []  # backward used the kept product
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() < 1e-12 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("tokens", [FACTORED, MERGED], ids=["factored", "merged"])
def test_vera_layer_runs_under_inference_mode(tokens):
    """Inference tensors have no version counter: the shared x Aᵀ is then formed per call, not kept."""
    layer = adapter_layer("vera", base_layer("linear"))
    x = torch.randn(*tokens, IN, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = layer.reference_forward(x).detach()
    with torch.inference_mode():
        got = layer(x.clone())
    assert (got - want).abs().max().item() < 1e-12


def test_the_token_counts_take_both_paths():
    n_factored, n_merged = FACTORED[0], MERGED[0] * MERGED[1]
    assert not functional.merged_is_cheaper(n_factored, IN, OUT, with_backward=True)
    assert functional.merged_is_cheaper(n_merged, IN, OUT, with_backward=True)


def test_layer_reference_forward_method_matches_the_layer():
    for method in ("lora", "dora", "vera"):
        layer = adapter_layer(method, base_layer("linear"))
        x = torch.randn(5, IN, dtype=torch.float64)
        assert torch.allclose(layer(x), layer.reference_forward(x), atol=1e-12, rtol=0)


# ----- DoRA: ∂L/∂m where m is (nearly) zero -----------------------------------------------------------
@pytest.mark.parametrize("tokens", [FACTORED, MERGED], ids=["factored", "merged"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_magnitude_gradient_is_exact_at_and_near_zero(kind, tokens):
    """∂L/∂m_i = Σ_t g_ti z_ti / n_i (z = x Vᵀ) is finite at m_i = 0; dividing (y − b) by m gives NaN there
    and loses digits to the bias at m_i = 1e-9."""
    layer = adapter_layer("dora", base_layer(kind))
    with torch.no_grad():
        layer.magnitude[0] = 0.0
        layer.magnitude[1] = 1e-9
        layer.base_layer.bias.mul_(100.0)
    (_, grads), (_, grads_ref) = _fused_and_reference_run("dora", layer, tokens, seed=4)
    gm, gm_ref = grads[-1], grads_ref[-1]
    assert torch.isfinite(gm).all()
    assert torch.allclose(gm, gm_ref, rtol=1e-12, atol=1e-13), (gm[:2], gm_ref[:2])


# ----- the adapter compute dtype over a bfloat16 base -------------------------------------------------
class OneLayer(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


SPECS = {"lora": {"preset": "lora", "r": 4, "alpha": 8}, "dora": {"preset": "dora", "r": 4, "alpha": 8},
         "vera": {"preset": "vera", "r": 16}}


def _grad_errors(method: str, width: int = 64, tokens: int = 48):
    """Relative max error of the adapter gradients vs float64, for ours (float32 and base) and PEFT,
    on one bfloat16 layer with bf16 inputs and upstream gradient (so every side sees the same data)."""
    torch.manual_seed(0)
    lin = nn.Linear(width, width - 8, bias=True).to(torch.bfloat16).requires_grad_(False)
    base = OneLayer(lin)
    x = torch.randn(tokens, width).to(torch.bfloat16)
    g = torch.randn(tokens, width - 8).to(torch.bfloat16)

    def grads(model, tensors):
        xx = x.clone().requires_grad_()
        (model(xx).float() * g.float()).sum().backward()
        return {k: t.grad.double() for k, t in tensors.items()}

    def build(model, **options):
        adapted = variants.build(model, {**SPECS[method], "target_modules": "proj", **options})
        with torch.no_grad():
            for k, t in adapted.layers["proj"].adapter_state().items():
                t.copy_(tensors[k])
            if method == "vera":  # PEFT rounds its shared pair to the base's bf16 (then casts it back up): use its
                adapted.model.vera_projections.A.copy_(twin.base_model.vera_A["default"])
                adapted.model.vera_projections.B.copy_(twin.base_model.vera_B["default"])
        return adapted

    first = variants.build(copy.deepcopy(base), {**SPECS[method], "target_modules": "proj"})
    randomize_adapter(first, scale=0.3)
    tensors = {k: t.detach().clone() for k, t in first.layers["proj"].adapter_state().items()}
    twin = peft_twin(first, base)
    out = {"peft": grads(twin, {k: peft_param(twin, "proj", k) for k in tensors})}
    for choice in ("float32", "base"):
        adapted = build(copy.deepcopy(base), adapter_dtype=choice)
        out[choice] = grads(adapted.model, adapted.layers["proj"].adapter_state())
    # float64 reference with the same (bf16-valued) base, input and gradient, and the same adapter tensors
    ref = build(copy.deepcopy(base).double())
    xx = x.double().requires_grad_()
    (ref.model(xx) * g.double()).sum().backward()
    want = {k: t.grad for k, t in ref.layers["proj"].adapter_state().items()}
    return {side: {k: ((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want}
            for side, got in out.items()}


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_float32_adapter_dtype_on_bf16_base_is_as_accurate_as_peft(method):
    err = _grad_errors(method)
    for key, peft in err["peft"].items():
        assert err["float32"][key] <= 2 * peft + 1e-6, (key, err)
    # PEFT keeps the adapter computation in float32: errors of float32 rounding, not bf16's, for every
    # tensor but DoRA's magnitude (its gradient takes x W0ᵀ from the bf16 base GEMM, in PEFT as in ours)
    low_rank = [k for k in err["peft"] if k != "magnitude"]
    assert max(err["peft"][k] for k in low_rank) < 1e-5, err
    assert all(err["base"][k] > 1e-4 and err["base"][k] > 100 * err["float32"][k] for k in low_rank), err


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_float32_adapter_math_on_bf16_layer_against_float64_reference(method, kind, dropout):
    """Every fused path with a bf16 base and float32 adapter tensors: the adapter gradients carry
    float32 rounding only (DoRA's magnitude without dropout: the bf16 base GEMM's), y and ∂x bf16's."""
    layer = adapter_layer(method, base_layer(kind, torch.bfloat16))
    assert layer.adapter_dtype == "float32" and all(t.dtype == torch.float32 for t in layer.adapter_state().values())
    twin = copy.deepcopy(layer).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(*MERGED, IN, generator=gen).to(torch.bfloat16)
    g = torch.randn(*MERGED, OUT, generator=gen).to(torch.bfloat16)
    xd = (x * (torch.rand(x.shape, generator=gen) > 0.3) * 2).to(torch.bfloat16) if dropout else None
    fused, _, tensors = fused_and_reference(method, layer)
    _, ref, ref_tensors = fused_and_reference(method, twin)
    if method == "vera":
        A, B = (t.double() for t in layer.sliced())
        ref = lambda x, xd, *t: reference.vera_reference(twin, x, xd, *t, A, B)  # noqa: E731
    y, grads = outputs_and_grads(fused, x, xd, tensors, g)
    y_ref, grads_ref = outputs_and_grads(ref, x.double(), None if xd is None else xd.double(), ref_tensors, g.double())
    assert y.dtype == torch.bfloat16

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert rel(y, y_ref) < 1e-2
    n_inputs = 1 if xd is None else 2
    for got, want in zip(grads[:n_inputs], grads_ref[:n_inputs], strict=True):
        assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    for i, (got, want) in enumerate(zip(grads[n_inputs:], grads_ref[n_inputs:], strict=True)):
        assert got.dtype == torch.float32
        bf16_base_term = method == "dora" and not dropout and i == 2
        assert rel(got, want) < (1e-2 if bf16_base_term else 1e-5), (i, rel(got, want))


def test_adapter_dtype_option_reaches_every_layer_and_is_checked():
    from conftest import tiny_llama

    model = tiny_llama(dtype=torch.bfloat16)
    adapted = variants.build(model, {"preset": "vera", "r": 8, "adapter_dtype": "base"})
    assert {layer.adapter_dtype for layer in adapted.layers.values()} == {"base"}
    adapted = variants.build(tiny_llama(dtype=torch.bfloat16), {"preset": "dora", "r": 4})
    assert {layer.adapter_dtype for layer in adapted.layers.values()} == {"float32"}
    # adapter tensors stay float32; a merge writes into the bf16 base
    assert {t.dtype for layer in adapted.layers.values() for t in layer.adapter_state().values()} == {torch.float32}
    randomize_adapter(adapted)
    adapted.merge()
    assert {layer.base_weight().dtype for layer in adapted.layers.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="adapter_dtype.*'bfloat16'"):
        variants.get("lora", adapter_dtype="bfloat16")


def test_vera_projected_input_is_shared_only_while_its_operands_are_unchanged():
    A = torch.randn(4, 13, dtype=torch.float64)
    x = torch.randn(6, 13, dtype=torch.float64)
    first = functional.projected_input(A[:, :13], x)
    assert functional.projected_input(A[:, :13], x) is first  # q/k/v reading the same input
    assert torch.equal(first, A @ x.t())
    with torch.no_grad():
        x.mul_(2.0)  # an in-place change bumps the version: recomputed
    again = functional.projected_input(A[:, :13], x)
    assert again is not first and torch.equal(again, A @ x.t())
    assert functional.projected_input(A[:, :12], x[:, :12]) is not again  # another slice, another layout
