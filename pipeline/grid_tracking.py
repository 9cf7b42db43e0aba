"""MLflow holds each grid cell once, even when a worker died mid-cell and Ray retried it elsewhere.

A training run continues its MLflow run only from a local checkpoint (pipeline/train.py); a retry
on another worker starts from scratch in a fresh clone, so the killed attempt's run stays behind:
usually never finished (RUNNING), but FINISHED when the worker died after the stage ended and
before its push. Once the cell has succeeded in this grid, every run of it (same stage, variant,
seed, lr multiple and git commit) but the newest is deleted: the retry started after the attempt it
repeats, and its run is the one the pushed adapter folder names. A cell that failed keeps its
failed run: it is the record of why.
"""

from __future__ import annotations

import os


def _filter(commit: str, stage: str, variant: str, seed: int, label: str | None) -> str:
    parts = [f"tags.stage = '{stage}'", f"tags.variant = '{variant}'", f"tags.seed = '{seed}'",
             f"tags.git_commit = '{commit}'"]
    if label is not None:
        parts.append(f"tags.lr_multiple = '{label}'")
    return " and ".join(parts)


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str | None, experiment: str) -> None:
    """Create the experiment on the server (with the server's own artifact store) once, before the
    workers' first stages would race to create it."""
    if uri is None:
        return
    client = _client(uri)
    if client.get_experiment_by_name(experiment) is None:
        try:
            client.create_experiment(experiment)
        except Exception:  # noqa: BLE001 - created meanwhile by someone else: fine, it exists
            if client.get_experiment_by_name(experiment) is None:
                raise


def remove_repeats(uri: str | None, experiment: str, commit: str, succeeded) -> int:
    """Delete the runs of earlier attempts of the `succeeded` cells (grid_plan.Task: training and evaluation cells
    of a variant; evaluate_base logs no MLflow run); how many were deleted."""
    if uri is None or not succeeded:
        return 0
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    removed = 0
    for task in succeeded:
        if task.variant is None:  # evaluate_base: logs no MLflow run
            continue
        query = _filter(commit, task.kind, task.variant, task.seed, task.lr_label)
        runs = client.search_runs([found.experiment_id], filter_string=query, max_results=100,
                                  order_by=["attributes.start_time DESC"])
        for run in runs[1:]:  # all but the newest: the attempt that succeeded
            client.delete_run(run.info.run_id)
            removed += 1
    return removed
