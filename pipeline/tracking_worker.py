"""The MLflow half of pipeline/tracking.py, in a process of its own.

Importing mlflow costs ~1.5 s of CPU (~1700 modules: its GenAI, gateway and data packages come
with `mlflow.tracking`), and the store connection another ~0.2 s. A stage that tracks starts
this process first thing (`tracking.preload`, from `stage.start`), so that the import runs on
the second core while the stage itself spends its first seconds single-threaded importing
transformers and loading the model; the stage process never imports mlflow.

Protocol: JSON lines — `[operation, args]` requests on stdin, one `[ok, result or error
text]` reply per request on the file descriptor named in argv[1], in order. Every request
waits for its reply, so the store sees exactly the calls, in exactly the order, that an
in-process client would make. End of stdin (the stage exited, or was killed) ends the process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any


class Store:
    """One MlflowClient (one store connection) and the operations Tracker needs, on plain values."""

    def __init__(self):
        from mlflow.tracking import MlflowClient  # the import this process exists for

        self._client_class = MlflowClient
        self.client = None
        self.key: tuple[str, str] | None = None
        self.experiment_id: str | None = None

    def connect(self, uri: str, experiment: str, artifact_location: str | None) -> str:
        """The id of `experiment` in the store at `uri` (created with `artifact_location` if new;
        None: the store's default)."""
        if self.key == (uri, experiment):
            return self.experiment_id
        client = self._client_class(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:
                found = client.get_experiment_by_name(experiment)  # a parallel stage created it first
                if found is None:
                    raise
                experiment_id = found.experiment_id
        self.client, self.key, self.experiment_id = client, (uri, experiment), experiment_id
        return experiment_id

    def create_run(self, experiment_id: str, start_ms: int, tags: dict[str, str], run_name: str) -> str:
        return self.client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run_name).info.run_id

    def continue_run(self, run_id: str) -> None:
        self.client.get_run(run_id)
        self.client.update_run(run_id, status="RUNNING")

    def log_batch(self, run_id: str, metrics: list[tuple[str, float, int, int]] = (),
                  params: list[tuple[str, str]] = ()) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_artifacts(self, run_id: str, folder: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, folder, artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Tags on any run of the store (compare marks every member run with its comparison run)."""
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def set_terminated(self, run_id: str, status: str, end_ms: int) -> None:
        self.client.set_terminated(run_id, status, end_ms)


def serve(requests, replies) -> None:
    store: Store | None = None
    failed: str | None = None
    gc.disable()  # as in a stage (pipeline/__init__.py): no collections while ~1700 modules load
    try:
        store = Store()
    except Exception as err:  # e.g. mlflow missing: every request gets this error
        failed = f"{type(err).__name__}: {err}"
    gc.freeze()
    gc.enable()
    while True:
        try:
            line = requests.readline()
        except OSError:
            return
        if not line:
            return
        operation, args = json.loads(line)
        reply: tuple[bool, Any]
        if store is None:
            reply = (False, failed)
        else:
            try:
                reply = (True, getattr(store, operation)(*args))
            except Exception as err:
                reply = (False, f"{type(err).__name__}: {err}")
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


if __name__ == "__main__":
    with os.fdopen(int(sys.argv[1]), "wb") as out:
        serve(sys.stdin.buffer, out)
    # Every request was answered after the store had it, so nothing is left to write: skip the
    # interpreter's teardown of ~1700 modules (2-4 s, and the stage waits for this process).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
