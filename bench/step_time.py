"""Training-step time of every variant: ours and PEFT's equivalent side by side, plus the floor.

One step = forward + backward + optimizer step (+ the variant's hooks). The *floor* is what
no adapter can beat: the frozen base model's forward and input-gradient backward (the
gradient flows through every layer, no weight gradient, no optimizer). Configurations are
measured interleaved, round by round (two steps each, the second timed), so drift and
background load hit all of them alike. The table reports each configuration's median step
time, and each ratio as the median over rounds of the two times measured in the same round.

    python bench/step_time.py                       # tiny Llama + SmolLM2-135M
    python bench/step_time.py --models tiny --rounds 30
    python bench/step_time.py --out bench/results.md
    python bench/step_time.py --models smollm2 --variants vera --smollm2-rounds 15
    python bench/step_time.py --adapter-dtype-cost --models tiny --rounds 10   # bf16 base: float32 vs base adapter math

Targets: ours/PEFT <= 0.95 for every variant (issue 2), DoRA <= 0.8, VeRA <= 0.9 on SmolLM2
(issue 9), and LoRA/floor <= 1.15 on SmolLM2. On a machine shared with other work, `--clock cpu
--threads 1` times each step by the process's CPU time instead of the wall clock. Delta-LoRA and
SoRA have no PEFT implementation (ours/floor only). QLoRA's PEFT side is PEFT's LoRA on
bitsandbytes' Linear4bit layers (NF4 + double quantization), AdaLoRA's calls PEFT's
update_and_allocate every step as ours does. LoftQ trains exactly like QLoRA; what it adds is
its initialisation, timed separately.

Two runs of this script an hour apart differ by more than a 1-3% change of our code; to measure such a
change to `variants/functional.py`, `bench/ab_functional.py` trains it against an earlier revision of the
file in one process, round by round.
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import variants  # noqa: E402

VARIANTS = ["lora", "rslora", "dora", "vera", "lora_fa", "lora_plus", "delta_lora", "qlora", "adalora", "sora"]
ADALORA = {"r": 12, "target_r": 8, "alpha": 16, "tinit": 10, "tfinal": 10, "total_step": 10_000}
TARGETS = {"dora": 0.8, "vera": 0.9}
R, ALPHA, VERA_R, LR = 8, 16, 256, 1e-4
# What a step's time is: wall clock (default), or with --clock cpu the process's CPU time, which a busy
# shared machine does not inflate by descheduling (use it with --threads 1: with more threads, a thread
# spinning while it waits for a descheduled sibling counts as CPU time too).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


@dataclass
class Runner:
    label: str
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)

    def run(self, record: bool = True) -> None:
        started = clock()
        self.step()
        if record:
            self.times.append(clock() - started)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times)


def paired_ratios(a: Runner, b: Runner) -> list[float]:
    """a's time / b's time, round by round (paired: drift cancels)."""
    return [x / y for x, y in zip(a.times, b.times, strict=True)]


def paired_ratio(a: Runner, b: Runner) -> float:
    """Median over rounds of the same-round ratio a / b."""
    return statistics.median(paired_ratios(a, b))


def paired_spread(a: Runner, b: Runner) -> tuple[float, float]:
    """(min, max) over rounds of the same-round ratio a / b."""
    ratios = paired_ratios(a, b)
    return min(ratios), max(ratios)


def median_interval(a: Runner, b: Runner, draws: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median same-round ratio a / b (rounds resampled; fixed seed)."""
    ratios = paired_ratios(a, b)
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def spec_for(name: str, **options) -> variants.AdapterSpec:
    args = {"r": VERA_R} if name == "vera" else ADALORA if name == "adalora" else {"r": R, "alpha": ALPHA}
    return variants.get(name, target_modules="all-linear", **args, **options)


def ours_runner(name: str, base, batch, label: str | None = None, **options) -> Runner:
    model = copy.deepcopy(base)
    adapted = variants.build(model, spec_for(name, **options))
    model.train()
    opt = adapted.optimizer(LR)
    state = {"step": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        extra = adapted.extra_loss(state["step"])
        (loss if extra is None else loss + extra).backward()
        adapted.before_optimizer_step(state["step"], opt)
        opt.step()
        adapted.after_optimizer_step(state["step"], opt)
        state["step"] += 1

    return Runner(label or f"ours {name}", step)


def bnb_4bit_copy(base):
    """The base with every linear layer (but the head) replaced by bitsandbytes' Linear4bit (NF4 + DQ),
    as transformers' BitsAndBytesConfig loading would give; the CPU repack is switched off
    (docs/quantized.md: it silently drops input gradients)."""
    import bitsandbytes as bnb

    from variants.targets import find_targets, replace_module

    model = copy.deepcopy(base)
    for name, lin in find_targets(model, ("all-linear",)):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.load_state_dict(lin.state_dict())
        q = q.to("cpu")
        q.support_avx512bf16_for_cpu = False
        replace_module(model, name, q)
    return model


def peft_runner(name: str, base, batch) -> Runner | None:
    from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

    if name in ("delta_lora", "sora"):  # not in PEFT
        return None
    source = bnb_4bit_copy(base) if name == "qlora" else copy.deepcopy(base)
    if name == "vera":
        config = VeraConfig(r=VERA_R, target_modules="all-linear")
    elif name == "adalora":
        config = AdaLoraConfig(init_r=ADALORA["r"], target_r=ADALORA["target_r"], lora_alpha=ADALORA["alpha"],
                               tinit=ADALORA["tinit"], tfinal=ADALORA["tfinal"], total_step=ADALORA["total_step"],
                               target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                            use_rslora=name == "rslora", use_dora=name == "dora")
    model = get_peft_model(source, config)
    for n, p in model.named_parameters():
        if "ranknum" in n:  # PEFT 0.21.2 leaves it trainable; AdaLoRA means it constant
            p.requires_grad_(False)
    model.train()
    if name == "lora_fa":
        opt = create_lorafa_optimizer(model, r=R, lora_alpha=ALPHA, lr=LR)
    elif name == "lora_plus":
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16, foreach=True)
    else:
        # the same AdamW (foreach, no weight decay) that our default optimizer part uses, so the ratio
        # measures the adapters
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                foreach=True)

    state = {"step": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
        if name == "adalora":
            model.base_model.update_and_allocate(state["step"])
        state["step"] += 1

    return Runner(f"peft {name}", step)


def floor_runner(base, batch) -> Runner:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    embed = model.get_input_embeddings()

    def step():
        inputs = embed(batch["input_ids"]).detach().requires_grad_()
        model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    return Runner("floor", step)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def smollm2():
    from transformers import AutoModelForCausalLM

    from pipeline.gguf_base import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    torch.set_flush_denormal(True)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def make_batch(vocab: int, batch: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def measure(title: str, base, batch, names: list[str], rounds: int, warmup: int, pairwise: bool) -> list[dict]:
    """Median step times. `pairwise` builds one variant's pair at a time (large models), else all at once."""
    print(f"\n## {title}: batch {tuple(batch['input_ids'].shape)}, {rounds} measured rounds after {warmup} warm-up",
          flush=True)
    rows = []
    groups = [[n] for n in names] if pairwise else [names]
    for group in groups:
        floor = floor_runner(base, batch)
        runners: list[Runner] = [floor]
        for name in group:
            runners.append(ours_runner(name, base, batch))
            theirs = peft_runner(name, base, batch)
            if theirs is not None:
                runners.append(theirs)
        for i in range(warmup + rounds):
            for runner in runners:
                # Two steps in a row, only the second timed: the first absorbs the cost of
                # switching models (cold caches, the allocator's state left by the previous one).
                runner.run(record=False)
                runner.run(record=i >= warmup)
            print(f"\r  {', '.join(group)}: round {i + 1}/{warmup + rounds}", end="", flush=True)
            if i >= warmup and len(group) == 1 and len(runners) == 3:  # ours/PEFT of this round, as it comes
                print(f"  ours/PEFT {runners[1].times[-1] / runners[2].times[-1]:.3f}", end="", flush=True)
        print(flush=True)
        by_label = {r.label: r for r in runners}
        for name in group:
            ours = by_label[f"ours {name}"]
            theirs = by_label.get(f"peft {name}")
            if theirs is not None:
                print(f"  {name}: per-round ours/PEFT " + " ".join(f"{v:.3f}" for v in paired_ratios(ours, theirs)))
                low, high = median_interval(ours, theirs)
                print(f"  {name}: median ours/PEFT {paired_ratio(ours, theirs):.3f}, 95% bootstrap interval "
                      f"{low:.3f}–{high:.3f} over {len(ours.times)} rounds")
            rows.append({
                "model": title, "variant": name, "ours_ms": ours.median_ms,
                "peft_ms": theirs.median_ms if theirs else None, "floor_ms": floor.median_ms,
                "ours_over_peft": paired_ratio(ours, theirs) if theirs else None,
                "ours_over_peft_range": paired_spread(ours, theirs) if theirs else None,
                "ours_over_floor": paired_ratio(ours, floor),
                "peft_over_floor": paired_ratio(theirs, floor) if theirs else None,
            })
        del runners, by_label, floor
        gc.collect()
    return rows


def ratio_text(a: Runner, b: Runner) -> str:
    low, high = paired_spread(a, b)
    return f"{paired_ratio(a, b):.3f} ({low:.3f}–{high:.3f})"


def adapter_dtype_cost(title: str, base, batch, names: list[str], rounds: int, warmup: int) -> str:
    """Step time on a bfloat16 base of the adapter math in float32 (default, as PEFT) against bf16
    (`adapter_dtype=base`), and PEFT's (float32 adapters), interleaved round by round."""
    base = copy.deepcopy(base).to(torch.bfloat16)
    lines = [(f"Adapter compute dtype on a bfloat16 base ({title}, batch {tuple(batch['input_ids'].shape)}, "
              f"{rounds} rounds): paired ratios, median (min–max)"), "",
             "| variant | float32 ms | base (bf16) ms | PEFT ms | float32 / bf16 | float32 / PEFT |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        f32 = ours_runner(name, base, batch, label="float32", adapter_dtype="float32")
        b16 = ours_runner(name, base, batch, label="base", adapter_dtype="base")
        theirs = peft_runner(name, base, batch)
        runners = [r for r in (f32, b16, theirs) if r is not None]
        for i in range(warmup + rounds):
            for runner in runners:
                runner.run(record=False)
                runner.run(record=i >= warmup)
            print(f"\r  {name} bf16: round {i + 1}/{warmup + rounds}", end="", flush=True)
        print(flush=True)
        lines.append(f"| {name} | {f32.median_ms:.1f} | {b16.median_ms:.1f} | "
                     f"{theirs.median_ms if theirs else float('nan'):.1f} | {ratio_text(f32, b16)} | "
                     f"{ratio_text(f32, theirs) if theirs else '—'} |")
        del runners, f32, b16, theirs
        gc.collect()
    return "\n".join(lines)


def loftq_init_times(base, label: str, repeats: int = 2) -> str:
    """Build time of LoftQ (quantize + SVD per layer, 1 and 2 rounds) against plain NF4 quantization."""
    out = []
    for name, extra in (("qlora", {}), ("loftq", {"loftq_iter": 1}), ("loftq", {"loftq_iter": 2})):
        times = []
        for _ in range(repeats):
            model = copy.deepcopy(base)
            started = time.perf_counter()
            variants.build(model, variants.get(name, r=R, alpha=ALPHA, target_modules="all-linear", **extra))
            times.append(time.perf_counter() - started)
            del model
        tag = name if not extra else f"loftq T={extra['loftq_iter']}"
        out.append(f"| {label} | {tag} | {1000 * statistics.median(times):.0f} |")
    return "\n".join(["| model | init | build ms (median) |", "|---|---|---:|", *out])


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | ours ms | PEFT ms | floor ms | ours/PEFT | min–max | target | ours/floor | PEFT/floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        target = TARGETS.get(r["variant"], 0.95) if r["peft_ms"] else None
        ok = "" if target is None else (" ✓" if r["ours_over_peft"] <= target else " ✗")
        fmt = lambda v, p=1: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
        spread = "—" if r["ours_over_peft_range"] is None else "–".join(f"{v:.3f}" for v in r["ours_over_peft_range"])
        lines.append(f"| {r['model']} | {r['variant']} | {fmt(r['ours_ms'])} | {fmt(r['peft_ms'])} | "
                     f"{fmt(r['floor_ms'])} | {fmt(r['ours_over_peft'], 3)}{ok} | {spread} | {fmt(target, 2)} | "
                     f"{fmt(r['ours_over_floor'], 3)} | {fmt(r['peft_over_floor'], 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smollm2-rounds", type=int, default=6)
    parser.add_argument("--smollm2-batch", default="8x64", help="BATCHxLENGTH for SmolLM2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall clock, or process CPU time (robust to other load; use with --threads 1)")
    parser.add_argument("--no-init-times", action="store_true", help="skip the LoftQ initialisation timings")
    parser.add_argument("--adapter-dtype-cost", action="store_true",
                        help="instead: on a bf16 base, lora/dora/vera with adapter_dtype float32 vs base (and PEFT)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    # Denormal floats (tiny Adam second moments, tiny gradients) make CPU float ops 10-100x
    # slower and would hit configurations at random; flush them to zero for every side.
    torch.set_flush_denormal(True)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    if args.adapter_dtype_cost:
        tables = []
        for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if model_name == "tiny":
                tables.append(adapter_dtype_cost("tiny Llama h256 L4", tiny_llama(), make_batch(8192, 8, 128),
                                                 [n for n in names if n in ("lora", "dora", "vera")], args.rounds,
                                                 args.warmup))
            elif model_name == "smollm2":
                base = smollm2()
                b, length = (int(v) for v in args.smollm2_batch.split("x"))
                tables.append(adapter_dtype_cost("SmolLM2-135M", base, make_batch(base.config.vocab_size, b, length),
                                                 [n for n in names if n in ("lora", "dora", "vera")],
                                                 args.smollm2_rounds, args.warmup))
            else:
                parser.error(f"unknown model {model_name!r} (known: tiny, smollm2)")
        text = "\n\n".join(tables)
        print("\n" + text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(f"# Adapter dtype cost ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads)\n\n{text}\n")
        return
    rows = []
    init_tables = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model_name == "tiny":
            base = tiny_llama()
            rows += measure("tiny Llama h256 L4", base, make_batch(8192, 8, 128), names, args.rounds, args.warmup,
                            pairwise=False)
            if not args.no_init_times:
                init_tables.append(loftq_init_times(base, "tiny Llama h256 L4"))
        elif model_name == "smollm2":
            base = smollm2()
            b, length = (int(v) for v in args.smollm2_batch.split("x"))
            rows += measure("SmolLM2-135M", base, make_batch(base.config.vocab_size, b, length), names,
                            args.smollm2_rounds, args.warmup, pairwise=True)
            if not args.no_init_times:
                init_tables.append(loftq_init_times(base, "SmolLM2-135M", repeats=1))
        else:
            parser.error(f"unknown model {model_name!r} (known: tiny, smollm2)")
        del base
        gc.collect()
    text = table(rows)
    if init_tables:
        text += "\n\nLoftQ initialisation on CPU (build time of the whole adapter, quantization included):\n\n" + \
            "\n\n".join(init_tables)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Step time ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads)\n\n{text}\n")


if __name__ == "__main__":
    main()
