"""Specs: presets, composition of parts, and bad input rejected before the model changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import preset, tiny_llama, token_batch

import variants
from variants import AdapterSpec
from variants.core import AdapterLayer


def test_every_preset_builds_and_names_its_parts():
    assert variants.names() == ["adalora", "corda", "delta_lora", "dora", "eva", "loftq", "lora", "lora_fa", "lora_ga",
                                "lora_plus", "olora", "pissa", "qlora", "rslora", "sora", "vera"]
    expected = {
        "lora": ("lora", "standard", "adamw", "none"),
        "rslora": ("lora", "rslora", "adamw", "none"),
        "dora": ("dora", "standard", "adamw", "none"),
        "vera": ("vera", "standard", "adamw", "none"),
        "lora_fa": ("lora", "standard", "lora_fa", "none"),
        "lora_plus": ("lora", "standard", "lora_plus", "none"),
        "delta_lora": ("lora", "standard", "adamw", "delta_lora"),
        "qlora": ("lora", "standard", "paged_adamw", "none"),
        "loftq": ("lora", "standard", "adamw", "none"),
        "adalora": ("adalora", "standard", "adamw", "none"),
        "sora": ("sora", "standard", "adamw", "none"),
        "pissa": ("lora", "standard", "adamw", "none"),
        "olora": ("lora", "standard", "adamw", "none"),
        "eva": ("lora", "standard", "adamw", "none"),
        "corda": ("lora", "standard", "adamw", "none"),
        "lora_ga": ("lora", "standard", "adamw", "none"),
    }
    for name, (layer, scaling, optimizer, step) in expected.items():
        spec = variants.AdapterSpec.from_dict(preset(name))
        assert (spec.layer, spec.scaling, spec.optimizer, spec.step) == (layer, scaling, optimizer, step)
        assert spec.label == name


def test_scale_follows_the_scaling_part():
    assert AdapterSpec(r=16, alpha=32).scale == 2.0
    assert AdapterSpec(r=16, alpha=32, scaling="rslora").scale == 8.0


def test_spec_round_trips_through_a_flat_dict():
    spec = variants.get("vera", r=64, d_initial=0.05, target_modules="q_proj,v_proj")
    again = AdapterSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.target_modules == ("q_proj", "v_proj")
    assert again.options["d_initial"] == 0.05 and again.options["projection_prng_key"] == 0


@pytest.mark.parametrize("combo", [
    {"layer": "dora", "scaling": "rslora", "optimizer": "lora_plus"},   # rsDoRA with LoRA+ groups
    {"layer": "lora", "scaling": "rslora", "step": "delta_lora"},
    {"layer": "lora", "scaling": "rslora", "optimizer": "lora_fa"},
])
def test_compatible_combinations_build_and_train_a_step(combo):
    model = tiny_llama()
    adapted = variants.build(model, {**combo, "r": 4, "alpha": 8})
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt = adapted.optimizer(1e-2)
    before = {n: p.detach().clone() for n, p in adapted.named_trainable_parameters()}
    adapted.before_optimizer_step(0, opt)
    opt.step()
    adapted.after_optimizer_step(0, opt)
    assert any(not torch.equal(before[n], p) for n, p in adapted.named_trainable_parameters())


@pytest.mark.parametrize("values, fragment", [
    ({"preset": "lorax"}, "unknown variant 'lorax'"),
    ({"layer": "conv"}, "unknown layer kind 'conv'"),
    ({"scaling": "sqrt"}, "unknown scaling part 'sqrt'"),
    ({"optimizer": "sgd"}, "unknown optimizer part 'sgd'"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": -4}, "got -4"),
    ({"r": "eight"}, "got 'eight'"),
    ({"r": 8.0}, "got 8.0"),
    ({"r": True}, "got True"),
    ({"alpha": 0}, "alpha must be a positive number, got 0"),
    ({"alpha": -1.5}, "got -1.5"),
    ({"alpha": float("nan")}, "got nan"),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
    ({"dropout": -0.1}, "got -0.1"),
    ({"target_modules": []}, "target_modules must be non-empty"),
    ({"target_modules": ["q_proj", "all-linear"]}, "cannot be combined"),
    ({"rank": 8}, "unknown option 'rank'"),
    ({"loraplus_ratio": 4}, "option 'loraplus_ratio' belongs to optimizer=lora_plus, but this spec uses optimizer=adamw"),
    ({"preset": "lora_plus", "loraplus_ratio": 0}, "option 'loraplus_ratio' must be > 0, got 0"),
    ({"preset": "vera", "d_initial": "small"}, "option 'd_initial' must be a number, got 'small'"),
    ({"preset": "vera", "optimizer": "lora_fa"}, "incompatible combination: optimizer=lora_fa with layer=vera"),
    ({"preset": "vera", "optimizer": "lora_plus"}, "incompatible combination: optimizer=lora_plus with layer=vera"),
    ({"preset": "vera", "scaling": "rslora"}, "incompatible combination: layer=vera with scaling=rslora"),
    ({"preset": "dora", "optimizer": "lora_fa"}, "incompatible combination: optimizer=lora_fa with layer=dora"),
    ({"preset": "delta_lora", "layer": "dora"}, "incompatible combination: step=delta_lora with layer=dora"),
    ({"preset": "delta_lora", "dropout": 0.1}, "incompatible combination: step=delta_lora with dropout=0.1"),
])
def test_bad_specs_raise_a_value_error_naming_the_value(values, fragment):
    with pytest.raises(ValueError) as err:
        AdapterSpec.from_dict(values)
    assert fragment in str(err.value)


def _fingerprint(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("values, fragment", [
    ({"target_modules": "q_proj,not_a_layer"}, "target pattern 'not_a_layer' matches no module"),
    ({"target_modules": "embed_tokens"}, "matches 'model.embed_tokens', a Embedding"),
    ({"target_modules": "q_proj", "r": 0}, "r must be a positive integer"),
    ({"preset": "nope"}, "unknown variant 'nope'"),
])
def test_build_fails_before_touching_the_model(values, fragment):
    model = tiny_llama()
    names, state, grads = _fingerprint(model)
    with pytest.raises(ValueError) as err:
        variants.build(model, values)
    assert fragment in str(err.value)
    names2, state2, grads2 = _fingerprint(model)
    assert names2 == names and grads2 == grads
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_building_twice_on_the_same_model_is_refused():
    model = tiny_llama()
    variants.build(model, {"preset": "lora"})
    with pytest.raises(ValueError, match="already carries adapter layers"):
        variants.build(model, {"preset": "dora"})


def test_target_patterns_and_all_linear():
    model = tiny_llama()
    adapted = variants.build(copy.deepcopy(model), {"target_modules": "q_proj,v_proj"})
    assert sorted(adapted.layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    everything = variants.build(copy.deepcopy(model), {"target_modules": "all-linear"})
    leaves = {n.rsplit(".", 1)[-1] for n in everything.layers}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in everything.layers and len(everything.layers) == 14


def test_only_adapter_tensors_train_and_the_summary_counts_them():
    model = tiny_llama()
    total_base = sum(p.numel() for p in model.parameters())
    adapted = variants.build(model, {"r": 4, "target_modules": "q_proj,v_proj"})
    trainable = adapted.named_trainable_parameters()
    assert all(n.endswith(("lora_A", "lora_B")) for n, _ in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 KV heads of 8); 2 layers; A is r x in, B is out x r
    expected = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert adapted.parameter_counts() == (expected, total_base + expected)
    assert adapted.trainable_summary() == (
        f"trainable params: {expected:,d} || all params: {total_base + expected:,d} || "
        f"trainable%: {100 * expected / (total_base + expected):.4f}")
