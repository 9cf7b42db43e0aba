"""How much of a full `dvc repro` is the work it is there for: training and evaluation compute.

Runs `dvc repro --force` in a checkout (every stage, as after a change to every stage's command),
times it, and sums the compute the stages report in their outputs:

- every train cell: `train_seconds` (training steps) and `wall_seconds` (steps + validation) of its
  train_summary.json;
- every evaluation: `eval_seconds` of its metrics file (test loss + generation).

The rest of the wall time is overhead: process start, imports, model loads, MLflow, DVC's own
hashing and bookkeeping, and the stages that do no training or evaluation (prepare, base,
quantize, select, compare, focus).

    python bench/repro_fraction.py --repo .            # ~10 min on 2 cores for the default comparison
    python bench/repro_fraction.py --repo . --no-run   # only sum what the last run wrote (no wall time)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def compute_seconds(repo: Path) -> dict[str, float]:
    """Steps, validation and evaluation seconds (and counts) from the checkout's outputs."""
    cells = [json.loads(p.read_text()) for p in (repo / "models/adapters").rglob("train_summary.json")]
    evals = [json.loads(p.read_text())["eval_seconds"] for p in (repo / "reports/metrics").rglob("*.json")]
    steps = sum(c["train_seconds"] for c in cells)
    return {"cells": len(cells), "steps": steps, "validation": sum(c["wall_seconds"] for c in cells) - steps,
            "evaluations": len(evals), "evaluation": sum(evals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the checkout (default: .)")
    parser.add_argument("--no-run", action="store_true", help="do not run dvc repro; sum the existing outputs")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    wall = None
    stages = None
    if not args.no_run:
        started = time.perf_counter()
        # `python` in the stages' commands is this interpreter (the virtualenv's), as with `make repro`
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=repo, capture_output=True,
                              text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        stages = done.stdout.count("Running stage '")
    c = compute_seconds(repo)
    compute = c["steps"] + c["validation"] + c["evaluation"]
    print("| quantity | value |\n|---|---:|")
    print(f"| train cells: training steps / validation | {c['cells']}: {c['steps']:.1f} s / {c['validation']:.1f} s |")
    print(f"| evaluations | {c['evaluations']}: {c['evaluation']:.1f} s |")
    if wall is not None:
        print(f"| `dvc repro --force` wall ({stages} stages) | {wall:.1f} s |")
        print(f"| overhead (wall - compute) | {wall - compute:.1f} s, {(wall - compute) / stages:.2f} s per stage |")
        print(f"| **compute fraction** (steps + validation + evaluation) | **{compute / wall:.1%}** |")
        print(f"| compute fraction without validation | {(compute - c['validation']) / wall:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
