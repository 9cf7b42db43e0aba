"""The initialisation family (docs/init-family.md): PiSSA and OLoRA against PEFT 0.21.2, and the
init slot's infrastructure (base rewriting, calibration, save/load, export, refusals).

Parity runs in fp32 in this process (PEFT computes every init in fp32), with identical inputs:
A, B, the residual base and DoRA's magnitude within 1e-6. PEFT's randomized SVD draws from the
global RNG; the test patches it with the per-layer seeding our part uses (seed + layer index).
"""

from __future__ import annotations

import copy
import json
from typing import ClassVar

import pytest
import torch
from conftest import randomize_adapter, tiny_gpt2, tiny_llama, token_batch

import variants
from variants import parts as parts_mod
from variants.init_base import DataInit, RewritingInit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-6
LAYERS = {"lora": {}, "dora": {"layer": "dora"}, "rslora": {"scaling": "rslora"}}


def spec(init: str, layer: str = "lora", r: int = 4, alpha: float = 8.0, **options) -> dict:
    return {"init": init, **LAYERS[layer], "r": r, "alpha": alpha, "target_modules": TARGETS, **options}


def peft_model(base, init: str, layer: str = "lora", r: int = 4, alpha: float = 8.0, targets=TARGETS):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=init,
                     use_dora=layer == "dora", use_rslora=layer == "rslora")
    return get_peft_model(copy.deepcopy(base), cfg)


def seeded_svd_lowrank(seed: int):
    """PEFT's svd_lowrank, seeded per call as our part seeds per layer (seed + index, target order)."""
    calls = iter(range(10_000))

    def wrapper(a, q=6, niter=2, M=None):
        torch.manual_seed(seed + next(calls))
        return torch.svd_lowrank(a, q=q, niter=niter, M=M)

    return wrapper


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model) -> None:
    after = model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ----- 1. parity with PEFT ------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["lora", "dora", "rslora"])
@pytest.mark.parametrize("init, niter", [("pissa", 0), ("pissa", 4), ("olora", 0)])
def test_init_equals_peft(init, niter, layer, monkeypatch):
    base = tiny_llama()
    if niter:
        import peft.tuners.lora.layer as peft_layer

        monkeypatch.setattr(peft_layer, "svd_lowrank", seeded_svd_lowrank(3))
    theirs = peft_model(base, init if not niter else f"pissa_niter_{niter}", layer)
    options = {"pissa_niter": niter, "pissa_seed": 3} if init == "pissa" else {}
    ours = variants.build(copy.deepcopy(base), spec(init, layer, **options))
    params = dict(theirs.named_parameters())
    for name, ly in ours.layers.items():
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(ly.lora_A, params[f"{prefix}.lora_A.default.weight"], atol=TOL, rtol=0)
        torch.testing.assert_close(ly.lora_B, params[f"{prefix}.lora_B.default.weight"], atol=TOL, rtol=0)
        torch.testing.assert_close(ly.base_layer.weight, params[f"{prefix}.base_layer.weight"], atol=TOL, rtol=0)
        if layer == "dora":
            torch.testing.assert_close(ly.magnitude, params[f"{prefix}.lora_magnitude_vector.default.weight"],
                                       atol=TOL, rtol=0)
        assert ly.scale == theirs.base_model.model.get_submodule(name).scaling["default"]
    ids = token_batch()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)


def test_pissa_niter_draws_leave_the_global_rng_where_lora_leaves_it():
    torch.manual_seed(5)
    variants.build(tiny_llama(), spec("default"))
    after_lora = torch.random.get_rng_state()
    torch.manual_seed(5)
    variants.build(tiny_llama(), spec("pissa", pissa_niter=2))
    assert torch.equal(torch.random.get_rng_state(), after_lora)


# ----- 2 and 9. step-0 output equals the base (Linear and GPT-2's Conv1D) ---------------------------
@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("layer", ["lora", "dora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapted_model_equals_the_base_at_step_0(init, layer, model_fn):
    base = model_fn()
    ids = token_batch()
    expected = logits(base, ids)
    adapted = variants.build(copy.deepcopy(base), {"init": init, **LAYERS[layer], "r": 4, "alpha": 16})
    for ly in adapted.layers.values():
        assert ly.lora_B.abs().max() > 0.01  # the adapter really starts at W0's principal part
    torch.testing.assert_close(logits(adapted, ids), expected, atol=1e-5, rtol=0)


def test_olora_on_conv1d_factorises_the_out_in_weight():
    # PEFT's OLoRA factorises Conv1D's stored (in, out) weight and its forward fails; ours uses (out, in).
    base = tiny_gpt2()
    adapted = variants.build(copy.deepcopy(base), {"init": "olora", "r": 4, "alpha": 8})
    originals = dict(base.named_modules())
    for name, ly in adapted.layers.items():
        assert ly.fan_in_fan_out
        assert tuple(ly.lora_B.shape) == (ly.out_features, 4)
        eye = ly.lora_B.t() @ ly.lora_B  # orthonormal columns
        torch.testing.assert_close(eye, torch.eye(4), atol=1e-5, rtol=0)
        w0 = originals[name].weight.t()
        torch.testing.assert_close(ly.base_weight() + ly.scale * ly.lora_B @ ly.lora_A, w0, atol=1e-5, rtol=0)


# ----- 3. PEFT export: a plain LoRA of rank 2r on the ORIGINAL base -----------------------------------
@pytest.mark.parametrize("init, layer", [("pissa", "lora"), ("olora", "lora"), ("pissa", "dora"),
                                         ("olora", "rslora")])
def test_export_loads_in_peft_on_the_original_base(init, layer, tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), spec(init, layer))
    randomize_adapter(adapted, seed=2)  # stands in for training: A, B (and m) move away from the init
    ids = token_batch()
    ours = logits(adapted, ids)
    variants.export_peft(adapted, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(16.0 if layer != "rslora" else 8.0 * 2 ** 0.5)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, ids), ours, atol=1e-5, rtol=0)
    if layer == "dora":  # the trained magnitude is kept (PEFT's own conversion drops it)
        name = next(iter(adapted.layers))
        mag = dict(loaded.named_parameters())[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        assert torch.equal(mag, adapted.layers[name].magnitude)


def test_export_equals_peft_own_conversion(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), spec("pissa"))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path / "init")  # PEFT's recipe: save the initial adapter first
    randomize_adapter(adapted, seed=4)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, ly in adapted.layers.items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(ly.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(ly.lora_B)
    theirs.peft_config["default"].init_lora_weights = True  # as PEFT's docs: convert with a plain-init config
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=tmp_path / "init")
    variants.export_peft(adapted, tmp_path / "ours")
    t_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    t_theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(t_ours) == set(t_theirs)
    for key in t_ours:
        torch.testing.assert_close(t_ours[key], t_theirs[key], atol=TOL, rtol=0)
    c_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    c_theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert (c_ours["r"], c_ours["lora_alpha"]) == (c_theirs["r"], c_theirs["lora_alpha"])


# ----- 4. our save/load: no SVD at load, the residual bitwise ----------------------------------------
@pytest.mark.parametrize("init, layer", [("pissa", "dora"), ("olora", "lora")])
def test_save_load_rebuilds_the_residual_without_svd(init, layer, tmp_path, monkeypatch):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), spec(init, layer, pissa_niter=2) if init == "pissa"
                             else spec(init, layer))
    randomize_adapter(adapted, seed=3)
    ids = token_batch()
    expected = logits(adapted, ids)
    variants.save(adapted, tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("load must not factorise W0")

    for fn in ("svd", "qr"):
        monkeypatch.setattr(torch.linalg, fn, refuse)
    monkeypatch.setattr(torch, "svd_lowrank", refuse)
    loaded = variants.load(copy.deepcopy(base), tmp_path / "a")
    for name, ly in loaded.layers.items():
        assert torch.equal(ly.base_layer.weight, adapted.layers[name].base_layer.weight), name
    assert torch.equal(logits(loaded, ids), expected)


# ----- 5. unload, merge, unmerge, merge_and_unload ---------------------------------------------------
@pytest.mark.parametrize("layer", ["lora", "dora"])
def test_unload_merge_and_unmerge_keep_their_meaning(layer):
    base = tiny_llama()
    ids = token_batch()
    adapted = variants.build(copy.deepcopy(base), spec("pissa", layer))
    randomize_adapter(adapted, seed=5)
    trained = logits(adapted, ids)
    residuals = {n: ly.base_layer.weight.clone() for n, ly in adapted.layers.items()}
    adapted.merge()
    torch.testing.assert_close(logits(adapted, ids), trained, atol=1e-5, rtol=0)
    adapted.unmerge()
    for name, ly in adapted.layers.items():
        torch.testing.assert_close(ly.base_layer.weight, residuals[name], atol=1e-6, rtol=0)
    merged = variants.build(copy.deepcopy(base), spec("pissa", layer))
    merged.load_adapter_state_dict(adapted.adapter_state_dict())
    torch.testing.assert_close(logits(merged.merge_and_unload(), ids), trained, atol=1e-5, rtol=0)
    originals = dict(base.named_modules())
    model = adapted.unload()
    for name in residuals:
        w0 = originals[name].weight
        restored = model.get_submodule(name).weight
        ulp = torch.finfo(torch.float32).eps * w0.abs().max()
        assert (restored - w0).abs().max() <= 4 * ulp, name  # W_res + s·B0A0 ≈ W0 within rounding
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


# ----- 6. refusals: a ValueError naming the value, the model unchanged -------------------------------
def test_rank_above_a_layers_rank_is_refused_before_any_change():
    base = tiny_llama()
    before = weights(base)
    with pytest.raises(ValueError, match=r"r=20 .*k_proj of shape \(out=16, in=32\)"):
        variants.build(base, spec("pissa", r=20))
    assert_same_state(before, base)
    assert not any(isinstance(m, variants.core.AdapterLayer) for m in base.modules())


@pytest.mark.parametrize("changes, named", [
    ({"base": "nf4"}, r"init=(pissa|olora) with base=nf4"),
    ({"layer": "vera"}, r"init=(pissa|olora) with layer=vera"),
    ({"layer": "sora"}, r"init=(pissa|olora) with layer=sora"),
    ({"layer": "adalora", "target_r": 2, "total_step": 10}, r"init=(pissa|olora) with layer=adalora"),
])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unsound_combinations_name_both_parts(init, changes, named):
    with pytest.raises(ValueError, match=named):
        variants.AdapterSpec.from_dict({"init": init, **changes})


@pytest.mark.parametrize("layer", ["lora", "dora"])
def test_a_failure_while_writing_the_base_restores_it_bitwise(layer, monkeypatch):
    base = tiny_llama()
    before = weights(base)
    original = variants.core.AdapterLayer.write_base_weight
    calls = iter(range(100))

    def flaky(self, w):
        if next(calls) == 5:  # five residuals written, then an error
            raise RuntimeError("injected")
        original(self, w)

    monkeypatch.setattr(variants.core.AdapterLayer, "write_base_weight", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        variants.build(base, spec("olora", layer))
    assert_same_state(before, base)
    assert all(p.requires_grad for p in base.parameters())  # build's rollback: the flags as they were


def test_a_failure_after_the_rewrite_is_undone_by_build(monkeypatch):
    base = tiny_llama()
    before = weights(base)

    def boom(self):
        raise RuntimeError("refresh failed")

    monkeypatch.setattr(variants.core.AdapterLayer, "refresh_after_init", boom)
    with pytest.raises(RuntimeError, match="refresh failed"):
        variants.build(base, spec("pissa"))
    assert_same_state(before, base)


# ----- 7. the calibration hook, with a minimal data-aware part (registered for this module only) --------
class ToyDataInit(DataInit, RewritingInit):
    """A: the per-feature mean input of the layer's first rows, B: a fixed random draw: enough to
    see which inputs, RNG and modes a calibration touches."""

    name = "toy_data_init"
    seen: ClassVar[list] = []

    def compute_factors(self, adapted, batches, loss_fn):
        inputs: dict[str, list[torch.Tensor]] = {}
        for name, ly in adapted.layers.items():
            self.scope.forward_pre_hook(ly, lambda m, args, n=name: inputs.setdefault(n, []).append(args[0].detach()))
        adapted.model.train()  # a part may switch modes and flags: the scope restores them
        for ly in adapted.layers.values():
            ly.base_layer.weight.requires_grad_(True)
        loss = None
        for batch in batches:
            loss = loss_fn(adapted.model, batch)
        loss.backward()
        torch.rand(1000)  # a draw from the global RNG: forked away
        ToyDataInit.seen = [b["input_ids"] for b in batches]
        out = {}
        for name, ly in adapted.layers.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
            a = x[: ly.r] * 0.5
            b = torch.randn(ly.out_features, ly.r, generator=torch.Generator().manual_seed(1)) * 0.1
            out[name] = (a, b)
        self.inputs = inputs
        return out


@pytest.fixture
def toy_init():
    parts_mod.register(ToyDataInit)
    yield ToyDataInit
    del parts_mod._REGISTRY["init"][ToyDataInit.name]


def lm_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = token_batch(2, 8, seed=seed + i)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def test_calibration_needs_enough_batches_and_runs_once(toy_init):
    base = tiny_llama()
    adapted = variants.build(base, spec("toy_data_init", init_batches=3))
    assert adapted.calibration_batches() == 3 and adapted.needs_calibration
    before = weights(base)
    with pytest.raises(ValueError, match=r"init_batches=3 .*got 2"):
        adapted.calibrate(lm_batches(2))
    assert_same_state(before, base)
    with pytest.raises(ValueError, match=r"call adapted.calibrate\(batches\) first"):
        variants.train(adapted, lm_batches(2), variants.TrainSettings(steps=1, lr=1e-3))
    info = adapted.calibrate(lm_batches(5))
    assert info["batches"] == 3 and info["forwards"] == 3 and info["seconds"] > 0
    assert [torch.equal(a, b["input_ids"]) for a, b in zip(ToyDataInit.seen, lm_batches(3))] == [True] * 3
    assert not adapted.needs_calibration
    with pytest.raises(ValueError, match="already calibrated"):
        adapted.calibrate(lm_batches(3))


def test_calibration_leaves_rng_modes_flags_and_hooks_as_they_were(toy_init):
    base = tiny_llama()
    ids = token_batch()
    expected = logits(base, ids)
    adapted = variants.build(copy.deepcopy(base), spec("toy_data_init", init_batches=2))
    adapted.model.eval()
    flags = {n: p.requires_grad for n, p in adapted.model.named_parameters()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._backward_hooks) for m in adapted.model.modules())
    torch.manual_seed(7)
    adapted.calibrate(lm_batches(2))
    after = torch.random.get_rng_state()
    torch.manual_seed(7)
    assert torch.equal(after, torch.random.get_rng_state())
    assert not any(m.training for m in adapted.model.modules())
    assert {n: p.requires_grad for n, p in adapted.model.named_parameters()} == flags
    assert all(p.grad is None for p in adapted.model.parameters())
    assert sum(len(m._forward_pre_hooks) + len(m._backward_hooks) for m in adapted.model.modules()) == hooks
    assert not any(ly.bypassed for ly in adapted.layers.values())
    # the hooked inputs are the base model's (adapters bypassed): layer 0's q_proj input is the embedding's norm
    first = next(iter(adapted.layers))
    assert adapted.part("init").inputs[first][0].shape[-1] == 32
    torch.testing.assert_close(logits(adapted, ids), expected, atol=1e-5, rtol=0)  # rewriting: function kept


def test_a_calibrated_adapter_loads_without_data_and_resumes_only_with_the_same_factors(toy_init, tmp_path):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), spec("toy_data_init", init_batches=2))
    adapted.calibrate(lm_batches(2))
    randomize_adapter(adapted, seed=6)
    ids = token_batch()
    variants.save(adapted, tmp_path / "a")
    loaded = variants.load(copy.deepcopy(base), tmp_path / "a")
    assert not loaded.needs_calibration
    assert torch.equal(logits(loaded, ids), logits(adapted, ids))
    state = adapted.hooks_state_dict()
    again = variants.build(copy.deepcopy(base), spec("toy_data_init", init_batches=2))
    again.calibrate(lm_batches(2))
    again.load_hooks_state_dict(state)  # the same calibration: accepted
    other = variants.build(copy.deepcopy(base), spec("toy_data_init", init_batches=2))
    other.calibrate(lm_batches(2, seed=50))
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        other.load_hooks_state_dict(state)


def test_data_free_inits_refuse_calibration():
    adapted = variants.build(tiny_llama(), spec("pissa"))
    assert adapted.calibration_batches() == 0 and not adapted.needs_calibration
    with pytest.raises(ValueError, match="init=pissa is data-free"):
        adapted.calibrate(lm_batches(1))


# ----- 10. the report names the family and its init time ----------------------------------------------
def test_compare_notes_name_the_init_family_with_its_init_seconds():
    from types import SimpleNamespace

    from pipeline.compare import init_family_context

    specs = {n: variants.AdapterSpec.from_dict({"preset": p}) for n, p in
             [("lora", "lora"), ("pissa", "pissa"), ("olora", "olora")]}
    methods = {"pissa": SimpleNamespace(summaries=[{"init_seconds": 2.0}, {"init_seconds": 4.0}]),
               "olora": SimpleNamespace(summaries=[{}])}  # a summary written before init_seconds existed
    assert init_family_context(specs, methods) == [{"name": "pissa", "init": "pissa", "seconds": 3.0},
                                                   {"name": "olora", "init": "olora", "seconds": None}]
    assert init_family_context({"lora": specs["lora"]}, methods) == []
