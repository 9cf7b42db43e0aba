"""What every stage script does first: parse its command line and load params.yaml, or say why not."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.params import Params, ParamsError, load_params


def start(stage: str, doc: str, argv: list[str] | None,
          positional: tuple[tuple[str, dict[str, Any]], ...] = ()) -> tuple[argparse.Namespace, Params | None]:
    """(arguments, params); params is None after an error message naming the bad key was printed."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=doc.strip().splitlines()[0])
    for name, kwargs in positional:
        parser.add_argument(name, **kwargs)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        return args, load_params(args.params)
    except ParamsError as err:
        print(f"{stage}: {err}", file=sys.stderr)
        return args, None
