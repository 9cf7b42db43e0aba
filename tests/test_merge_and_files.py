"""Merge/unmerge, adapter-only save/load, and export to PEFT's format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calibrate_if_needed, full_precision_presets, randomize_adapter, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file, save_file

import variants
from variants import io as vio

PRESET_ARGS = {
    "lora": {"r": 4, "alpha": 8},
    "rslora": {"r": 4, "alpha": 8},
    "dora": {"r": 4, "alpha": 8},
    "vera": {"r": 16},
    "lora_fa": {"r": 4, "alpha": 8},
    "lora_plus": {"r": 4, "alpha": 8},
    "delta_lora": {"r": 4, "alpha": 8},
    "qlora": {"r": 4, "alpha": 8},
    "loftq": {"r": 4, "alpha": 8},
    "adalora": {"r": 4, "alpha": 8, "target_r": 2, "total_step": 10},
    "sora": {"r": 4, "alpha": 8},
    "pissa": {"r": 4, "alpha": 8},
    "olora": {"r": 4, "alpha": 8},
    "eva": {"r": 4, "alpha": 8},
    "corda": {"r": 4, "alpha": 8},
    "lora_ga": {"r": 4, "alpha": 8},
}


def _adapted(name, model=None, seed=1):
    model = tiny_llama() if model is None else model
    adapted = variants.build(model, {"preset": name, **PRESET_ARGS[name]})
    calibrate_if_needed(adapted)
    randomize_adapter(adapted, seed=seed)
    return adapted


@pytest.mark.parametrize("name", full_precision_presets())
def test_merge_matches_forward_and_unmerge_restores_weights(name):
    adapted = _adapted(name)
    model = adapted.model
    ids = token_batch(4, 32)
    originals = {n: layer.base_weight().detach().clone() for n, layer in adapted.layers.items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        adapted.merge()
        assert adapted.merged
        merged = model(ids).logits
        assert (merged - unmerged).abs().max().item() <= 1e-5
        # the merged weight really is different (the comparison above is not vacuous)
        assert any(not torch.equal(layer.base_weight(), originals[n]) for n, layer in adapted.layers.items())
        adapted.unmerge()
        for n, layer in adapted.layers.items():
            w = layer.base_weight()
            rel = ((w - originals[n]).norm() / originals[n].norm()).item()
            assert rel <= 1e-6, f"{n}: relative round-trip error {rel}"
        assert torch.allclose(model(ids).logits, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_merge_gives_w0_plus_delta_as_new_storage_of_the_same_parameter(model_fn, tmp_path):
    """A base loaded from safetensors is a private mapping of the file; the merge hands each weight
    new memory (no write into the mapping) and keeps the Parameter, its layout and W0 + ΔW exactly."""
    model = model_fn()
    # every linear/Conv1D weight from the file (the tied output head stays as it is)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "w.safetensors")
    model.load_state_dict(load_file(tmp_path / "w.safetensors"), assign=True, strict=False)
    adapted = variants.build(model, {"preset": "lora", "r": 4})
    randomize_adapter(adapted)
    layers = adapted.layers.values()
    params = {id(layer): layer.base_layer.weight for layer in layers}
    expected = {id(layer): layer.base_weight() + layer.delta_weight() for layer in layers}
    before = {id(layer): layer.base_layer.weight.data_ptr() for layer in layers}
    strides = {id(layer): layer.base_layer.weight.stride() for layer in layers}
    adapted.merge()
    for layer in layers:
        weight = layer.base_layer.weight
        assert weight is params[id(layer)] and weight.stride() == strides[id(layer)]
        assert weight.data_ptr() != before[id(layer)]
        assert torch.equal(layer.base_weight(), expected[id(layer)])
    # the file still holds W0
    on_disk = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(on_disk[k], v) for k, v in model_fn().state_dict().items() if k in on_disk)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    adapted = _adapted("vera")
    ids = token_batch(2, 8)
    with torch.no_grad():
        expected = adapted.model(ids).logits
        plain = adapted.merge_and_unload()
        got = plain(ids).logits
    assert not any(isinstance(m, variants.AdapterLayer) for m in plain.modules())
    assert not hasattr(plain, "vera_projections")
    assert (got - expected).abs().max().item() <= 1e-5


def test_gpt2_merge_round_trip():
    adapted = variants.build(tiny_gpt2(), {"preset": "dora", "r": 4})
    randomize_adapter(adapted)
    ids = token_batch(2, 8)
    with torch.no_grad():
        before = adapted.model(ids).logits
        adapted.merge()
        after = adapted.model(ids).logits
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", variants.names())
def test_save_then_load_on_a_fresh_base_reproduces_the_logits(name, tmp_path):
    base = tiny_llama()
    adapted = _adapted(name, copy.deepcopy(base))
    if name == "delta_lora":  # let the W update happen so the saved reference factors matter
        ids = token_batch()
        opt = adapted.optimizer(1e-2)
        for step in range(3):
            adapted.model(input_ids=ids, labels=ids).loss.backward()
            adapted.before_optimizer_step(step, opt)
            opt.step()
            adapted.after_optimizer_step(step, opt)
            opt.zero_grad()
    ids = token_batch(2, 8)
    with torch.no_grad():
        expected = adapted.model(ids).logits
    path = variants.save(adapted, tmp_path / "adapter", metadata={"note": "test"})
    files = sorted(p.name for p in path.iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    stored = load_file(str(path / "adapter.safetensors"))
    base_keys = set(base.state_dict())
    assert not any(k in base_keys for k in stored), "base weights must not be saved with the adapter"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["spec"]["preset"] == name and config["metadata"] == {"note": "test"}
    reloaded = variants.load(copy.deepcopy(base), path)
    with torch.no_grad():
        got = reloaded.model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert variants.file_bytes(path) == (path / "adapter.safetensors").stat().st_size


def test_vera_without_saved_projection_regenerates_them(tmp_path):
    base = tiny_llama()
    adapted = variants.build(copy.deepcopy(base), {"preset": "vera", "r": 16, "save_projection": False})
    randomize_adapter(adapted)
    path = variants.save(adapted, tmp_path / "a")
    assert not any(k.startswith("@shared") for k in load_file(str(path / "adapter.safetensors")))
    with_projection = variants.save(variants.build(copy.deepcopy(base), {"preset": "vera", "r": 16}), tmp_path / "b")
    assert vio.file_bytes(path) < vio.file_bytes(with_projection)
    ids = token_batch()
    with torch.no_grad():
        assert torch.allclose(variants.load(copy.deepcopy(base), path)(ids).logits, adapted(ids).logits, atol=1e-6)


def test_loading_onto_a_different_model_fails_clearly(tmp_path):
    adapted = _adapted("lora")
    path = variants.save(adapted, tmp_path / "a")
    other = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(ValueError, match="has shape"):
        variants.load(other, path)


def test_save_is_atomic_and_keeps_the_previous_adapter_on_failure(tmp_path, monkeypatch):
    adapted = _adapted("lora")
    path = variants.save(adapted, tmp_path / "adapter")
    before = (path / "adapter.safetensors").read_bytes()
    randomize_adapter(adapted, seed=7)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        variants.save(adapted, path)
    assert (path / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "vera", "lora_fa", "lora_plus"])
def test_peft_export_loads_in_peft_with_the_same_logits(name, tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    adapted = _adapted(name, copy.deepcopy(base))
    ids = token_batch(2, 8)
    with torch.no_grad():
        expected = adapted.model(ids).logits
    folder = variants.export_peft(adapted, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    with torch.no_grad():
        got = peft_model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert not torch.equal(got, base(ids).logits), "the adapter must change the output for this test to mean anything"


def test_gpt2_peft_export_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_gpt2()
    adapted = variants.build(copy.deepcopy(base), {"preset": "lora", "r": 4})
    randomize_adapter(adapted)
    ids = token_batch(2, 8)
    folder = variants.export_peft(adapted, tmp_path / "peft")
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))(ids).logits
        assert (got - adapted(ids).logits).abs().max().item() <= 1e-5


def test_delta_lora_export_to_peft_is_refused(tmp_path):
    adapted = _adapted("delta_lora")
    with pytest.raises(ValueError, match="step=delta_lora"):
        variants.export_peft(adapted, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
