"""What every stage script does first: parse its command line, load params.yaml, clear leftovers.

dvc.yaml is the one map of the data: each stage gets every file and folder it reads (`inputs`)
or writes (`outputs`) as a command-line argument from its `cmd:` there, so no stage imports
another's paths. The whole params file is validated first (a mistake anywhere fails every
stage at once, before any work); the stage then sees only the keys dvc.yaml declares for it
(pipeline/declared.py). Staging files that a killed earlier run left beside this stage's
outputs are removed before it starts (pipeline/files.py). A stage that tracks its run in MLflow
starts MLflow's worker process here (pipeline/tracking.py), so that it loads meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline.declared import StageParams, restrict
from pipeline.files import remove_leftovers
from pipeline.params import ParamsError, load_params


def start(module: str, doc: str, argv: list[str] | None, *,
          stage: Callable[[argparse.Namespace], str] | None = None,
          positional: tuple[tuple[str, dict[str, Any]], ...] = (),
          inputs: dict[str, str] | None = None, outputs: dict[str, str] | None = None,
          options: tuple[tuple[str, dict[str, Any]], ...] = (),
          adapter_specs: bool = True,
          ) -> tuple[argparse.Namespace, StageParams | None]:
    """(arguments, params); params is None after an error message naming the bad key was printed.

    `module` is the script (pipeline.<module>) and, unless `stage` (a function of the
    arguments, e.g. `train@<variant>`) says otherwise, its dvc.yaml stage name. `inputs` and
    `outputs` map path options ("--base") to their help; all are required, and leftovers of
    killed writes beside each output are removed. `options` are further argparse arguments.
    `adapter_specs=False`: a stage that builds no model skips the adapter specs' validation
    (and with it torch's import; pipeline/params.py).
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{module}", description=doc.strip().splitlines()[0])
    for name, kwargs in positional:
        parser.add_argument(name, **kwargs)
    for flag, help_text in (inputs or {}).items():
        parser.add_argument(flag, required=True, metavar="PATH", help=f"(read) {help_text}")
    for flag, help_text in (outputs or {}).items():
        parser.add_argument(flag, required=True, metavar="PATH", help=f"(written) {help_text}")
    for name, kwargs in options:
        parser.add_argument(name, **kwargs)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = parser.parse_args(argv)
    name = stage(args) if stage is not None else module
    running = os.environ.get("DVC_STAGE", "").rsplit(":", 1)[-1]
    if running and running != name:  # DVC says which stage it runs: the declarations must be that stage's
        parser.error(f"dvc.yaml runs this command as stage {running!r}, but its arguments make it {name!r}")
    try:
        params = restrict(load_params(args.params, adapter_specs), name)
    except ParamsError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return args, None
    remove_leftovers(getattr(args, flag.lstrip("-").replace("-", "_")) for flag in (outputs or {}))
    if "tracking" in params.declared and params.tracking.enabled and os.environ.get("RANK", "0") == "0":
        # MLflow's imports, in a worker process, beside this stage's start-up
        # (under torchrun only rank 0 tracks: the other ranks start none)
        from pipeline.tracking import preload

        preload()
    return args, params
