"""MLflow holds each grid cell once, even when a worker died mid-cell and Ray retried it elsewhere.

A training run continues its MLflow run only from a local checkpoint (pipeline/train.py); a retry
on another worker starts from scratch in a fresh clone, so the killed attempt's run stays behind,
never finished (RUNNING, or FAILED). Once the cell has succeeded in this grid, those runs of it
(same stage, variant, seed, lr multiple and git commit, not FINISHED) are deleted; the finished
run, the one the pushed adapter folder names, stays. A cell that failed keeps its failed run:
it is the record of why.
"""

from __future__ import annotations

import os


def _filter(commit: str, stage: str, variant: str, seed: int, label: str | None) -> str:
    parts = [f"tags.stage = '{stage}'", f"tags.variant = '{variant}'", f"tags.seed = '{seed}'",
             f"tags.git_commit = '{commit}'", "attributes.status != 'FINISHED'"]
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


def remove_unfinished(uri: str | None, experiment: str, commit: str, succeeded: list[str],
                      cells: dict[str, tuple[str, int, str]]) -> int:
    """Delete the unfinished runs of the `succeeded` train@/evaluate@ stages; how many were deleted."""
    if uri is None or not succeeded:
        return 0
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    removed = 0
    for name in succeeded:
        if name.startswith("train@"):
            variant, seed, label = cells[name]
            query = _filter(commit, "train", variant, seed, label)
        elif name.startswith("evaluate@"):
            variant, seed = name.split("@", 1)[1].rsplit("-", 1)
            query = _filter(commit, "evaluate", variant, int(seed), None)
        else:
            continue
        for run in client.search_runs([found.experiment_id], filter_string=query, max_results=100):
            client.delete_run(run.info.run_id)
            removed += 1
    return removed
