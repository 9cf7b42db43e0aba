"""QLoRA's 4-bit base and LoftQ's initialisation (bitsandbytes on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter, tiny_llama, token_batch

import variants
from variants.quant import QuantizedLinear, bits_per_parameter, dequantize_weight, quantize_weight, quantized_bytes


def _linear(out_f=48, in_f=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def test_quantized_forward_is_bnb_dequantize_then_matmul():
    lin = _linear()
    q = QuantizedLinear.from_linear(lin, "nf4", True, 64)
    x = torch.randn(5, 64)
    import bitsandbytes.functional as bnbf

    expected = F.linear(x, bnbf.dequantize_4bit(q.codes, q.state), lin.bias)
    assert torch.equal(q(x), expected)
    # and bitsandbytes' own Linear4bit (with the CPU repack switched off) computes the same
    import bitsandbytes as bnb

    ref = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    ref.support_avx512bf16_for_cpu = False
    assert torch.allclose(ref(x), expected, atol=1e-5)
    assert (q(x) - lin(x)).abs().max() > 1e-4  # quantization really happened


def test_eval_then_train_keeps_input_gradients():
    """bnb's Linear4bit loses x.grad after an eval forward on this CPU (docs/quantized.md); our path must not."""
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "qlora", "r": 4, "alpha": 8, "target_modules": "q_proj,down_proj"})
    randomize_adapter(adapted)
    layer = adapted.layers["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 48)
    model.eval()
    with torch.no_grad():
        layer(x)
    model.train()
    x.requires_grad_(True)
    g = torch.randn(3, 32)
    (layer(x) * g).sum().backward()
    assert x.grad is not None
    w = layer.base_weight().detach() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    assert torch.allclose(x.grad, g @ w, atol=1e-5)


def test_qlora_equals_lora_on_the_dequantized_base():
    base = tiny_llama()
    qmodel = copy.deepcopy(base)
    q = variants.build(qmodel, {"layer": "lora", "base": "nf4", "r": 4, "alpha": 8})
    randomize_adapter(q)
    dq_base = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in q.layers.items():
            dq_base.get_submodule(name).weight.copy_(layer.base_weight())
    plain = variants.build(dq_base, {"layer": "lora", "r": 4, "alpha": 8})
    with torch.no_grad():
        for name, layer in q.layers.items():
            plain.layers[name].lora_A.copy_(layer.lora_A)
            plain.layers[name].lora_B.copy_(layer.lora_B)
    ids = token_batch(4, 32)
    out_q, out_p = qmodel(input_ids=ids, labels=ids), dq_base(input_ids=ids, labels=ids)
    assert (out_q.logits - out_p.logits).abs().max() <= 1e-5
    out_q.loss.backward()
    out_p.loss.backward()
    for name, layer in q.layers.items():
        assert (layer.lora_B.grad - plain.layers[name].lora_B.grad).abs().max() <= 1e-5
    assert all(not p.requires_grad for n, p in qmodel.named_parameters() if "lora_" not in n)


def test_base_weight_bytes_follow_the_nf4_double_quant_formula():
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    other_bytes = (sum(p.numel() * 4 for p in model.parameters()) - 4 * linear_params
                   + sum(b.numel() * b.element_size() for b in model.buffers()))  # e.g. RoPE's inv_freq
    adapted = variants.build(model, {"preset": "qlora", "r": 4})
    expected = sum(round(quantized_bytes(layer.in_features * layer.out_features, 64, True))
                   for layer in adapted.layers.values()) + other_bytes
    assert adapted.base_weight_bytes() == expected
    assert 4.12 < bits_per_parameter(64, True) < 4.13  # the paper's "≈0.127 bit" overhead
    big = QuantizedLinear.from_linear(torch.nn.Linear(2048, 2048, bias=False), "nf4", True, 64)
    bits = 8 * big.storage_bytes() / 2048**2  # the two code tables amortised over 4M weights
    assert bits_per_parameter(64, True) < bits < bits_per_parameter(64, True) + 0.003
    assert adapted.parameter_counts()[1] == sum(p.numel() for p in tiny_llama(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4).parameters()) \
        + adapted.parameter_counts()[0]


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_formula_matches_real_tensors(quant_type, double_quant):
    from variants.quant import state_bytes

    for shape in [(64, 64), (192, 576), (100, 33)]:
        packed, state = quantize_weight(torch.randn(shape), quant_type, double_quant, 64)
        assert state_bytes(packed, state) == round(quantized_bytes(shape[0] * shape[1], 64, double_quant))


def test_merge_into_4bit_is_refused_and_merge_and_unload_keeps_the_function():
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "qlora", "r": 4})
    randomize_adapter(adapted)
    ids = token_batch(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(ValueError, match="merge_and_unload"):
        adapted.merge()
    plain = adapted.merge_and_unload()
    assert all(type(m) is not QuantizedLinear for m in plain.modules())
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max() <= 1e-5


def test_prequantized_weights_are_reused_and_checked():
    base = tiny_llama()
    first = variants.build(copy.deepcopy(base), {"preset": "qlora", "r": 4})
    pre = {name: (layer.base_layer.codes, layer.base_layer.state) for name, layer in first.layers.items()}
    again = variants.build(copy.deepcopy(base), {"preset": "qlora", "r": 4}, quantized=pre)
    for name, layer in again.layers.items():
        assert layer.base_layer.codes.data_ptr() == pre[name][0].data_ptr()
    with pytest.raises(ValueError, match="blocksize 64"):
        variants.build(copy.deepcopy(base), {"preset": "qlora", "r": 4, "quant_blocksize": 128}, quantized=pre)
    with pytest.raises(ValueError, match="pre-quantized weights were given"):
        variants.build(copy.deepcopy(base), {"preset": "lora"}, quantized=pre)


def test_paged_optimizer_falls_back_to_adamw_on_cpu_and_gradient_checkpointing_matches():
    base = tiny_llama()
    ids = token_batch(2, 8)
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # the same Kaiming A in both builds
        adapted = variants.build(model, {"preset": "qlora", "r": 4, "gradient_checkpointing": checkpointing})
        randomize_adapter(adapted)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapted.trainable_parameters()]))
        assert type(adapted.optimizer(1e-3)).__name__ == "AdamW"
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ----- LoftQ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [4.0, 16.0])  # s = 1 and s = 4: exact for any alpha
def test_loftq_error_is_strictly_below_plain_quantization(alpha):
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    adapted = variants.build(copy.deepcopy(base), {"preset": "loftq", "r": 4, "alpha": alpha})
    for name, layer in adapted.layers.items():
        w = base.get_submodule(name).weight.detach()
        plain = w - dequantize_weight(*quantize_weight(w, "nf4", True, 64))
        loftq = w - layer.base_weight() - layer.scale * layer.lora_B @ layer.lora_A
        assert loftq.norm() < plain.norm(), name
        assert loftq.norm() < 0.97 * plain.norm()


def test_loftq_more_iterations_do_not_hurt_on_gaussian_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    from variants.loftq import loftq_factors

    errors = []
    for iters in (1, 2, 5):
        codes, state, a, b = loftq_factors(lin.weight, 16, 2.0, iters, "nf4", True, 64)
        errors.append(((lin.weight - dequantize_weight(codes, state) - 2.0 * b @ a).norm() / lin.weight.norm()).item())
    plain = ((lin.weight - dequantize_weight(*quantize_weight(lin.weight, "nf4", True, 64))).norm() / lin.weight.norm())
    assert errors[0] < plain.item() and errors[2] <= errors[0]


def test_loftq_refuses_an_already_quantized_base_and_needs_nf4():
    qmodel = variants.build(tiny_llama(), {"preset": "qlora", "r": 4}).unload()
    with pytest.raises(ValueError, match="LoftQ needs the full-precision weights"):
        variants.build(qmodel, {"preset": "loftq", "r": 4})
    with pytest.raises(ValueError, match="incompatible combination: init=loftq with base=full"):
        variants.AdapterSpec.from_dict({"init": "loftq"})
    with pytest.raises(ValueError, match="incompatible combination: step=delta_lora with base=nf4"):
        variants.AdapterSpec.from_dict({"preset": "delta_lora", "base": "nf4"})


def test_a_meta_weight_is_refused_and_later_quantization_still_works():
    """bitsandbytes caches its code table on the device of its first call; a meta call used to poison it."""
    from variants.quant import dequantize_weight, quantize_weight

    with pytest.raises(ValueError, match="meta device"):
        quantize_weight(torch.empty(8, 64, device="meta"))
    weight = torch.randn(8, 64)
    packed, state = quantize_weight(weight)
    assert (dequantize_weight(packed, state) - weight).abs().max() < 0.5 * weight.abs().max()
