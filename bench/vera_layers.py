"""VeRA layer cost on SmolLM2-135M's shapes: our fused layer against PEFT's forward formula and the frozen floor.

One decoder block's linear layers, grouped by shared input (q/k/v, o, gate/up, down), 512 tokens,
r = 256: forward + backward (input gradient and λ gradients). PEFT's side is its layer's forward,
y = x W0ᵀ + λ_b ⊙ ((λ_d ⊙ x Aᵀ) Bᵀ), differentiated by autograd; the floor is x W0ᵀ alone. The three
are run interleaved; per group the table gives the minimum over repeats (the least disturbed run on a
shared CPU) and the median and range of the same-repeat ratio ours / PEFT.

With --cold, the CPU caches are flushed (a pass over a buffer larger than the last-level cache, not
timed) before each forward and again between forward and backward, and only the input, or the loss,
is read back in: as in a full model, where a layer's input was just computed, but its weight was
last read one step ago and what its forward kept for backward was written before every later layer ran.

    python bench/vera_layers.py --repeats 15
    python bench/vera_layers.py --repeats 15 --cold
    python bench/vera_layers.py --repeats 15 --threads 1 --clock cpu   # on a machine busy with other work
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variants.vera import VeRALayer, VeRAProjections

GROUPS = {"q/k/v": [(576, 576), (576, 192), (576, 192)], "o": [(576, 576)],
          "gate/up": [(576, 1536), (576, 1536)], "down": [(1536, 576)]}


def ours(layers, x):
    """Forward; returns the loss (the caller times its backward separately)."""
    x = x.detach().requires_grad_()
    return sum((layer(x) * 1e-3).sum() for layer in layers)


def peft_formula(layers, x):
    x = x.detach().requires_grad_()
    total = 0
    for layer in layers:
        A, B = layer.sliced()
        y = F.linear(x, layer.base_layer.weight) + layer.lambda_b * F.linear(layer.lambda_d * F.linear(x, A), B)
        total = total + (y * 1e-3).sum()
    return total


def floor(layers, x):
    x = x.detach().requires_grad_()
    return sum((F.linear(x, layer.base_layer.weight) * 1e-3).sum() for layer in layers)


def cache_flusher(mib: int):
    """A function that evicts the CPU caches (one read-modify-write pass over `mib` MiB), then reads
    `keep_warm` back in."""
    buffer = torch.zeros(mib * 2**20 // 4)

    def flush(keep_warm: torch.Tensor) -> None:
        buffer.add_(1.0)
        keep_warm.sum()

    return flush


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or process CPU time (robust to other load; use with --threads 1)")
    parser.add_argument("--cold", action="store_true", help="flush the CPU caches before each forward and between forward and backward")
    parser.add_argument("--flush-mib", type=int, default=1024,
                        help="size of the buffer --cold passes over (larger than the last-level cache)")
    args = parser.parse_args()
    if args.flush_mib <= 0:
        parser.error(f"--flush-mib must be > 0, got {args.flush_mib}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    projections = VeRAProjections(args.r, 1536, 1536, key=0)
    flush = cache_flusher(args.flush_mib) if args.cold else (lambda keep_warm: None)
    print(f"caches {'flushed before forward and before backward' if args.cold else 'warm'}, {args.tokens} tokens, r = {args.r}\n")
    print("| layers | ours ms | PEFT ms | floor ms | ours/PEFT median (min–max) |\n|---|---:|---:|---:|---:|")
    totals = dict.fromkeys(("ours", "peft", "floor"), 0.0)
    for name, shapes in GROUPS.items():
        layers = []
        for fan_in, fan_out in shapes:
            layer = VeRALayer(nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False), projections, args.r, 0.1, 0.0)
            with torch.no_grad():
                layer.lambda_b.normal_()
            layers.append(layer)
        x = torch.randn(args.tokens, shapes[0][0])
        times = {"ours": [], "peft": [], "floor": []}
        for i in range(args.repeats + 2):  # two warm-up repeats
            for key, fn in (("ours", ours), ("peft", peft_formula), ("floor", floor)):
                flush(x)
                started = clock()
                loss = fn(layers, x)
                forward = clock() - started
                flush(loss)  # a full model runs every other layer between a layer's forward and its backward
                started = clock()
                loss.backward()
                if i >= 2:
                    times[key].append(forward + clock() - started)
        ratios = [a / b for a, b in zip(times["ours"], times["peft"], strict=True)]
        best = {k: 1000 * min(v) for k, v in times.items()}
        for k in totals:
            totals[k] += best[k]
        print(f"| {name} | {best['ours']:.1f} | {best['peft']:.1f} | {best['floor']:.1f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |", flush=True)
    print(f"| block | {totals['ours']:.1f} | {totals['peft']:.1f} | {totals['floor']:.1f} | "
          f"adapter part ours/PEFT {(totals['ours'] - totals['floor']) / (totals['peft'] - totals['floor']):.3f} |")


if __name__ == "__main__":
    main()
