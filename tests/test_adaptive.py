"""AdaLoRA (budgeted SVD-form ranks, against PEFT's RankAllocator) and SoRA (gated, pruned ranks)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import tiny_llama, token_batch

import variants

ADA = {"preset": "adalora", "r": 6, "alpha": 8, "target_r": 3, "tinit": 2, "tfinal": 3, "delta_t": 2,
       "total_step": 14, "orth_reg_weight": 0.5, "target_modules": "q_proj,v_proj,down_proj"}


def peft_adalora(base, ours):
    from peft import AdaLoraConfig, get_peft_model

    o = ours.spec.options
    cfg = AdaLoraConfig(init_r=ours.spec.r, target_r=o["target_r"], lora_alpha=ours.spec.alpha, tinit=o["tinit"],
                        tfinal=o["tfinal"], deltaT=o["delta_t"], beta1=o["beta1"], beta2=o["beta2"],
                        orth_reg_weight=o["orth_reg_weight"], total_step=o["total_step"],
                        target_modules=list(ours.spec.target_modules), lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in ours.layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                params[f"base_model.model.{name}.{key}.default"].copy_(getattr(layer, key))
    return model, params


def _randomize_e(adapted, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=gen, dtype=torch.float64).to(layer.lora_E))


def test_adalora_forward_and_gradients_match_peft():
    base = tiny_llama()
    ours = variants.build(copy.deepcopy(base), {**ADA, "orth_reg_weight": 0.0})
    _randomize_e(ours)
    theirs, params = peft_adalora(base, ours)
    ids = token_batch(4, 32)
    a, b = ours.model(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    a.loss.backward()
    b.loss.backward()
    for name, layer in ours.layers.items():
        for key in ("lora_A", "lora_E", "lora_B"):
            diff = (getattr(layer, key).grad - params[f"base_model.model.{name}.{key}.default"].grad).abs().max()
            assert diff <= 1e-5, (name, key)


def test_adalora_orthogonality_penalty_equals_peft():
    base = tiny_llama()
    ours = variants.build(copy.deepcopy(base), ADA)
    _randomize_e(ours)
    theirs, _ = peft_adalora(base, ours)
    ids = token_batch(2, 8)
    ours_total = ours.model(input_ids=ids, labels=ids).loss + ours.extra_loss(0)
    assert torch.allclose(ours_total, theirs(input_ids=ids, labels=ids).loss, atol=1e-6)
    squared = variants.build(copy.deepcopy(base), {**ADA, "adalora_orth_squared": True})
    assert squared.extra_loss(0) > ours.extra_loss(0)  # A, B ~ N(0, 0.02²): ‖cov − I‖ ≈ sqrt(r) > 1


def _fp64_loss(model, ids):
    # transformers' own loss is computed in fp32 even for fp64 logits; keep everything fp64 here
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_adalora_budget_and_masks_follow_peft_step_by_step():
    """Same weights, data and AdamW: the budget, the masks and the weights agree at every step.

    (The orthogonality term is checked against PEFT separately; here it is off so that both
    sides compute the exact same fp64 loss.)"""
    base = tiny_llama(dtype=torch.float64)
    ours = variants.build(copy.deepcopy(base), {**ADA, "orth_reg_weight": 0.0})
    theirs, params = peft_adalora(base, ours)
    alloc = theirs.base_model.rankallocator
    # PEFT 0.21.2 leaves `ranknum` trainable after get_peft_model (its code means it to be the
    # constant init_r, as in the paper); freeze it so both sides train the same tensors.
    ranknums = [p for n, p in theirs.named_parameters() if "ranknum" in n]
    assert ranknums and all(p.requires_grad for p in ranknums)
    for p in ranknums:
        p.requires_grad_(False)
    opt_a = torch.optim.AdamW(ours.trainable_parameters(), lr=2e-2)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    init_bgt, target_bgt = ours.part("layer").budgets(ours)
    assert (init_bgt, target_bgt) == (alloc.init_bgt, alloc.target_bgt) == (6 * 6, 3 * 6)
    ids = token_batch(4, 16)
    for step in range(ADA["total_step"]):
        assert ours.extra_loss(step) is None
        _fp64_loss(ours.model, ids).backward()
        opt_a.step()
        ours.after_optimizer_step(step, opt_a)
        opt_a.zero_grad()
        _fp64_loss(theirs, ids).backward()
        opt_b.step()
        theirs.base_model.update_and_allocate(step)
        opt_b.zero_grad()
        assert ours.part("layer").budget_history[-1] == (step, alloc.budget_schedule(step)[0])
        for name, layer in ours.layers.items():
            peft_e = params[f"base_model.model.{name}.lora_E.default"]
            assert torch.equal(layer.lora_E != 0, peft_e != 0), (step, name)
            for key in ("lora_A", "lora_E", "lora_B"):
                diff = (getattr(layer, key) - params[f"base_model.model.{name}.{key}.default"]).abs().max().item()
                assert diff <= 1e-9, (step, name, key, diff)
    kept = ours.part("layer").kept_ranks(ours)
    assert sum(kept.values()) == target_bgt and len(set(kept.values())) > 1  # a real, uneven allocation


def test_training_loop_shrinks_the_budget_to_target():
    model = tiny_llama()
    adapted = variants.build(model, {**ADA, "tfinal": 2})
    ids = token_batch(4, 16)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    variants.train(adapted, batches, variants.TrainSettings(steps=ADA["total_step"], lr=2e-2))
    history = [b for _, b in adapted.part("layer").budget_history]
    assert len(history) == ADA["total_step"] and history[0] == 36 and history[-1] == 18
    assert all(x >= y for x, y in itertools.pairwise(history))
    summary = adapted.parts_summary()["layer"]
    assert summary["budget_final"] == 18 and sum(summary["rank_pattern"].values()) == 18
    assert all(int((layer.lora_E != 0).sum()) == summary["rank_pattern"][name]
               for name, layer in adapted.layers.items())


def test_adalora_rank_pattern_is_saved_with_the_adapter(tmp_path):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), ADA)
    ids = token_batch(4, 16)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    variants.train(adapted, batches, variants.TrainSettings(steps=ADA["total_step"], lr=2e-2))
    path = variants.save(adapted, tmp_path / "a")
    from safetensors.torch import load_file

    stored = load_file(str(path / "adapter.safetensors"))
    masks = {k: v for k, v in stored.items() if k.endswith(".rank_mask")}
    assert len(masks) == len(adapted.layers) and sum(int(v.sum()) for v in masks.values()) == 18
    loaded = variants.load(copy.deepcopy(base), path)
    assert loaded.part("layer").kept_ranks(loaded) == adapted.part("layer").kept_ranks(adapted)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted(ids).logits, atol=1e-6)


@pytest.mark.parametrize("values, fragment", [
    ({"preset": "adalora"}, "layer=adalora needs total_step"),
    ({"preset": "adalora", "total_step": 10, "r": 4, "target_r": 8}, "target_r (8) must be smaller than the initial rank r (4)"),
    ({"preset": "adalora", "total_step": 10, "tinit": 6, "tfinal": 4}, "tinit (6) must be smaller than total_step - tfinal"),
    ({"preset": "adalora", "total_step": 0}, "option 'total_step' must be >= 1, got 0"),
    ({"preset": "sora", "sora_xi": -0.1}, "option 'sora_xi' must be >= 0, got -0.1"),
    ({"preset": "adalora", "total_step": 10, "scaling": "rslora"}, "incompatible combination: layer=adalora with scaling=rslora"),
])
def test_bad_adaptive_specs(values, fragment):
    with pytest.raises(ValueError) as err:
        variants.AdapterSpec.from_dict(values)
    assert fragment in str(err.value)


# ----- SoRA ----------------------------------------------------------------------------------------
def test_sora_gate_has_its_own_proximal_step():
    model = tiny_llama()
    adapted = variants.build(model, {"preset": "sora", "r": 4, "sora_xi": 0.3, "sora_l1": 0.0,
                                     "target_modules": "q_proj"})
    opt = adapted.optimizer(lr=0.1)
    gates = [layer.gate for layer in adapted.layers.values()]
    assert not any(p is g for group in opt.param_groups for p in group["params"] for g in gates)
    ids = token_batch(2, 8)
    with torch.no_grad():
        for layer in adapted.layers.values():
            layer.lora_B.normal_()  # so the gates get a gradient
    model(input_ids=ids, labels=ids).loss.backward()
    layer = next(iter(adapted.layers.values()))
    g0, grad = layer.gate.detach().clone(), layer.gate.grad.clone()
    opt.step()
    adapted.after_optimizer_step(0, opt)
    # one AdamW step (bias-corrected: m̂ / sqrt(v̂) = sign(grad)), then soft-threshold by ξ
    stepped = g0 - 0.1 * grad / (grad.abs() + 1e-8)
    expected = torch.sign(stepped) * torch.clamp(stepped.abs() - 0.3, min=0)
    assert torch.allclose(layer.gate, expected, atol=1e-6)
    assert layer.gate.grad is None


def test_sora_prunes_into_a_plain_lora_with_the_same_outputs(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    adapted = variants.build(model, {"preset": "sora", "r": 8, "sora_xi": 0.05})
    ids = token_batch(4, 16)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    before = {}

    def grab(record):
        if record.step == 11:
            with torch.no_grad():
                before["logits"] = model(ids).logits.clone()
                before["nonzero"] = {n: int((l.gate != 0).sum()) for n, l in adapted.layers.items()}

    variants.train(adapted, batches, variants.TrainSettings(steps=12, lr=1e-2), on_step=grab)
    kept = adapted.parts_summary()["layer"]["kept_ranks"]
    assert kept == before["nonzero"] and sum(kept.values()) < 8 * len(kept)
    for name, layer in adapted.layers.items():
        assert layer.lora_A.shape[0] == layer.lora_B.shape[1] == kept[name] == layer.r
        assert torch.equal(layer.gate, torch.ones(kept[name]))
    with torch.no_grad():
        assert (model(ids).logits - before["logits"]).abs().max() <= 1e-5
    path = variants.save(adapted, tmp_path / "sora")
    reloaded = variants.load(copy.deepcopy(base), path)
    assert {n: l.r for n, l in reloaded.layers.items()} == kept
    with torch.no_grad():
        assert (reloaded(ids).logits - before["logits"]).abs().max() <= 1e-5
