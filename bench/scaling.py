"""Step time and per-rank memory of one training run split over processes: 1 process vs DDP x N vs FSDP2 x N.

    python bench/scaling.py                                   # tiny Llama and SmolLM2, CPU (gloo), N = 2
    python bench/scaling.py --models tiny --rounds 2 --steps 4                    # a quick look
    python bench/scaling.py --models smollm2 --device cuda --dtype bfloat16 --variants lora,dora,qlora --peft

Configurations (each its own process, or torchrun job, per round; rounds interleave them, so a
slow spell of a shared machine hits all alike):

    1 proc        `variants.train` in one process on the global batch (--batch ROWSxTOKENS)
    1 proc, B/N   one process on 1/N of the rows: the work each of N ranks does, without communication
    ddp xN        torchrun, N processes, strategy ddp, the same global batch
    fsdp xN       torchrun, N processes, strategy fsdp (FSDP2 per decoder layer + root)
    peft          (--peft) PEFT's LoRA / DoRA / QLoRA (bitsandbytes 4-bit) on the same batch, one process

Every variant of --variants is trained for --steps steps from a fresh copy of the base in each
configuration; the step time of a run is the median over its steps after the first (the slowest
rank's time per step: the ranks wait for each other), and the table shows, per configuration,
the median over rounds with the range. Tokens/s counts the global batch's tokens. Per rank: peak
memory (CUDA: max_memory_allocated; CPU: peak RSS, the whole process) and the bytes of base
weights held (`variants.distributed.base_bytes_per_rank`: FSDP2 shards the base's parameters).
Communication overhead per step = (ddp or fsdp xN step) − (1 proc, B/N step). Every process runs
--threads torch threads (default 1), so on a CPU N processes use N cores where one process uses
one: the speed-up there is the cores', and the figures that matter are the bytes per rank and
the overhead.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = "lora,dora,qlora"
LR = 1e-4


# ----- one run (a worker: one process, or one rank of a torchrun job) --------------------------------------
def base_model(name: str, dtype: torch.dtype):
    from step_time import smollm2, tiny_llama

    model = tiny_llama() if name == "tiny" else smollm2()
    return model.to(dtype)


def batches(vocab: int, rows: int, length: int, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (rows, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def ours(base, name: str, device, data, steps: int, strategy: str) -> tuple[list[float], int]:
    from step_time import spec_for

    import variants

    model = copy.deepcopy(base).to(device)
    adapted = variants.build(model, spec_for(name))
    times: list[float] = []
    on_device = [{k: v.to(device) for k, v in b.items()} for b in data]
    variants.train(adapted, on_device, variants.TrainSettings(steps=steps, lr=LR), strategy=strategy,
                   on_step=lambda record: times.append(record.seconds))  # ends after the host syncs on the loss
    from variants.distributed import base_bytes_per_rank

    return times, base_bytes_per_rank(adapted)


def peft(base, name: str, device, data) -> tuple[list[float], int]:
    from peft import LoraConfig, get_peft_model
    from step_time import ALPHA, R

    if name == "qlora":
        source = _bnb_4bit(base, device)
    else:
        source = copy.deepcopy(base).to(device)
    if name not in ("lora", "dora", "qlora"):
        raise SystemExit(f"--peft times lora, dora and qlora only, got {name}")
    model = get_peft_model(source, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                              use_dora=name == "dora"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, foreach=True)
    times = []
    for batch in data:
        batch = {k: v.to(device) for k, v in batch.items()}
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        float(loss)  # the host waits for the step, as ours does
        times.append(time.perf_counter() - started)
    held = sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if "lora_" not in n)
    return times, held


def _bnb_4bit(base, device):
    """The base with every linear layer but the head as bitsandbytes' Linear4bit (NF4 + double quantization)."""
    import bitsandbytes as bnb

    from variants.targets import find_targets, replace_module

    model = copy.deepcopy(base)
    dtype = next(base.parameters()).dtype
    for name, lin in find_targets(model, ("all-linear",)):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=True)
        q.load_state_dict(lin.state_dict())
        if device.type == "cpu":
            q.support_avx512bf16_for_cpu = False  # the CPU repack drops input gradients (docs/quantized.md)
        replace_module(model, name, q.to(device))  # quantized when moved
    return model.to(device)


def worker(args) -> None:
    from pipeline.runtime import PeakMemory

    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        backend = "nccl" if cuda else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if cuda else None)
    torch.manual_seed(0)
    base = base_model(args.model, getattr(torch, args.dtype))
    rows, length = args.rows, args.length
    data = batches(base.config.vocab_size, rows, length, args.steps)
    results = {}
    for name in args.variants.split(","):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        with PeakMemory(device) as peak:
            if args.config == "peft":
                times, held = peft(base, name, device, data)
            else:
                times, held = ours(base, name, device, data, args.steps, args.config)
        mine = {"times": times, "peak": peak.bytes, "base_bytes": held}
        everyone = [mine]
        if world > 1:
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, mine)
        results[name] = everyone
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "rows": rows, "length": length, "results": results}))
    if world > 1:
        torch.distributed.destroy_process_group()


# ----- the comparison --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, model: str, config: str, nproc: int, rows: int, threads: int, out: Path) -> dict:
    work = [str(Path(__file__).absolute()), "--worker", "--model", model, "--config", config, "--variants",
            args.variants, "--steps", str(args.steps), "--rows", str(rows), "--length", str(args.length),
            "--device", args.device, "--dtype", args.dtype, "--threads", str(threads), "--out", str(out)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max_restarts",
                   "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", *work]
    else:
        command = [sys.executable, *work]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{config} x{nproc} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def step_ms(per_rank: list[dict]) -> float:
    """Median over steps (after the first) of the slowest rank's step time."""
    steps = list(zip(*(r["times"] for r in per_rank), strict=True))[1:]
    return 1000 * statistics.median(max(step) for step in steps)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def compare(args, model: str) -> list[str]:
    n = args.nproc
    configs = [("1 proc", "none", 1, args.rows), (f"1 proc, B/{n}", "none", 1, args.rows // n)]
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cpu" or gpus >= n:
        configs += [(f"ddp x{n}", "ddp", n, args.rows), (f"fsdp x{n}", "fsdp", n, args.rows)]
    else:
        print(f"({gpus} GPU(s) visible: ddp/fsdp x{n} need {n}; only one-process configurations)", flush=True)
    if args.peft:
        configs.append(("peft", "peft", 1, args.rows))
    runs: dict[str, list[dict]] = {label: [] for label, *_ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, config, nproc, rows in configs:
                threads = args.threads
                started = time.perf_counter()
                runs[label].append(launch(args, model, config, nproc, rows, threads, Path(tmp) / "out.json"))
                print(f"  round {round_ + 1}/{args.rounds} {label}: {time.perf_counter() - started:.0f} s", flush=True)
    names = args.variants.split(",")
    head = (f"## {model} ({args.device}, {args.dtype}), global batch {args.rows}x{args.length}, "
            f"{args.rounds} rounds x {args.steps} steps")
    lines = [head, "", "| Variant | Configuration | Step time, ms (range over rounds) | Tokens/s | "
             "Peak memory per rank | Base weights per rank (× 1 proc) |", "|---|---|---|---|---|---|"]
    overhead = []
    for name in names:
        single = runs["1 proc"][0]["results"][name][0]["base_bytes"]
        medians = {}
        for label, _config, _nproc, rows in configs:
            per_round = [step_ms(run["results"][name]) for run in runs[label]]
            medians[label] = statistics.median(per_round)
            last = runs[label][-1]["results"][name]
            tokens = rows * args.length
            lines.append(
                f"| {name} | {label} | {medians[label]:.1f} ({min(per_round):.1f}–{max(per_round):.1f}) | "
                f"{tokens / medians[label] * 1000:.0f} | " + " / ".join(fmt_bytes(r["peak"]) for r in last) + " | "
                + " / ".join(f"{fmt_bytes(r['base_bytes'])} ({r['base_bytes'] / single:.2f}×)" for r in last) + " |")
        for label in (f"ddp x{n}", f"fsdp x{n}"):
            if label in medians:
                overhead.append(f"| {name} | {label} | {medians[label] - medians[f'1 proc, B/{n}']:+.1f} |")
    if overhead:
        lines += ["", f"Communication overhead per step (N-process step − one process on B/{n} rows, ms):", "",
                  "| Variant | Configuration | Overhead, ms |", "|---|---|---|", *overhead]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--nproc", type=int, default=2, help="N, the processes of the ddp/fsdp configurations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    parser.add_argument("--batch", default="8x64", help="global batch, ROWSxTOKENS")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (every configuration)")
    parser.add_argument("--peft", action="store_true", help="also time PEFT's lora/dora/qlora (one process)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launched run")
    parser.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.rows, args.length = (int(v) for v in args.batch.split("x"))
    if args.rows < args.nproc or args.rows % args.nproc:
        parser.error(f"--batch rows ({args.rows}) must be a multiple of --nproc ({args.nproc})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    tables = []
    for model in args.models.split(","):
        print(f"{model}:", flush=True)
        tables += compare(args, model) + [""]
    text = "\n".join(tables)
    print("\n" + text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
