"""Step time of the fused layers in `variants/functional.py` against the same file at another git
revision, interleaved in one process, with PEFT's equivalent beside them.

On a shared machine a step's time moves with the hour (the frozen floor of SmolLM2 took 1.5 s in one
hour and 2.3 s in another), so two separate `bench/step_time.py` runs cannot tell a 1-3% change from
drift. Here both versions train side by side, round by round, and the same-round ratio new/old cancels
the drift. The baseline file is read with `git show REV:variants/functional.py` and loaded as its own
module; the variant's layer module (`variants.lora`, `variants.dora` or `variants.vera`) calls its
`lora_linear` / `dora_linear` / `vera_linear` during the baseline's steps and the working tree's
otherwise. Everything else (the layer classes, `build`, the optimizer) is the working tree's.

    python bench/ab_functional.py --baseline HEAD~1 --variant vera --rounds 20
    python bench/ab_functional.py --baseline main --variant lora --model tiny --rounds 30
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import step_time as st  # noqa: E402

ENTRY_POINTS = {"lora": ("variants.lora", "lora_linear"), "dora": ("variants.dora", "dora_linear"),
                "vera": ("variants.vera", "vera_linear")}


def baseline_functional(rev: str):
    """variants/functional.py at git revision `rev`, loaded as a separate module."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:variants/functional.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"cannot read variants/functional.py at revision {rev!r}: {err.stderr.strip()}") from None
    with tempfile.TemporaryDirectory(prefix="ab_functional_") as folder:  # the loaded module needs no file
        path = Path(folder) / "functional_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("functional_baseline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def with_entry_point(step, module, name, function):
    """`step` run with `module.name` set to `function` (and restored after, even on error)."""
    def patched():
        current = getattr(module, name)
        setattr(module, name, function)
        try:
            step()
        finally:
            setattr(module, name, current)
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git revision whose variants/functional.py is the baseline")
    parser.add_argument("--variant", choices=sorted(ENTRY_POINTS), default="vera")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch", default="8x64", help="BATCHxLENGTH")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    try:
        batch_size, length = (int(v) for v in args.batch.split("x"))
    except ValueError:
        parser.error(f"--batch must be BATCHxLENGTH, got {args.batch!r}")
    old = baseline_functional(args.baseline)
    module_name, entry = ENTRY_POINTS[args.variant]
    module = importlib.import_module(module_name)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    base = st.smollm2() if args.model == "smollm2" else st.tiny_llama()
    batch = st.make_batch(base.config.vocab_size, batch_size, length)
    baseline = st.ours_runner(args.variant, base, batch, label=f"baseline {args.baseline}")
    baseline.step = with_entry_point(baseline.step, module, entry, getattr(old, entry))
    new = st.ours_runner(args.variant, base, batch, label="working tree")
    peft = st.peft_runner(args.variant, base, batch)
    runners = [baseline, new, peft]
    print(f"{args.variant} on {args.model}, batch {batch_size}x{length}, {args.threads} threads, "
          f"{args.rounds} rounds after {args.warmup} warm-up (order reversed every other round)")
    for i in range(args.warmup + args.rounds):
        for runner in runners if i % 2 == 0 else runners[::-1]:
            runner.run(record=False)  # the first step absorbs the switch between models
            runner.run(record=i >= args.warmup)
        if i >= args.warmup:
            print(f"  round {i + 1 - args.warmup}: " + ", ".join(f"{r.label} {1000 * r.times[-1]:.0f} ms" for r in runners),
                  flush=True)
    for a, b in ((new, baseline), (baseline, peft), (new, peft)):
        low, high = st.median_interval(a, b)
        print(f"{a.label} / {b.label}: median {st.paired_ratio(a, b):.3f}, 95% bootstrap interval {low:.3f}–{high:.3f}")


if __name__ == "__main__":
    main()
