"""Method-specific behaviour: DoRA's norm and magnitude, VeRA's shared projections, LoRA+'s
groups, LoRA-FA's projected step and Delta-LoRA's weight update — each checked against the
paper's equation and, where PEFT has the method, against PEFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import peft_param, peft_twin, randomize_adapter, tiny_llama, token_batch

import variants
from variants.lora_fa import LoRAFAAdamW


# ----- DoRA ------------------------------------------------------------------------------------------
def test_dora_magnitude_starts_at_the_row_norms_of_w0_and_bias_is_kept():
    model = tiny_llama(attention_bias=True)
    with torch.no_grad():  # transformers initialises biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    adapted = variants.build(model, {"preset": "dora", "r": 4, "target_modules": "q_proj,down_proj"})
    for layer in adapted.layers.values():
        w0 = layer.base_weight()
        assert layer.magnitude.shape == (layer.out_features,)
        assert torch.equal(layer.magnitude.detach(), torch.linalg.vector_norm(w0, dim=1))
    q = adapted.layers["model.layers.0.self_attn.q_proj"]
    assert q.base_bias() is not None and q.base_bias().abs().sum() > 0
    randomize_adapter(adapted)
    x = torch.randn(3, 5, 32)
    # the paper's equation with the norm as a constant: y = x (m ⊙ V / ‖V‖_row)ᵀ + b0
    v = q.base_weight() + q.scale * q.lora_B @ q.lora_A
    expected = x @ (q.magnitude.unsqueeze(1) * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)).t() + q.base_bias()
    assert torch.allclose(q(x), expected, atol=1e-5)


def test_dora_norm_is_detached_as_in_the_paper():
    """Gradients equal those of the reference formula with ‖V‖ detached, and differ from the undetached one."""
    adapted = variants.build(tiny_llama(), {"preset": "dora", "r": 4, "target_modules": "q_proj"})
    randomize_adapter(adapted, scale=0.3)
    layer = adapted.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(6, 32)
    g = torch.randn(6, 32)

    def reference(detach):
        a, b, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
        v = layer.base_weight() + layer.scale * b @ a
        n = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        y = x @ (m.unsqueeze(1) * v / (n.detach() if detach else n)).t()
        (y * g).sum().backward()
        return a.grad, b.grad, m.grad

    (layer(x) * g).sum().backward()
    ours = (layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad)
    detached, undetached = reference(True), reference(False)
    for o, d in zip(ours, detached, strict=True):
        assert torch.allclose(o, d, atol=1e-5)
    assert not torch.allclose(ours[0], undetached[0], atol=1e-4)


# ----- VeRA ------------------------------------------------------------------------------------------
def test_vera_shares_one_frozen_pair_sized_to_the_largest_layer():
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), {"preset": "vera", "r": 16, "d_initial": 0.25})
    projections = adapted.model.vera_projections
    # all-linear on the tiny Llama: in up to 48 (down_proj), out up to 48 (gate/up_proj)
    assert tuple(projections.A.shape) == (16, 48) and tuple(projections.B.shape) == (48, 16)
    assert not any(p is projections.A or p is projections.B for p in adapted.model.parameters())
    for layer in adapted.layers.values():
        assert layer._projections is projections
        a, b = layer.sliced()
        assert a.data_ptr() == projections.A.data_ptr() and b.data_ptr() == projections.B.data_ptr()
        assert torch.equal(layer.lambda_b.detach(), torch.zeros(layer.out_features))
        assert torch.equal(layer.lambda_d.detach(), torch.full((16,), 0.25))
    trainable, _ = adapted.parameter_counts()
    assert trainable == sum(layer.out_features + 16 for layer in adapted.layers.values())
    # Kaiming-uniform from the seed: the same numbers as PEFT's VeRA with the same key
    twin = peft_twin(adapted, base)
    assert torch.equal(projections.A, twin.base_model.vera_A["default"])
    assert torch.equal(projections.B, twin.base_model.vera_B["default"])
    bound_a = math.sqrt(6 / 48)
    assert projections.A.abs().max() <= bound_a and projections.A.abs().max() > 0.9 * bound_a


def test_vera_projection_key_changes_the_pair():
    a = variants.build(tiny_llama(), {"preset": "vera", "r": 8}).model.vera_projections.A
    b = variants.build(tiny_llama(), {"preset": "vera", "r": 8, "projection_prng_key": 3}).model.vera_projections.A
    assert not torch.equal(a, b)


# ----- LoRA+ -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["lora", "dora"])
def test_lora_plus_groups_equal_peft_create_loraplus_optimizer(layer):
    from peft.optimizers import create_loraplus_optimizer

    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), {"layer": layer, "optimizer": "lora_plus", "r": 4,
                                                   "loraplus_ratio": 16})
    twin = peft_twin(adapted, base)
    ours = adapted.optimizer(lr=2e-4, weight_decay=0.01)
    theirs = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                       loraplus_weight_decay=0.01)
    name_of = {}
    for lname, lay in adapted.layers.items():
        for key, tensor in lay.adapter_state().items():
            name_of[id(tensor)] = (lname, key)
    twin_of = {id(peft_param(twin, *name_of[k])): name_of[k] for k in name_of}

    def by_lr(opt, mapping):
        out = {}
        for g in opt.param_groups:
            if g["params"]:
                out.setdefault((g["lr"], g["weight_decay"]), set()).update(mapping[id(p)] for p in g["params"])
        return out

    assert by_lr(ours, name_of) == by_lr(theirs, twin_of)
    fast = by_lr(ours, name_of)[(2e-4 * 16, 0.01)]
    assert {k for _, k in fast} == ({"lora_B", "magnitude"} if layer == "dora" else {"lora_B"})


def test_lora_plus_ratio_is_not_the_tutorials_sqrt_r_rule():
    adapted = variants.build(tiny_llama(), {"preset": "lora_plus", "r": 64, "loraplus_ratio": 16})
    lrs = sorted(g["lr"] for g in adapted.optimizer(lr=1e-4).param_groups)
    assert lrs == [1e-4, pytest.approx(1.6e-3)]


# ----- LoRA-FA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lora_fa_step_equals_peft_lorafa_optimizer_in_fp64(weight_decay):
    from peft.optimizers import create_lorafa_optimizer

    base = tiny_llama(dtype=torch.float64)
    adapted = variants.build(copy.deepcopy(base), {"preset": "lora_fa", "r": 4, "alpha": 8})
    assert all(not layer.lora_A.requires_grad for layer in adapted.layers.values())
    randomize_adapter(adapted)
    twin = peft_twin(adapted, base)
    ours = adapted.optimizer(lr=1e-2, weight_decay=weight_decay)  # eps: PEFT's 1e-6 by default
    theirs = create_lorafa_optimizer(twin, r=4, lora_alpha=8, lr=1e-2, weight_decay=weight_decay)
    assert isinstance(ours, LoRAFAAdamW)
    ids = token_batch(2, 8)
    for _ in range(3):  # several steps: moments and bias correction evolve
        for model, opt in ((adapted.model, ours), (twin, theirs)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    for lname, layer in adapted.layers.items():
        assert torch.equal(layer.lora_A, peft_param(twin, lname, "lora_A"))  # frozen in both
        diff = (layer.lora_B - peft_param(twin, lname, "lora_B")).abs().max().item()
        assert diff <= 1e-6, f"{lname}: B differs by {diff}"


def test_lora_fa_projects_b_gradient_onto_row_space_of_a():
    """s·g̃_B·A equals the full-weight gradient projected on row(A): g Aᵀ(AAᵀ)⁻¹A."""
    adapted = variants.build(tiny_llama(dtype=torch.float64), {"preset": "lora_fa", "r": 4, "alpha": 8,
                                                                "target_modules": "q_proj"})
    layer = adapted.layers["model.layers.0.self_attn.q_proj"]
    opt = adapted.optimizer(lr=1e-3)
    g_full = torch.randn(32, 32, dtype=torch.float64)  # a stand-in for ∂L/∂W
    g_b = layer.scale * g_full @ layer.lora_A.t()       # what backward gives B
    projected = g_b @ opt._projector(layer.lora_B)
    a = layer.lora_A.detach()
    expected = g_full @ a.t() @ torch.linalg.inv(a @ a.t()) @ a
    assert torch.allclose(layer.scale * projected @ a, expected, atol=1e-8)


# ----- Delta-LoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_step", [0, 2])
def test_delta_lora_weight_update_telescopes(start_step):
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "delta_lora", "r": 4, "alpha": 8, "delta_update_ratio": 2.0,
                                     "delta_start_step": start_step, "target_modules": "q_proj,down_proj"})
    w0 = {n: layer.base_weight().detach().clone() for n, layer in adapted.layers.items()}
    opt = adapted.optimizer(lr=5e-3)
    ids = token_batch(2, 8)
    factors_at = {}
    for step in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        adapted.before_optimizer_step(step, opt)
        if step == start_step + 1:  # Algorithm 1: W moves after steps t > K
            factors_at["K"] = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in adapted.layers.items()}
        opt.step()
        adapted.after_optimizer_step(step, opt)
        opt.zero_grad()
        if step <= start_step:  # W untouched up to and including step K
            assert all(torch.equal(l.base_weight(), w0[n]) for n, l in adapted.layers.items())
    s, lam = adapted.spec.scale, 2.0
    for n, layer in adapted.layers.items():
        a_k, b_k = factors_at["K"][n]
        expected = w0[n] + lam * s * (layer.lora_B @ layer.lora_A - b_k @ a_k)
        assert (layer.base_weight() - expected).abs().max().item() <= 1e-6
        assert not torch.equal(layer.base_weight(), w0[n])
    # merge gives W_T + s·B_T A_T
    expected_merged = {n: l.base_weight() + s * l.lora_B @ l.lora_A for n, l in adapted.layers.items()}
    with torch.no_grad():
        adapted.merge()
    for n, layer in adapted.layers.items():
        assert torch.allclose(layer.base_weight(), expected_merged[n], atol=1e-6)


def test_delta_lora_accumulates_in_fp32_over_a_bf16_base():
    """Tiny per-step deltas that bf16 would round away still add up."""
    model = tiny_llama(dtype=torch.bfloat16)
    adapted = variants.build(model, {"preset": "delta_lora", "r": 4, "alpha": 8, "target_modules": "q_proj"})
    layer = adapted.layers["model.layers.0.self_attn.q_proj"]
    part = adapted.part("step")
    w0 = layer.base_weight().float().clone()
    b_small = torch.full_like(layer.lora_B, 1e-4)
    with torch.no_grad():
        for _ in range(50):  # add λ·s·(B' A − B A) with B' − B tiny, 50 times
            part._add_to_weight("model.layers.0.self_attn.q_proj", layer,
                                torch.cat([layer.lora_B + b_small, layer.lora_B], 1),
                                torch.cat([layer.lora_A, -layer.lora_A], 0), 1.0)
    expected = w0 + 50 * (b_small @ layer.lora_A).float()
    naive = w0.clone().to(torch.bfloat16)
    for _ in range(50):
        naive = naive + (b_small @ layer.lora_A).to(torch.bfloat16)
    ours_err = (layer.base_weight().float() - expected).abs().max().item()
    naive_err = (naive.float() - expected).abs().max().item()
    assert ours_err < naive_err / 4
