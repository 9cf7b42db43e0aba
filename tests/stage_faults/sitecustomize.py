"""Fault injection for tests/test_distributed_stage.py: put this folder first on PYTHONPATH and set

    STAGE_FAULT=<rank>:<step>:<kind>     kind: kill (SIGKILL itself), raise (RuntimeError), nan (NaN loss),
                                         slowwrite (the outputs are written 3 s late; <step> unused)
    STAGE_FAULT_STAMP=<file>             the time.time() of the fault is written there first

Only the torchrun worker of that rank is touched: its `pipeline.lm.response_loss`, once imported,
misbehaves in its <step>-th training call (1-based; calls under no_grad, i.e. validation, are not
counted), or its `pipeline.files.commit_outputs` sleeps first. Python imports `sitecustomize` at
start-up in every process that sees this folder, so nothing in the pipeline knows about it.
"""

from __future__ import annotations

import os

FAULT = os.environ.get("STAGE_FAULT", "")


def _slow_writes(module) -> None:
    import time

    original = module.commit_outputs

    def commit_outputs(*args, **kwargs):
        with open(os.environ["STAGE_FAULT_STAMP"], "w") as handle:
            handle.write(repr(time.time()))
        time.sleep(3)
        return original(*args, **kwargs)

    module.commit_outputs = commit_outputs


def _wrap(module) -> None:
    import signal
    import time

    import torch

    _, step, kind = FAULT.split(":")
    original = module.response_loss
    calls = [0]

    def response_loss(model, batch):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == int(step):
                with open(os.environ["STAGE_FAULT_STAMP"], "w") as handle:
                    handle.write(repr(time.time()))
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "raise":
                    raise RuntimeError(f"injected fault in training call {step}")
                if kind == "nan":
                    return original(model, batch) * float("nan")
        return original(model, batch)

    module.response_loss = response_loss


if FAULT and "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK") == FAULT.split(":")[0]:
    import importlib.abc
    import importlib.util
    import sys

    TARGET, PATCH = ("pipeline.files", _slow_writes) if FAULT.endswith(":slowwrite") else ("pipeline.lm", _wrap)

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                PATCH(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())
