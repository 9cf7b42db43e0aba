"""PEFT interop both ways: `load_peft` reads adapters PEFT saved, `export_peft` writes AdaLoRA and
SoRA (as LoRA with per-layer ranks) too. PEFT is the oracle: logits must equal PeftModel's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomize_adapter, tiny_gpt2, tiny_llama, token_batch

import variants
from variants.core import AdapterLayer

ATOL = 1e-6  # float32, tiny models


def _randomize_peft(peft_model, seed: int = 3, scale: float = 0.05) -> None:
    """Non-zero values in every adapter tensor (B, λ_b, E start at zero), as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale
            p.mul_(1 + noise) if "magnitude" in name else p.add_(noise)


def _peft_logits(base, folder, ids):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder))(ids).logits


def _logits(adapted, ids):
    with torch.no_grad():
        return adapted(ids).logits


def _assert_same(got, expected, base, ids):
    assert (got - expected).abs().max().item() <= ATOL
    with torch.no_grad():
        assert not torch.allclose(expected, base(ids).logits, atol=1e-3), "the adapter must change the output"


def _trained_peft_adalora(base):
    """A PEFT AdaLoRA adapter after its real allocator pruned it (uneven masks in rank_pattern)."""
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=2, deltaT=1, total_step=6, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])
    model = get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = token_batch(4, 16)
    for step in range(cfg.total_step):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def _peft_model(kind, base):
    from peft import LoraConfig, VeraConfig, get_peft_model

    if kind == "adalora":
        return _trained_peft_adalora(base)
    configs = {
        "lora": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
        "lora_patterns": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                    rank_pattern={"v_proj": 2, "model.layers.1.self_attn.o_proj": 6},
                                    alpha_pattern={"k_proj": 3}),
        "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                             rank_pattern={"q_proj": 2}),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
        "vera": VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "vera_no_projection": VeraConfig(r=16, target_modules=["q_proj", "v_proj"], save_projection=False),
        "layers_to_transform": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    }
    model = get_peft_model(copy.deepcopy(base), configs[kind])
    _randomize_peft(model)
    return model


@pytest.mark.parametrize("kind", ["lora", "lora_patterns", "rslora", "dora", "vera", "vera_no_projection",
                                  "adalora", "layers_to_transform"])
def test_load_peft_gives_peft_models_logits(kind, tmp_path):
    base = tiny_llama()
    _peft_model(kind, base).save_pretrained(str(tmp_path / "peft"))
    ids = token_batch(2, 8)
    expected = _peft_logits(base, tmp_path / "peft", ids)
    adapted = variants.load_peft(copy.deepcopy(base), tmp_path / "peft")
    _assert_same(_logits(adapted, ids), expected, base, ids)


def test_load_peft_reads_the_layers_the_file_holds_with_their_ranks(tmp_path):
    base = tiny_llama()
    _peft_model("lora_patterns", base).save_pretrained(str(tmp_path / "p"))
    adapted = variants.load_peft(copy.deepcopy(base), tmp_path / "p")
    assert adapted.spec.layer == "lora" and adapted.spec.r == 4 and adapted.spec.alpha == 8
    assert adapted.layers["model.layers.0.self_attn.v_proj"].r == 2
    assert adapted.layers["model.layers.1.self_attn.o_proj"].r == 6
    assert adapted.layers["model.layers.0.self_attn.o_proj"].r == 4
    _peft_model("layers_to_transform", base).save_pretrained(str(tmp_path / "l"))
    only_second = variants.load_peft(copy.deepcopy(base), tmp_path / "l")
    assert sorted(only_second.layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_load_peft_restores_adalora_rank_masks(tmp_path):
    base = tiny_llama()
    peft_model = _trained_peft_adalora(base)
    peft_model.save_pretrained(str(tmp_path / "a"))
    masks = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
    adapted = variants.load_peft(copy.deepcopy(base), tmp_path / "a")
    kept = adapted.part("layer").kept_ranks(adapted)
    assert kept == {key.removesuffix(".lora_E"): sum(mask) for key, mask in masks.items()}
    assert len(set(kept.values())) > 1, "the allocator should have pruned unevenly for this test to mean much"
    assert all(layer.r == 6 for layer in adapted.layers.values())  # ranknum stays init_r, as in PEFT


@pytest.mark.parametrize("kind", ["lora", "vera"])
def test_load_peft_on_gpt2_conv1d(kind, tmp_path):
    from peft import LoraConfig, VeraConfig, get_peft_model

    base = tiny_gpt2()
    cfg = (LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True) if kind == "lora"
           else VeraConfig(r=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    _randomize_peft(peft_model)
    peft_model.save_pretrained(str(tmp_path / "g"))
    ids = token_batch(2, 8)
    adapted = variants.load_peft(copy.deepcopy(base), tmp_path / "g")
    _assert_same(_logits(adapted, ids), _peft_logits(base, tmp_path / "g", ids), base, ids)


# ----- export: AdaLoRA and SoRA ---------------------------------------------------------------------
def _trained_adalora(base):
    adapted = variants.build(base, {"preset": "adalora", "r": 6, "alpha": 8, "target_r": 2, "tinit": 1,
                                    "tfinal": 2, "total_step": 8, "target_modules": "q_proj,v_proj,down_proj"})
    ids = token_batch(4, 16)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    variants.train(adapted, batches, variants.TrainSettings(steps=8, lr=2e-2))
    return adapted


def test_adalora_exports_to_peft_with_its_rank_masks(tmp_path):
    base = tiny_llama()
    adapted = _trained_adalora(copy.deepcopy(base))
    kept = adapted.part("layer").kept_ranks(adapted)
    assert len(set(kept.values())) > 1
    folder = variants.export_peft(adapted, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["target_r"] == 2
    assert {k.removesuffix(".lora_E"): sum(m) for k, m in config["rank_pattern"].items()} == kept
    ids = token_batch(2, 8)
    _assert_same(_peft_logits(base, folder, ids), _logits(adapted, ids), base, ids)


def test_adalora_without_a_fixed_mask_exports_full_tensors(tmp_path):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), {"preset": "adalora", "r": 4, "target_r": 2, "total_step": 10})
    randomize_adapter(adapted)
    folder = variants.export_peft(adapted, tmp_path / "peft")
    assert json.loads((folder / "adapter_config.json").read_text())["rank_pattern"] is None
    ids = token_batch(2, 8)
    _assert_same(_peft_logits(base, folder, ids), _logits(adapted, ids), base, ids)


def _sora(base, scaling="standard", prune=True):
    adapted = variants.build(base, {"preset": "sora", "r": 6, "alpha": 12, "scaling": scaling,
                                    "target_modules": "q_proj,v_proj,up_proj"})
    randomize_adapter(adapted, seed=5)
    names = list(adapted.layers)
    with torch.no_grad():  # gates closed unevenly, one layer entirely
        for i, name in enumerate(names):
            gate = adapted.layers[name].gate
            gate[: i % gate.numel()] = 0.0
        adapted.layers[names[-1]].gate.zero_()
    if prune:
        adapted.finalize()
    return adapted


@pytest.mark.parametrize("scaling,prune", [("standard", True), ("rslora", True), ("standard", False)])
def test_sora_exports_as_lora_with_its_kept_ranks(scaling, prune, tmp_path):
    base = tiny_llama()
    adapted = _sora(copy.deepcopy(base), scaling, prune)
    ids = token_batch(2, 8)
    folder = variants.export_peft(adapted, tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    names = list(adapted.layers)
    assert config["peft_type"] == "LORA" and config["use_rslora"] == (scaling == "rslora") and config["r"] == 6
    assert names[-1] not in config["target_modules"], "a layer pruned to rank 0 adds nothing and is left out"
    assert config["rank_pattern"] and set(config["rank_pattern"]) == set(config["alpha_pattern"])
    _assert_same(_peft_logits(base, folder, ids), _logits(adapted, ids), base, ids)


# ----- round trip: export_peft, then load_peft ---------------------------------------------------------
@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "vera", "adalora", "sora"])
def test_export_then_load_peft_round_trip(name, tmp_path):
    base = tiny_llama()
    if name == "adalora":
        adapted = _trained_adalora(copy.deepcopy(base))
    elif name == "sora":
        adapted = _sora(copy.deepcopy(base))
    else:
        adapted = variants.build(copy.deepcopy(base), {"preset": name, "r": 16 if name == "vera" else 4})
        randomize_adapter(adapted)
    ids = token_batch(2, 8)
    folder = variants.export_peft(adapted, tmp_path / "peft")
    loaded = variants.load_peft(copy.deepcopy(base), folder)
    _assert_same(_logits(loaded, ids), _logits(adapted, ids), base, ids)
    if name == "adalora":
        assert loaded.part("layer").kept_ranks(loaded) == adapted.part("layer").kept_ranks(adapted)


def test_an_imported_adapter_saves_and_loads_in_our_format(tmp_path):
    base = tiny_llama()
    _peft_model("lora_patterns", base).save_pretrained(str(tmp_path / "p"))
    imported = variants.load_peft(copy.deepcopy(base), tmp_path / "p")
    reloaded = variants.load(copy.deepcopy(base), variants.save(imported, tmp_path / "ours"))
    reloaded.model.eval()
    ids = token_batch(2, 8)
    _assert_same(_logits(reloaded, ids), _logits(imported, ids), base, ids)


# ----- what load_peft refuses, before touching the model ----------------------------------------------
def _untouched(model) -> bool:
    return (not any(isinstance(m, AdapterLayer) for m in model.modules())
            and all(p.requires_grad for p in model.parameters()))


def _fresh_base():
    base = tiny_llama()
    for p in base.parameters():
        p.requires_grad_(True)
    return base


@pytest.mark.parametrize("kind", ["IA3", "LOHA"])
def test_unknown_peft_type_is_refused_by_name(kind, tmp_path):
    from peft import IA3Config, LoHaConfig, get_peft_model

    cfg = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]) if kind == "IA3" \
        else LoHaConfig(r=4, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), cfg).save_pretrained(str(tmp_path / "x"))
    model = _fresh_base()
    with pytest.raises(ValueError, match=f"PEFT adapter type '{kind}' cannot be read"):
        variants.load_peft(model, tmp_path / "x")
    assert _untouched(model)


def _edited_lora(tmp_path, **config_changes):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "edited"
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(folder))
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


@pytest.mark.parametrize("option,value", [("bias", "all"), ("modules_to_save", ["lm_head"]),
                                          ("init_lora_weights", "pissa"), ("layer_replication", [[0, 2]]),
                                          ("alora_invocation_tokens", [5, 6])])
def test_unsupported_lora_options_are_refused_by_name(option, value, tmp_path):
    folder = _edited_lora(tmp_path, **{option: value})
    model = _fresh_base()
    with pytest.raises(ValueError, match=f"PEFT option {option}={value!r}".replace("[", r"\[")):
        variants.load_peft(model, folder)
    assert _untouched(model)


def test_lora_on_embeddings_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    peft_model.save_pretrained(str(tmp_path / "e"))
    model = _fresh_base()
    with pytest.raises(ValueError, match="lora_embedding_A.*LoRA on an embedding layer"):
        variants.load_peft(model, tmp_path / "e")
    assert _untouched(model)


def test_pickled_adapter_is_refused_without_unpickling(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "b"), safe_serialization=False)
    assert (tmp_path / "b" / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match="adapter_model.bin is a pickle, which load_peft never unpickles"):
        variants.load_peft(_fresh_base(), tmp_path / "b")


def test_adapter_of_another_model_is_refused_before_any_change(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(hidden_size=48, intermediate_size=64),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp_path / "o"))
    model = _fresh_base()
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 48\), this model and config need \(4, 32\)"):
        variants.load_peft(model, tmp_path / "o")
    assert _untouched(model)
