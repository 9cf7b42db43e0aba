"""Ray's part of the grid: connect, run one wave of cells as Ray tasks, report progress.

Ray is the optional extra `.[cluster]`: imported here only, and only when a wave is dispatched.
One task per cell, with the cell's resource request (pipeline.grid_plan.resources). Ray retries
a task whose worker process died (`max_retries`: a lost node, an OOM kill) on any node; a cell
that fails by itself (a NaN loss, a bad input) is a result, not an exception, so it is reported
once and never retried. The task body is pipeline/grid_worker.py, shipped by value so that a
worker needs this project's dependencies but not this checkout on its path.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from pipeline import grid_worker
from pipeline.grid_plan import GridError, Task

PROGRESS_EVERY = 20.0  # seconds between progress lines while nothing finishes


def _ray():
    try:
        import ray
    except ImportError:
        raise GridError("Ray is not installed: pip install -e '.[cluster]' (the optional extra)") from None
    return ray


def connect(address: str, workers: int | None = None) -> None:
    """`auto`: the cluster this machine belongs to (RAY_ADDRESS or a local `ray start`); `local`: a
    one-machine Ray started here with `workers` CPUs; else a cluster's address (host:port, ray://...)."""
    ray = _ray()
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    try:
        if address == "local":
            ray.init(num_cpus=workers, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise GridError(f"--address {address}: cannot connect to a Ray cluster: {err}") from None
    # the task body travels by value: workers need not have this checkout importable
    ray.cloudpickle.register_pickle_by_value(grid_worker)


def shutdown() -> None:
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


def _line(label: str, done: int, failed: int, total: int, started: float) -> str:
    elapsed = time.monotonic() - started
    left = total - done - failed
    eta = f"{elapsed / (done + failed) * left:.0f} s" if done + failed else "?"
    return (f"[grid] {label}: {done}/{total} done, {left} running or queued, {failed} failed, "
            f"{elapsed:.0f} s elapsed, ETA {eta}")


def run_wave(label: str, tasks: Sequence[Task], url: str, commit: str, env: dict[str, str], retries: int = 2,
             workdir: str | None = None, cell_timeout: float | None = None) -> dict[str, dict]:
    """Run `tasks` on the cluster; task name -> the worker's result (see grid_worker.run_cell), a
    worker death past `retries` reported as a failed result."""
    ray = _ray()
    if not tasks:
        return {}
    remote = ray.remote(grid_worker.run_cell)
    refs = {}
    for task in tasks:
        ref = remote.options(num_cpus=task.num_cpus, num_gpus=task.num_gpus, max_retries=retries,
                             retry_exceptions=False, name=f"grid {task.name}").remote(
            url, commit, list(task.stages), env, workdir, cell_timeout)
        refs[ref] = task
    started = time.monotonic()
    submitted = {task.name: time.monotonic() for task in tasks}
    results: dict[str, dict] = {}
    pending = list(refs)
    print(_line(label, 0, 0, len(tasks), started), flush=True)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_EVERY)
        for ref in ready:
            task = refs[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died more often than retries allow, ...
                result = {"stages": list(task.stages), "ok": False, "ran": [], "seconds": {},
                          "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]} "
                                   f"(after {retries} retries)"}
            result["roundtrip"] = time.monotonic() - submitted[task.name]
            results[task.name] = result
            state = "done" if result["ok"] else f"FAILED: {result['error']}"
            if result.get("log"):
                state += f" (its log: {result['log']} on that node)"
            phases = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items() if k != "total")
            print(f"[grid] {task.name} on {result.get('host', '?')}: {state} ({result['roundtrip']:.1f} s round trip; "
                  f"{phases or 'no phase timed'})", flush=True)
        done = sum(r["ok"] for r in results.values())
        print(_line(label, done, len(results) - done, len(tasks), started), flush=True)
    return results
