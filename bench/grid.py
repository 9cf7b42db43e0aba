"""The grid across machines on this machine: wall time of the 2 methods x 2 seeds tiny grid on 1 vs 2 Ray
worker processes, and what dispatching costs per training cell.

Each setting gets a fresh repository, local-folder DVC remote, MLflow server (sqlite) and Ray cluster
on 127.0.0.1 (the test's own helpers: tests/tiny_assets.py, tests/grid_services.py): `workers` nodes
of one CPU each. Per training cell, from the head's timings (`python -m pipeline.grid --timings`):

- round trip: submitted by the head -> result back (queueing in the cluster included);
- stage: the stage's own command as DVC ran it on the worker (process start, model load, training);
- training: `wall_seconds` of the cell's train_summary.json (the steps and validation alone);
- overhead: what the grid adds to the stage itself: the worker's clone, `dvc repro --pull`
  bookkeeping (restoring the upstream from the run-cache) and push (clone + repro - stage + push),
  plus the head's pull (its final `dvc repro --pull`) shared over the cells. The round trip also
  holds the time a cell waits for a free worker, which the head cannot tell apart.

    .venv/bin/python bench/grid.py                 # 1 and 2 workers, ~5 min on 2 cores
    .venv/bin/python bench/grid.py --workers 2     # one setting
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from grid_services import MlflowServer, RayCluster, ray_client_env  # noqa: E402
from tiny_assets import project_repo, save_tiny_model, small_pipeline_params  # noqa: E402

RUN = ["lora", "lora_fa"]
SEEDS = [0, 1]


def _run(args, cwd, env=None, timeout=1800):
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
            "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b", **(env or {})}
    done = subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def one(workers: int, steps: int, base: Path) -> dict:
    base.mkdir(parents=True)
    model = save_tiny_model(base / "tiny-model")
    params = small_pipeline_params(yaml.safe_load((ROOT / "params.yaml").read_text()), model,
                                   {name: {} for name in RUN}, steps=steps)
    params.update(seeds=SEEDS, lr_grid=[1])
    ray_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths
    try:
        return _measure(workers, base, params, repo_dir=base / "repo", ray_dir=ray_dir)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def _measure(workers: int, base: Path, params: dict, repo_dir: Path, ray_dir: Path) -> dict:
    with MlflowServer(base / "mlflow") as server, RayCluster(ray_dir, nodes=workers, cpus=1) as cluster:
        params["tracking"] = {**params["tracking"], "uri": server.uri}
        repo = project_repo(repo_dir, params, _run)
        _run(["dvc", "remote", "add", "-d", "shared", str(base / "remote")], repo)
        _run(["git", "commit", "-qam", "remote"], repo)
        started = time.monotonic()
        _run([sys.executable, "-m", "pipeline.grid", "--address", cluster.address, "--timings",
              str(base / "timings.json")], repo, env=ray_client_env())
        wall = time.monotonic() - started
    timings = json.loads((base / "timings.json").read_text())
    rows = []
    for name, cell in timings["cells"].items():
        if not name.startswith("train@"):
            continue
        variant, seed, label = name.split("@", 1)[1].rsplit("-", 2)
        summary = json.loads((repo / f"models/adapters/{variant}/seed{seed}/lr{label}/train_summary.json").read_text())
        s = cell["seconds"]
        rows.append({"round trip": cell["roundtrip"], "stage": s["stage"], "training": summary["wall_seconds"],
                     "worker overhead": s["clone"] + s["repro"] - s["stage"] + s["push"]})
    cells = len(timings["cells"])
    return {"workers": workers, "wall": wall, "head": timings["head"], "rows": rows,
            "pull per cell": timings["head"]["final repro"] / cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3, help="train.steps of each cell (default 3, the test's)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        for workers in args.workers:
            results.append(one(workers, args.steps, Path(tmp) / f"w{workers}"))
    med = statistics.median
    print(f"\n2 methods x 2 seeds, lr_grid [1], train.steps {args.steps}; 4 training + 5 evaluation cells; "
          f"{os.cpu_count()} cores\n")
    print("| Ray workers | grid wall s | head: upstream / wave 1 / selects / wave 2 / final repro s | "
          "train cell median: round trip / stage / training s | overhead per cell: worker + head pull = s | "
          "overhead / stage |")
    print("|---|---|---|---|---|---|")
    for r in results:
        h = r["head"]
        rt, st, tr = (med(x[k] for x in r["rows"]) for k in ("round trip", "stage", "training"))
        worker = med(x["worker overhead"] for x in r["rows"])
        over = worker + r["pull per cell"]
        print(f"| {r['workers']} | {r['wall']:.0f} | {h['upstream']:.0f} / {h['wave 1']:.0f} / {h['selects']:.0f} / "
              f"{h['wave 2']:.0f} / {h['final repro']:.0f} | {rt:.1f} / {st:.1f} / {tr:.2f} | "
              f"{worker:.1f} + {r['pull per cell']:.1f} = {over:.1f} | {over / st:.0%} |")
    print("\nround trip includes the time a cell waits for a free worker; stage: the stage's process as DVC ran it "
          "(start-up, model load, training); training: the steps alone (train_summary.json wall_seconds). "
          "For a cell of ~45 s (README's GPU estimate) the same overhead is "
          + ", ".join(f"{(r['pull per cell'] + med(x['worker overhead'] for x in r['rows'])) / 45:.0%}"
                      for r in results) + ".")

if __name__ == "__main__":
    main()
