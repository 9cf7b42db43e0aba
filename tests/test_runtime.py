"""Peak-memory measurement (pipeline/runtime.PeakMemory) on a model loaded the way stages load it."""

from __future__ import annotations

import torch
from conftest import tiny_llama

from pipeline.runtime import PeakMemory


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _forward_increment(folder, resident: bool) -> tuple[int, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.arange(8).unsqueeze(0)
    with PeakMemory(torch.device("cpu"), resident=model if resident else None) as peak, torch.no_grad():
        model(input_ids=tokens)
    weights = _weight_bytes(model)
    del model
    return peak.increment, weights


def test_resident_weights_are_not_counted_as_growth(tmp_path):
    # ~55 MB of fp32 weights, nearly all read by one forward pass (untied head, small embedding)
    tiny_llama(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=8, vocab_size=8000).save_pretrained(tmp_path)
    paged_in, weights = _forward_increment(tmp_path, resident=False)
    measured, _ = _forward_increment(tmp_path, resident=True)
    # from_pretrained maps the safetensors file: the first forward pages the weights in, and
    # without `resident` that shows up as growth (the base weights counted twice in a stage)
    assert paged_in > 0.5 * weights, (paged_in, weights)
    # with `resident` the growth is the forward's own working memory, a small share of the weights
    assert measured < 0.25 * weights, (measured, weights)


def _gc_state(argv0: str) -> list[str]:
    """GC state in a fresh interpreter whose sys.argv[0] is `argv0` when `pipeline` is imported
    ("-m" is what the interpreter sets while it locates `python -m pipeline.<stage>`)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import gc, sys; sys.argv[0] = {argv0!r}; import pipeline; out = [gc.isenabled()]; "
            "from pipeline.runtime import release_free_memory; release_free_memory(); "
            "out += [gc.isenabled(), gc.get_freeze_count() > 0]; print(*out)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_a_stage_process_loads_without_cyclic_gc_and_freezes_what_it_loaded():
    # while the libraries and the model load, no collection walks them; after the one collection
    # before the measured section, collection is back on and the survivors are frozen
    assert _gc_state("-m") == ["False", "True", "True"]
    # imported elsewhere (a test session, a notebook), Python's default GC stays, nothing is frozen
    assert _gc_state("") == ["True", "True", "False"]


def _fresh(code: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_variants_and_the_model_free_stages_import_no_transformers():
    # `import variants` used to import transformers (~0.8 s) to recognise GPT-2's Conv1D; compare
    # and focus only read files, so their stage processes must not pay for it
    code = ("import sys, variants, pipeline.compare, pipeline.focus; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'mlflow')) or 'none')")
    assert _fresh(code) == ["none"]


def test_conv1d_layers_adapt_when_transformers_loads_after_variants():
    # Conv1D is recognised when the model exists (transformers imported by then), not when variants
    # is imported: a GPT-2 built afterwards still gets its fused c_attn adapted, transposed weight and all
    code = """
import sys, torch, variants
assert 'transformers' not in sys.modules
sys.path.insert(0, 'tests')
from conftest import tiny_gpt2
model = tiny_gpt2()
x = torch.arange(10).unsqueeze(0)
adapted = variants.build(model, variants.get('lora', r=4, alpha=8, target_modules='all-linear'))
layer = adapted.layers['transformer.h.0.attn.c_attn']
torch.nn.init.normal_(layer.lora_B)
with torch.no_grad():
    before = model(input_ids=x).logits
    adapted.merge()
    after = model(input_ids=x).logits
print(type(layer.base_layer).__name__, layer.fan_in_fan_out, layer.in_features, layer.out_features,
      len(adapted.layers), torch.allclose(before, after, atol=1e-5))
"""
    # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj); c_attn: 32 -> 96, stored (in, out)
    assert _fresh(code) == ["Conv1D", "True", "32", "96", "8", "True"]


def test_a_stage_freezes_the_libraries_before_it_loads_the_model(tmp_path):
    # the collection before the measured section should walk the model and tokenizer, not the
    # ~700k objects of torch and transformers' modeling code (0.4 s of CPU in evaluate)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(96)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t1").save_pretrained(tmp_path)
    code = (f"import gc, sys; sys.argv[0] = '-m'; import pipeline; from pipeline.gguf_base import load_base; "
            f"model, tok = load_base({str(tmp_path)!r}); print(gc.get_freeze_count(), len(gc.get_objects()))")
    frozen, walked = map(int, _fresh(code))
    assert frozen > 10 * walked, (frozen, walked)
