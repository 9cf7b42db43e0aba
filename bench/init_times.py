"""Initialisation time per init part: `variants.build` plus, for a data-aware init, `calibrate`.

    python bench/init_times.py                                     # tiny Llama + SmolLM2-135M
    python bench/init_times.py --models tiny --repeats 3
    python bench/init_times.py --base models/base --data data/prepared   # SmolLM2 with the pipeline's G2P batches

The inits: LoRA's default (Kaiming A, B = 0), LoftQ (NF4 quantization + one SVD round per layer),
PiSSA with the exact SVD and with 4 subspace iterations, OLoRA (QR), EVA, CorDA (ipm) and LoRA-GA,
all with r 8, alpha 16 on every linear layer. EVA, CorDA and LoRA-GA calibrate on `init_batches` = 4
batches: for SmolLM2, with `--base` (the pipeline's converted model folder, which has the tokenizer)
and `--data` (the prepared splits), the first 4 batches of the training stream exactly as
pipeline/train.py draws them (12 G2P examples each); otherwise random tokens (12 x 24, the first
half of each row unlabelled). EVA runs with the catalog's settings (params.yaml: eva_max_passes 15);
its forward count is printed beside its time, since it depends on the data. Times are wall clock,
the median of `--repeats` runs (1 for SmolLM2 by default).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import variants  # noqa: E402

R, ALPHA = 8, 16
INITS = [  # (label, spec overrides)
    ("lora (default init)", {"preset": "lora"}),
    ("loftq (NF4 + 1 SVD round)", {"preset": "loftq", "loftq_iter": 1}),
    ("pissa exact SVD", {"preset": "pissa", "pissa_niter": 0}),
    ("pissa niter 4", {"preset": "pissa", "pissa_niter": 4}),
    ("olora", {"preset": "olora"}),
    ("eva", {"preset": "eva", "eva_max_passes": 15}),
    ("corda ipm", {"preset": "corda", "corda_method": "ipm"}),
    ("lora_ga", {"preset": "lora_ga"}),
]


def tiny_llama():
    """The tiny Llama of bench/step_time.py (h256, 4 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def random_batches(vocab: int, n: int = 4, batch: int = 12, length: int = 24) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        labels = ids.clone()
        labels[:, : length // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def smollm2(base: str | None, data: str | None):
    """SmolLM2-135M and its calibration batches (the pipeline's first training batches when possible)."""
    if base and Path(base).is_dir():
        from pipeline.gguf_base import load_base

        model, tokenizer = load_base(base, "float32")
        if data and Path(data).is_dir():
            from pipeline.lm import encode_records, training_batches
            from pipeline.splits import read_split

            examples = encode_records(tokenizer, read_split(data, "train"), 64)  # params.yaml data.max_length
            batches = list(training_batches(examples, 12, 4, 0, tokenizer.pad_token_id))  # batch_size 12, seed 0
            return model, batches, "first 4 G2P training batches (12 examples)"
        return model, random_batches(model.config.vocab_size), "random tokens 12x24"
    from step_time import smollm2 as from_gguf

    model = from_gguf().eval()
    return model, random_batches(model.config.vocab_size), "random tokens 12x24"


def time_init(base, batches, overrides: dict, repeats: int) -> tuple[float, dict]:
    times, info = [], {}
    for _ in range(repeats):
        model = copy.deepcopy(base)
        started = time.perf_counter()
        adapted = variants.build(model, {"r": R, "alpha": ALPHA, "target_modules": "all-linear", **overrides})
        if adapted.needs_calibration:
            info = adapted.calibrate(batches)
        times.append(time.perf_counter() - started)
        del adapted, model
    return statistics.median(times), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per init on the tiny Llama")
    parser.add_argument("--smollm2-repeats", type=int, default=1)
    parser.add_argument("--base", default="models/base", help="the pipeline's converted SmolLM2 folder")
    parser.add_argument("--data", default="data/prepared", help="the pipeline's prepared splits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--inits", default="", help="comma list of init labels' first words to run (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = {w for w in args.inits.split(",") if w}
    rows = ["| model | calibration data | init | build + calibrate s | calibration forwards |", "|---|---|---|---:|---:|"]
    for name in args.models.split(","):
        if name == "tiny":
            base = tiny_llama()
            batches, label, what, repeats = random_batches(base.config.vocab_size), "tiny Llama h256 L4", \
                "random tokens 12x24", args.repeats
        elif name == "smollm2":
            base, batches, what = smollm2(args.base, args.data)
            label, repeats = "SmolLM2-135M", args.smollm2_repeats
        else:
            parser.error(f"unknown model {name!r} (known: tiny, smollm2)")
        for init_label, overrides in INITS:
            if wanted and init_label.split()[0] not in wanted:
                continue
            seconds, info = time_init(base, batches, overrides, repeats)
            forwards = info.get("forwards", "")
            extra = f" ({len(info['unconverged'])} layers unconverged)" if info.get("unconverged") else ""
            rows.append(f"| {label} | {what} | {init_label} | {seconds:.2f} | {forwards}{extra} |")
            print(rows[-1], flush=True)
    print(f"\ntorch threads: {torch.get_num_threads()}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
