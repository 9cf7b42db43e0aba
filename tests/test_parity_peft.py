"""Forward outputs and gradients of our LoRA, rsLoRA, DoRA and VeRA equal PEFT's, given identical weights.

Each case runs at two batch shapes, because the fused layers pick their evaluation order
by shape: a small batch takes the factored path (x W0ᵀ + s·(xAᵀ)Bᵀ), a larger one the
merged path (x (W0 + ΔW)ᵀ). Tolerance: max abs diff <= 1e-5 in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    full_precision_presets,
    peft_param,
    peft_twin,
    preset,
    randomize_adapter,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)

import variants
from variants.functional import merged_is_cheaper

SPECS = {
    "lora": {"preset": "lora", "r": 4, "alpha": 8},
    "rslora": {"preset": "rslora", "r": 4, "alpha": 8},
    "dora": {"preset": "dora", "r": 4, "alpha": 8},
    "vera": {"preset": "vera", "r": 16, "d_initial": 0.1},
}
SMALL, LARGE = (2, 8), (4, 32)  # 16 tokens: factored path; 128 tokens: merged path
TOL = 1e-5


def test_the_two_shapes_take_different_paths():
    # The tiny Llama's layers are at most 48 wide: 16 tokens stay factored, 128 merge.
    for in_f, out_f in [(32, 32), (32, 48), (48, 32), (32, 16)]:
        assert not merged_is_cheaper(SMALL[0] * SMALL[1], in_f, out_f, with_backward=True)
        assert merged_is_cheaper(LARGE[0] * LARGE[1], in_f, out_f, with_backward=True)


def _compare(adapted, ours_model, twin, ids):
    ours = ours_model(input_ids=ids, labels=ids)
    theirs = twin(input_ids=ids, labels=ids)
    assert (ours.logits - theirs.logits).abs().max().item() <= TOL
    ours.loss.backward()
    theirs.loss.backward()
    checked = 0
    for name, layer in adapted.layers.items():
        for key, tensor in layer.adapter_state().items():
            if not tensor.requires_grad:
                continue
            g_ours, g_theirs = tensor.grad, peft_param(twin, name, key).grad
            assert g_ours is not None and g_theirs is not None, (name, key)
            assert g_ours.abs().max() > 0, f"{name}.{key}: zero gradient makes the comparison vacuous"
            diff = (g_ours - g_theirs).abs().max().item()
            assert diff <= TOL, f"{name}.{key}: max |grad diff| {diff}"
            checked += 1
    return checked


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["factored", "merged"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_and_gradients_match_peft(name, shape):
    base = tiny_llama()
    model = copy.deepcopy(base)
    adapted = variants.build(model, SPECS[name])
    randomize_adapter(adapted)
    twin = peft_twin(adapted, base)
    checked = _compare(adapted, model, twin, token_batch(*shape))
    assert checked == sum(len(layer.adapter_state()) for layer in adapted.layers.values())


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_dropout_path_matches_peft(name):
    """With dropout in training mode, the same RNG stream gives both models the same masks."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    adapted = variants.build(model, {**SPECS[name], "dropout": 0.3})
    randomize_adapter(adapted)
    twin = peft_twin(adapted, base)
    model.train()
    twin.train()
    ids = token_batch(*LARGE)
    torch.manual_seed(123)
    ours = model(input_ids=ids, labels=ids)
    torch.manual_seed(123)
    theirs = twin(input_ids=ids, labels=ids)
    assert (ours.logits - theirs.logits).abs().max().item() <= TOL
    ours.loss.backward()
    theirs.loss.backward()
    for lname, layer in adapted.layers.items():
        for key, tensor in layer.adapter_state().items():
            assert (tensor.grad - peft_param(twin, lname, key).grad).abs().max().item() <= TOL


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["factored", "merged"])
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_gpt2_conv1d_matches_peft(name, shape):
    """GPT-2 stores its linear weights transposed (Conv1D, fan_in_fan_out)."""
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    adapted = variants.build(model, SPECS[name])
    assert all(layer.fan_in_fan_out for layer in adapted.layers.values())
    assert {n.rsplit(".", 1)[-1] for n in adapted.layers} == {"c_attn", "c_proj", "c_fc"}
    randomize_adapter(adapted)
    twin = peft_twin(adapted, base, fan_in_fan_out=True)
    assert _compare(adapted, model, twin, token_batch(*shape)) > 0


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["factored", "merged"])
@pytest.mark.parametrize("name", [n for n in full_precision_presets()
                                  # W_res + s·B0A0 equals W0 within rounding, not bitwise: tests/test_init_family.py
                                  if not variants.part_class("init", variants.AdapterSpec.from_dict(preset(n)).init
                                                             ).rewrites_base])
def test_output_at_init_equals_base_exactly(name, shape):
    base = tiny_llama()
    ids = token_batch(*shape)
    with torch.no_grad():
        expected = base(ids).logits
    adapted = variants.build(copy.deepcopy(base), preset(name))
    with torch.no_grad():
        got = adapted(ids).logits
    assert torch.equal(got, expected)
    # and with autograd recording (the training path)
    got_train = adapted(ids).logits
    assert torch.equal(got_train.detach(), expected)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_gpt2_output_at_init_equals_base_exactly(name):
    base = tiny_gpt2()
    ids = token_batch(*LARGE)
    with torch.no_grad():
        expected = base(ids).logits
        got = variants.build(copy.deepcopy(base), {"preset": name})(ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_trainable_parameter_counts_match_peft(name):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), SPECS[name])
    twin = peft_twin(adapted, base)
    assert adapted.parameter_counts() == twin.get_nb_trainable_parameters()
