"""Run the comparison grid across machines: `python -m pipeline.grid --address auto|local|<ray address>`.

DVC runs stages one after another and its experiment queue has local workers only; this spreads
the cells over a Ray cluster and keeps DVC and MLflow as the record. The head (this process, in
the repository):

1. checks everything before anything is dispatched (pipeline/grid_plan.py): params, a clean
   commit, a default DVC remote in the project config, a tracking server every worker reaches,
   the cluster;
2. runs prepare, base and quantize itself and pushes them with the run-cache;
3. wave 1: one Ray task per training cell, plus evaluate_base; each worker clones the commit,
   `dvc repro --pull`s its stage (the upstream comes from the run-cache) and pushes
   (pipeline/grid_worker.py). Cells already in the remote's run-cache are not dispatched;
4. runs the selections (torch-free, seconds) and pushes them;
5. wave 2: one task per evaluation cell;
6. `dvc repro --pull`: every cell is restored from the run-cache, only compare and focus run, and
   the report is the one a single machine would have written.

MLflow: every worker logs to the server of tracking.uri. A cell retried after its worker died
left a run that never finished; once the cell has succeeded, the head deletes such runs of it
(pipeline/grid_tracking.py), so the store holds each cell once.

Exit status 0 when every cell succeeded and the report was written; 1 with a summary naming each
failed cell and why (the other cells still run); 2 when a check fails before anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import grid_plan, grid_worker
from pipeline.cells import select_stage
from pipeline.grid_plan import GridError, Plan, Task


def _dvc(repo: Path, *args: str, what: str) -> str:
    """Run a dvc command on the head, its output streamed to ours; GridError naming `what` if it fails."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print(f"  {line}", end="", flush=True)
    if proc.wait() != 0:
        errors = [line.strip() for line in lines if line.startswith("ERROR")] or [line.strip() for line in lines[-3:]]
        raise GridError(f"{what}: dvc {' '.join(args)} failed: {errors[-1] if errors else 'no output'}")
    return "".join(lines)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stages' `python`
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


ran = grid_worker.ran  # the stages a `dvc repro` actually ran, from its output


def check_tracking_server(uri: str | None) -> None:
    """The tracking server answers (its /health); else GridError, before any work."""
    if uri is None:
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as reply:
            reply.read()
    except OSError as err:
        raise GridError(f"params.yaml: tracking.uri {uri} is unreachable ({err}); start the MLflow server or fix "
                        "the URI") from None


def cached(repo: Path, stages: list[str]) -> set[str]:
    """Those of `stages` whose run (same code, params and inputs) the DVC run-cache already holds:
    they need no worker. Uses DVC's own run-cache lookup; any doubt means 'not cached' (a worker's
    `dvc repro --pull` would restore it anyway, at the cost of a dispatch)."""
    from dvc.repo import Repo

    found = set()
    with Repo(str(repo)) as dvc_repo:
        for name in stages:
            try:
                stage = dvc_repo.stage.collect(name)[0]
                stage.save_deps()
                if dvc_repo.stage_cache._load(stage):  # noqa: SLF001 - DVC's lookup, the one repro uses
                    found.add(name)
            except Exception:  # noqa: BLE001 - see the docstring
                continue
    return found


def _failed(results: dict[str, dict]) -> dict[str, str]:
    return {name: r["error"] for name, r in results.items() if not r["ok"]}


def run(plan: Plan, address: str, workers: int | None, retries: int, workdir: str | None,
        cell_timeout: float | None, timings: str | None = None) -> int:
    from pipeline import grid_dispatch, grid_tracking

    repo = plan.repo
    started = time.monotonic()
    grid_dispatch.connect(address, workers)
    failures: dict[str, str] = {}
    record: dict = {"cells": {}, "head": {}}
    try:
        print(f"[grid] head: {', '.join(grid_plan.UPSTREAM)} (here), then pushed to DVC remote '{plan.remote}'",
              flush=True)
        t0 = time.monotonic()
        _dvc(repo, "repro", "--pull", *grid_plan.UPSTREAM, what="the upstream stages")
        _dvc(repo, "push", "--run-cache", *grid_plan.UPSTREAM, what=f"pushing to the DVC remote '{plan.remote}'")
        record["head"]["upstream"] = time.monotonic() - t0

        _dvc(repo, "fetch", "--run-cache", "--quiet", *grid_plan.UPSTREAM, what="reading the remote's run-cache")
        grid_tracking.ensure_experiment(plan.tracking_uri, plan.experiment)
        env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
        wave = dict(workdir=workdir, cell_timeout=cell_timeout, retries=retries, env=env)
        t0 = time.monotonic()
        results = _wave("wave 1 (training)", plan.train, plan, repo, wave)
        record["head"]["wave 1"] = time.monotonic() - t0
        failures.update(_failed(results))

        bad_variants = {t.variant for t in plan.train if t.name in failures and t.variant is not None}
        selects = [select_stage(v) for v in plan.variants if v not in bad_variants]
        t0 = time.monotonic()
        if selects:
            print(f"[grid] head: {', '.join(selects)}", flush=True)
            _dvc(repo, "repro", "--pull", *selects, what="the selections")
            _dvc(repo, "push", "--run-cache", *selects, what="pushing the selections")
        record["head"]["selects"] = time.monotonic() - t0
        evaluate = [t for t in plan.evaluate if t.variant not in bad_variants]
        t0 = time.monotonic()
        results2 = _wave("wave 2 (evaluation)", evaluate, plan, repo, wave)
        record["head"]["wave 2"] = time.monotonic() - t0
        failures.update(_failed(results2))
        record["cells"] = {**results, **results2}

        # a cell retried after a dead worker: the killed attempt's run goes (the newest one stays)
        done = {n for n, r in {**results, **results2}.items() if r["ok"]}
        good = [t for t in (*plan.train, *plan.evaluate) if t.name in done]
        removed = grid_tracking.remove_repeats(plan.tracking_uri, plan.experiment, plan.commit, good)
        if removed:
            print(f"[grid] MLflow: removed {removed} run(s) of killed attempts of retried cells", flush=True)

        if failures:
            return _summary(failures, started, plan)
        print("[grid] head: dvc repro --pull (every cell from the run-cache; compare and focus run here)", flush=True)
        t0 = time.monotonic()
        output = _dvc(repo, "repro", "--pull", what="the final dvc repro")
        record["head"]["final repro"] = time.monotonic() - t0
        here = ran(output)
        print(f"[grid] head ran: {', '.join(here) or 'nothing'}", flush=True)
        stray = [s for s in here if s.startswith(("train@", "evaluate@", "evaluate_base"))]
        if stray:  # the run-cache missed: correct results, but computed here, not on the cluster
            print(f"[grid] WARNING: the head re-ran {', '.join(stray)} (not restored from the run-cache)", flush=True)
        print(f"[grid] all {len(plan.train) + len(plan.evaluate)} cells done in {time.monotonic() - started:.0f} s; "
              "report in reports/", flush=True)
        return 0
    except GridError as err:
        failures["head"] = str(err)
        return _summary(failures, started, plan)
    finally:
        grid_dispatch.shutdown()
        if timings:
            record["head"]["total"] = time.monotonic() - started
            record["failures"] = failures
            Path(timings).write_text(json.dumps(record, indent=1, default=str))


def _wave(label: str, tasks: tuple[Task, ...] | list[Task], plan: Plan, repo: Path, options: dict) -> dict:
    from pipeline import grid_dispatch

    names = [t.stages[0] for t in tasks]
    skip = cached(repo, names) if tasks else set()
    if skip:
        print(f"[grid] {label}: {len(skip)} cell(s) already in the run-cache, not dispatched: {', '.join(sorted(skip))}",
              flush=True)
    todo = [t for t in tasks if t.stages[0] not in skip]
    return grid_dispatch.run_wave(label, todo, plan.url, plan.commit, **options)


def _summary(failures: dict[str, str], started: float, plan: Plan) -> int:
    total = len(plan.train) + len(plan.evaluate)
    print(f"[grid] FAILED after {time.monotonic() - started:.0f} s: {len(failures)} of {total} cell(s) or steps:",
          file=sys.stderr, flush=True)
    for name, why in failures.items():
        print(f"  {name}: {why}", file=sys.stderr, flush=True)
    print("[grid] the cells that succeeded are in the DVC remote's run-cache: fix the cause and run the grid again; "
          "only the failed cells are dispatched", file=sys.stderr, flush=True)
    return 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="auto",
                    help="auto: the Ray cluster of this machine (RAY_ADDRESS or `ray start`); local: start a "
                         "one-machine Ray here; else host:port of a cluster's head, or ray://host:10001")
    ap.add_argument("--workers", type=int, default=None, help="with --address local: CPUs Ray may use (default all)")
    ap.add_argument("--repo-url", default=None,
                    help="what workers clone (default: git remote origin, else this folder)")
    ap.add_argument("--retries", type=int, default=2, help="retries of a cell whose worker died (default 2)")
    ap.add_argument("--workdir", default=None, help="where workers make their clones (default: their temp dir)")
    ap.add_argument("--cell-timeout", type=float, default=None, help="seconds after which a cell is killed and failed")
    ap.add_argument("--timings", default=None, help="write each cell's result and phase times (JSON) to this file")
    ap.add_argument("--plan", action="store_true", help="print the checked plan and exit (dispatches nothing)")
    args = ap.parse_args(argv)
    if args.workers is not None and (args.workers < 1 or args.address != "local"):
        ap.error(f"--workers must be a positive number, with --address local only (got {args.workers})")
    if args.retries < 0:
        ap.error(f"--retries must be >= 0, got {args.retries}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        plan = grid_plan.plan(Path.cwd(), args.repo_url)
        check_tracking_server(plan.tracking_uri)
    except GridError as err:
        print(f"grid: {err}", file=sys.stderr)
        return 2
    print(f"[grid] commit {plan.commit[:10]}: {len(plan.train)} training task(s), {len(plan.selects)} selection(s), "
          f"{len(plan.evaluate)} evaluation task(s); workers clone {plan.url}; DVC remote '{plan.remote}'; "
          f"MLflow {plan.tracking_uri or 'off'}", flush=True)
    if args.plan:
        for task in (*plan.train, *plan.evaluate):
            print(f"  {task.name}: {task.num_cpus:g} CPU, {task.num_gpus:g} GPU")
        return 0
    try:
        return run(plan, args.address, args.workers, args.retries, args.workdir, args.cell_timeout, args.timings)
    except GridError as err:
        print(f"grid: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
