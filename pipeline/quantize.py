"""Stage `quantize`: the base model's linear layers in 4-bit (NF4 + double quantization).

    python -m pipeline.quantize --base models/base --out models/quantized \
        --metrics reports/quantize.json --layers reports/quantize_layers.csv

Quantizes every linear layer that "all-linear" adapts (the output head stays as is, as in
QLoRA) once, with bitsandbytes, and writes atomically:

- models/quantized/: weights.safetensors (packed codes + quantization states, reloadable
  with `QuantState.from_dict`) and summary.json; QLoRA and LoftQ start from it;
- reports/quantize.json (DVC metrics): fp32 and 4-bit bytes, bits per parameter (measured
  and from the formula), mean and worst relative reconstruction error ‖W − deq(Q(W))‖/‖W‖;
- reports/quantize_layers.csv: the same per layer.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from pipeline.files import commit_outputs
from pipeline.gguf_base import load_base
from pipeline.runtime import Progress, configure_cpu
from pipeline.stage import start
from variants.quant import (
    bits_per_parameter,
    dequantize_weight,
    quantize_weight,
    quantized_bytes,
    save_quantized,
    state_bytes,
)
from variants.spec import ALL_LINEAR
from variants.targets import find_targets


def main(argv: list[str] | None = None) -> int:
    args, params = start("quantize", __doc__, argv, inputs={"--base": "the base model folder"},
                         outputs={"--out": "the quantized weights folder", "--metrics": "the summary (DVC metrics)",
                                  "--layers": "the per-layer CSV"})
    if params is None:
        return 1
    q = params.quantize
    configure_cpu()
    model, _ = load_base(args.base, "float32", params.model.trust_remote_code)
    targets = find_targets(model, (ALL_LINEAR,))
    quantized: dict = {}
    rows = []
    progress = Progress("quantize", len(targets), every=max(1, len(targets) // 10))
    for i, (name, module) in enumerate(targets, 1):
        weight = module.weight.detach().float()
        packed, state = quantize_weight(weight, q.quant_type, q.double_quant, q.blocksize)
        error = float((weight - dequantize_weight(packed, state)).norm() / weight.norm())
        quantized[name] = (packed, state)
        rows.append({"layer": name, "params": weight.numel(), "fp32_bytes": weight.numel() * 4,
                     "quantized_bytes": state_bytes(packed, state),
                     "formula_bytes": round(quantized_bytes(weight.numel(), q.blocksize, q.double_quant)),
                     "relative_error": error})
        progress.update(i)
    quantized_params = sum(r["params"] for r in rows)
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(r["quantized_bytes"] for r in rows)
    other_bytes = all_bytes - sum(r["fp32_bytes"] for r in rows)  # embeddings, norms, head: kept as is
    metrics = {
        "quant_type": q.quant_type, "double_quant": q.double_quant, "blocksize": q.blocksize,
        "quantized_layers": len(rows), "quantized_params": quantized_params,
        "base_fp32_bytes": all_bytes, "quantized_layer_bytes": layer_bytes, "unquantized_bytes": other_bytes,
        "base_4bit_bytes": layer_bytes + other_bytes,
        "bits_per_param_measured": 8 * layer_bytes / quantized_params,
        "bits_per_param_formula": bits_per_parameter(q.blocksize, q.double_quant),
        "relative_error_mean": sum(r["relative_error"] for r in rows) / len(rows),
        "relative_error_max": max(r["relative_error"] for r in rows),
    }
    def write_weights(tmp: Path) -> None:
        save_quantized(tmp / "weights.safetensors", quantized)
        (tmp / "summary.json").write_text(json.dumps({**metrics, "layers": [r["layer"] for r in rows]}, indent=2))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    commit_outputs({args.layers: buf.getvalue(), args.metrics: json.dumps(metrics, indent=2, sort_keys=True) + "\n"},
                   {args.out: write_weights})
    print(f"quantize: {len(rows)} layers, {all_bytes / 2**20:.0f} MiB fp32 -> {(layer_bytes + other_bytes) / 2**20:.0f} MiB "
          f"({metrics['bits_per_param_measured']:.3f} bits/param in quantized layers), "
          f"relative error mean {metrics['relative_error_mean']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
