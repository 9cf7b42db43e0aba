"""Shared fixtures: tiny random models (seeded) and helpers that mirror our adapters in PEFT.

PEFT is the oracle here and only here: it is imported by tests, never by the library.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The stages this session's tests start (through pipeline/run.py) use warm servers of their own,
# stopped when the session ends, never the user's.
os.environ["LORA_WARM_DIR"] = tempfile.mkdtemp(prefix="lora-warm-")
os.environ.setdefault("LORA_WARM_IDLE", "60")


@pytest.fixture(scope="session", autouse=True)
def _stop_warm_servers():
    yield
    from pipeline.run import stop_servers

    folder = Path(os.environ["LORA_WARM_DIR"])
    stop_servers(folder)
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.eval()
    return model


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(dtype)
    model.eval()
    return model


@pytest.fixture
def llama():
    return tiny_llama()


def peft_config_for(spec, fan_in_fan_out: bool = False):
    """The PEFT config equivalent to one of our specs (LoRA family or VeRA)."""
    from peft import LoraConfig, VeraConfig

    targets = list(spec.target_modules) if spec.target_modules != ("all-linear",) else "all-linear"
    if spec.layer == "vera":
        return VeraConfig(r=spec.r, target_modules=targets, vera_dropout=spec.dropout,
                          d_initial=spec.options["d_initial"], projection_prng_key=spec.options["projection_prng_key"],
                          fan_in_fan_out=fan_in_fan_out)
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      use_rslora=spec.scaling == "rslora", use_dora=spec.layer == "dora", fan_in_fan_out=fan_in_fan_out)


PEFT_PARAM = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "magnitude": "lora_magnitude_vector.default.weight",
    "lambda_b": "vera_lambda_b.default",
    "lambda_d": "vera_lambda_d.default",
}


def peft_twin(adapted, base_model, fan_in_fan_out: bool = False):
    """A PEFT model on a copy of `base_model` with exactly our adapter's tensors."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_model), peft_config_for(adapted.spec, fan_in_fan_out))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in adapted.layers.items():
            for key, tensor in layer.adapter_state().items():
                params[f"base_model.model.{name}.{PEFT_PARAM[key]}"].copy_(tensor)
    return peft_model


def peft_param(peft_model, layer_name: str, key: str) -> torch.Tensor:
    return dict(peft_model.named_parameters())[f"base_model.model.{layer_name}.{PEFT_PARAM[key]}"]


def randomize_adapter(adapted, seed: int = 1, scale: float = 0.05) -> None:
    """Give every adapter tensor random values (so B, λ_b are non-zero and gradients are generic)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted.layers.values():
            for key, tensor in layer.adapter_state().items():
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.dtype) * scale
                if key == "magnitude":
                    tensor.mul_(1 + noise)
                else:
                    tensor.add_(noise)


def token_batch(batch: int = 2, length: int = 8, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# Options a preset cannot do without (AdaLoRA's schedule needs the run's length).
PRESET_REQUIRED = {"adalora": {"total_step": 12}}


def preset(name: str, **overrides) -> dict:
    """A buildable spec dict for a preset (with its required options filled in)."""
    return {"preset": name, **PRESET_REQUIRED.get(name, {}), **overrides}


def calibrate_if_needed(adapted, batches=None) -> None:
    """Calibrate a data-aware init (EVA, CorDA, LoRA-GA) on labelled token batches; others need nothing."""
    if not adapted.needs_calibration:
        return
    if batches is None:
        batches = []
        for i in range(adapted.calibration_batches()):
            ids = token_batch(4, 16, seed=100 + i)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    adapted.calibrate(batches)


def full_precision_presets() -> list[str]:
    import variants

    return [n for n in variants.names() if variants.AdapterSpec.from_dict(preset(n)).base == "full"]


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_uri(monkeypatch):
    # mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; a test that called it must not
    # redirect the stores of the tests after it.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def ray_extra():
    """Ray, the optional extra `.[cluster]` of the grid across machines. A fresh `make test` has no Ray,
    so the cluster tests skip there; .ci/run installs the extra and sets LORA_REQUIRE_CLUSTER_EXTRA=1,
    which turns a missing Ray into a failure: in CI these tests always run."""
    try:
        import ray
    except ImportError:
        if os.environ.get("LORA_REQUIRE_CLUSTER_EXTRA") == "1":
            pytest.fail("LORA_REQUIRE_CLUSTER_EXTRA=1 but ray is not installed: pip install -e '.[cluster]'")
        pytest.skip("the optional extra .[cluster] (ray) is not installed")
    return ray
