"""Library validation and hooks: the optimizer reaches every step hook (SoRA's gate step at the
rate in force), specs and builds refuse what would crash or corrupt a model before touching it,
LoRA-FA's ε and Delta-LoRA's start step follow their references, and modifiers ask layer kinds
for capabilities instead of listing them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama, token_batch

import variants
from variants.adalora import AdaLoRA
from variants.core import AdapterLayer
from variants.lora import LoRA
from variants.parts import SLOTS, names, part_class
from variants.vera import VeRA


def _snapshot(model):
    """What 'the model is untouched' means: module tree, requires_grad flags and every tensor."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model, before):
    modules, flags, state = _snapshot(model)
    assert modules == before[0]
    assert flags == before[1]
    assert state.keys() == before[2].keys()
    assert all(torch.equal(state[k], before[2][k]) for k in state)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


# ----- item 6: the optimizer-step hooks get the optimizer; SoRA's gate steps at its lr -------------
def _sora_with_gate_gradient(**extra):
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "sora", "r": 4, "sora_xi": 0.01, "sora_l1": 0.0,
                                     "target_modules": "q_proj", **extra})
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_B.normal_()  # so that the gates get a gradient
    return model, adapted


def _proximal_step(g0, grad, lr, xi, eps=1e-8):
    # first AdamW step: m̂ = grad, v̂ = grad², then the soft-threshold by ξ
    stepped = g0 - lr * grad / (grad.abs() + eps)
    return torch.sign(stepped) * torch.clamp(stepped.abs() - xi, min=0.0)


@pytest.mark.parametrize("extra, factor", [({}, 1.0), ({"optimizer": "lora_plus"}, 1.0), ({}, 0.5)])
def test_hand_written_loop_moves_the_gate_by_the_proximal_step_at_its_lr(extra, factor):
    """The documented manual loop: lr 0.05 (with LoRA+'s 16x group, and under a schedule at 0.5x)."""
    model, adapted = _sora_with_gate_gradient(**extra)
    opt = adapted.optimizer(lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor)
    ids = token_batch(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(iter(adapted.layers.values()))
    g0, grad = layer.gate.detach().clone(), layer.gate.grad.clone()
    adapted.before_optimizer_step(0, opt)
    opt.step()
    adapted.after_optimizer_step(0, opt)
    sched.step()
    opt.zero_grad()
    expected = _proximal_step(g0, grad, 0.05 * factor, 0.01)
    assert torch.allclose(layer.gate, expected, atol=1e-6)
    moved = (layer.gate - g0).abs().max().item()
    assert moved > 0.02 * factor  # not the 1e-3 an invented fallback rate would give


def test_step_hooks_refuse_a_missing_optimizer():
    _, adapted = _sora_with_gate_gradient()
    with pytest.raises(TypeError):
        adapted.after_optimizer_step(0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="need the optimizer that steps.*got None"):
        adapted.after_optimizer_step(0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be a non-negative integer.*got -1"):
        adapted.before_optimizer_step(-1, adapted.optimizer(0.05))


def test_reference_loop_gives_the_gate_the_scheduled_lr():
    """variants.train with warmup: step 0 runs at lr·1/2, and so does the gate's step."""
    model, adapted = _sora_with_gate_gradient()
    layer = next(iter(adapted.layers.values()))
    g0 = layer.gate.detach().clone()
    ids = token_batch(2, 8)
    model.train()
    grad = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, layer.gate)[0]
    seen = []  # the gate after step 0 (finalize then folds it into B)
    variants.train(adapted, [{"input_ids": ids, "labels": ids}],
                   variants.TrainSettings(steps=1, lr=0.05, warmup_steps=1, grad_clip=None),
                   on_step=lambda record: seen.append((record.lr, layer.gate.detach().clone())))
    assert seen[0][0] == pytest.approx(0.025)
    assert torch.allclose(seen[0][1], _proximal_step(g0, grad, 0.025, 0.01), atol=1e-6)


# ----- item 7: AdaLoRA needs target_r < r -------------------------------------------------------------
@pytest.mark.parametrize("target_r", [4, 5])
def test_adalora_target_r_not_below_r_is_refused_when_the_spec_is_built(target_r):
    with pytest.raises(ValueError, match=rf"target_r \({target_r}\) must be smaller than the initial rank r \(4\)"):
        variants.AdapterSpec.from_dict({"preset": "adalora", "r": 4, "target_r": target_r, "total_step": 4})


def test_adalora_with_target_r_one_below_r_masks_without_crashing():
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "adalora", "r": 4, "target_r": 3, "total_step": 4,
                                     "target_modules": "q_proj"})
    ids = token_batch(2, 8)
    variants.train(adapted, [{"input_ids": ids, "labels": ids}], variants.TrainSettings(steps=4, lr=1e-2))
    assert sum(adapted.part("layer").kept_ranks(adapted).values()) == 3 * len(adapted.layers)


# ----- item 8: build(..., quantized=...) checks everything before changing the model ----------------
@pytest.fixture(scope="module")
def prequantized():
    from variants.quant import quantize_weight

    base = tiny_llama()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return base, names, {n: quantize_weight(base.get_submodule(n).weight.detach(), "nf4", True, 64) for n in names}


def _drop_last(base, names, pre):
    return {n: pre[n] for n in names[:-1]}


def _wrong_blocksize_last(base, names, pre):
    from variants.quant import quantize_weight

    return {**pre, names[-1]: quantize_weight(base.get_submodule(names[-1]).weight.detach(), "nf4", True, 128)}


def _wrong_shape_last(base, names, pre):
    return {**pre, names[-1]: pre[names[0]]}  # q_proj's 32x32 codes for down_proj (32x48)


@pytest.mark.parametrize("corrupt, fragment", [
    (_drop_last, "no pre-quantized weight for model.layers.1.mlp.down_proj"),
    (_wrong_blocksize_last, "pre-quantized model.layers.1.mlp.down_proj is nf4/blocksize 128"),
    (_wrong_shape_last, "holds a weight of shape (32, 32), the layer's is (32, 48)"),
])
def test_build_with_bad_prequantized_weights_leaves_the_model_untouched(prequantized, corrupt, fragment):
    base, names, pre = prequantized
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ValueError) as err:
        variants.build(model, {"preset": "qlora", "r": 4}, quantized=corrupt(base, names, pre))
    assert fragment in str(err.value)
    _assert_untouched(model, before)


def test_an_unforeseen_failure_while_replacing_layers_is_rolled_back(monkeypatch):
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # flags come back as they were, not all True
    before = _snapshot(model)
    original = LoRA.create
    calls = []

    def failing_create(self, name, base_layer):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        return original(self, name, base_layer)

    monkeypatch.setattr(LoRA, "create", failing_create)
    with pytest.raises(RuntimeError, match="simulated"):
        variants.build(model, {"preset": "lora", "r": 4})
    assert len(calls) == 5
    _assert_untouched(model, before)


# ----- item 9: LoftQ with r above a layer's width -------------------------------------------------------
def test_loftq_accepts_a_rank_above_a_layers_width_as_lora_does():
    base = tiny_llama(num_key_value_heads=1)  # k_proj, v_proj: 32 -> 8
    assert base.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    variants.build(copy.deepcopy(base), {"preset": "lora", "r": 12})  # LoRA accepts r = 12 there
    model = copy.deepcopy(base)
    adapted = variants.build(model, {"preset": "loftq", "r": 12, "alpha": 24})
    layer = adapted.layers["model.layers.0.self_attn.k_proj"]
    w = base.model.layers[0].self_attn.k_proj.weight.detach()
    residual = w - layer.base_weight() - layer.scale * layer.lora_B @ layer.lora_A
    assert residual.abs().max().item() <= 1e-5 * w.abs().max().item()  # all 8 components: exact
    assert torch.equal(layer.lora_B[:, 8:], torch.zeros(8, 4))  # the extra rank starts as LoRA's
    assert (layer.lora_A[8:].abs() > 0).all()
    ids = token_batch(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.lora_B.grad[:, 8:].abs().sum() > 0  # ... and trains


# ----- item 10: an adapter on a weight shared with another module -------------------------------------
@pytest.mark.parametrize("preset", ["lora", "delta_lora"])
def test_a_tied_lm_head_is_refused_before_anything_changes(preset):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _snapshot(model)
    with pytest.raises(ValueError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        variants.build(model, {"preset": preset, "r": 4, "target_modules": "q_proj,lm_head"})
    _assert_untouched(model, before)


def test_all_linear_still_skips_a_tied_head_and_an_untied_head_can_be_adapted():
    tied = variants.build(tiny_llama(tie_word_embeddings=True), {"preset": "lora", "r": 4})
    assert "lm_head" not in tied.layers and len(tied.layers) == 14
    untied = tiny_llama()
    adapted = variants.build(untied, {"preset": "lora", "r": 4, "target_modules": "lm_head"})
    assert list(adapted.layers) == ["lm_head"]


# ----- item 13: LoRA-FA's ε and Delta-LoRA's start step follow their references -----------------------
def test_lora_fa_defaults_to_pefts_eps_and_an_explicit_eps_wins():
    adapted = variants.build(tiny_llama(), {"preset": "lora_fa", "r": 4})
    assert {g["eps"] for g in adapted.optimizer(lr=1e-3).param_groups} == {1e-6}  # PEFT's LoraFAOptimizer
    assert {g["eps"] for g in adapted.optimizer(lr=1e-3, eps=1e-8).param_groups} == {1e-8}
    plain = variants.build(tiny_llama(), {"preset": "lora", "r": 4})
    assert {g["eps"] for g in plain.optimizer(lr=1e-3).param_groups} == {1e-8}  # torch's AdamW
    assert variants.TrainSettings(steps=1, lr=1e-3).eps is None
    with pytest.raises(ValueError, match="eps must be a positive number or null, got 0"):
        variants.TrainSettings(steps=1, lr=1e-3, eps=0)


def test_delta_lora_moves_w_only_after_steps_past_k():
    """Algorithm 1: 'if t > K'. With K = 1, steps 0 and 1 leave W alone; step 2 moves it."""
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "delta_lora", "r": 4, "delta_start_step": 1,
                                     "target_modules": "q_proj"})
    layer = adapted.layers["model.layers.0.self_attn.q_proj"]
    w0 = layer.base_weight().detach().clone()
    opt = adapted.optimizer(lr=1e-2)
    ids = token_batch(2, 8)
    moved = []
    for step in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        adapted.before_optimizer_step(step, opt)
        opt.step()
        adapted.after_optimizer_step(step, opt)
        opt.zero_grad()
        moved.append(not torch.equal(layer.base_weight(), w0))
    assert moved == [False, False, True]


# ----- modifiers ask the layer kind for capabilities --------------------------------------------------
def test_no_modifier_lists_layer_kinds():
    for slot in SLOTS[1:]:
        assert all("layer" not in part_class(slot, name).requires for name in names(slot)), slot


def test_modifiers_follow_the_layer_kinds_capability_flags(monkeypatch):
    with pytest.raises(ValueError, match="incompatible combination: optimizer=lora_plus with layer=vera"):
        variants.AdapterSpec.from_dict({"preset": "vera", "optimizer": "lora_plus"})
    monkeypatch.setattr(VeRA, "trains_lora_pair", True)  # a layer kind that declared an A/B pair
    variants.AdapterSpec.from_dict({"preset": "vera", "optimizer": "lora_plus"})

    monkeypatch.setattr(LoRA, "update_is_s_ba", False)
    for values, modifier in [({"optimizer": "lora_fa"}, "optimizer=lora_fa"),
                             ({"step": "delta_lora"}, "step=delta_lora"),
                             ({"base": "nf4", "init": "loftq"}, "init=loftq")]:
        with pytest.raises(ValueError, match=f"incompatible combination: {modifier} with layer=lora"):
            variants.AdapterSpec.from_dict(values)

    monkeypatch.setattr(AdaLoRA, "requires", {})  # without AdaLoRA's own refusal, rsLoRA still asks
    with pytest.raises(ValueError, match="incompatible combination: scaling=rslora with layer=adalora"):
        variants.AdapterSpec.from_dict({"preset": "adalora", "total_step": 4, "scaling": "rslora"})
    monkeypatch.setattr(AdaLoRA, "scaled_by_spec", True)
    variants.AdapterSpec.from_dict({"preset": "adalora", "total_step": 4, "scaling": "rslora"})


def test_adapter_layers_take_the_mode_of_the_layer_they_replace():
    """A model in eval mode stays deterministic after build: the adapter's dropout is off until train()."""
    torch.manual_seed(0)
    model = tiny_llama()  # eval mode
    adapted = variants.build(model, variants.get("lora", r=4, dropout=0.5, target_modules="q_proj,v_proj"))
    assert all(not layer.training for layer in adapted.layers.values())
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_B.normal_()
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    model.train()
    assert all(layer.training for layer in adapted.layers.values())
