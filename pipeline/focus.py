"""Stage `focus`: the headline metrics of the variant named by the `variant` param.

    python -m pipeline.focus --metrics reports/metrics/${variant}.json --out reports/focus.json

`dvc exp run -S variant=vera` changes only this stage's parameter, so it re-runs nothing
but this: reports/focus.json (declared as DVC metrics) then holds vera's numbers and
`dvc exp show` lists them per experiment. Add `-S variants.vera.r=512` to retrain vera
(and only vera) in the same experiment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.files import atomic_write_json
from pipeline.stage import start

HEADLINE = ("phoneme_error_rate", "exact_match", "eval_loss", "trainable_params", "adapter_bytes",
            "training_memory_bytes", "train_seconds", "tokens_per_second")


def main(argv: list[str] | None = None) -> int:
    args, params = start("focus", __doc__, argv, inputs={"--metrics": "the headline variant's metrics row"},
                         outputs={"--out": "the headline metrics (DVC metrics)"})
    if params is None:
        return 1
    row = json.loads(Path(args.metrics).read_text())
    if row.get("variant") != params.variant:
        print(f"focus: {args.metrics} holds the metrics of {row.get('variant')!r}, not of variant "
              f"{params.variant!r}", file=sys.stderr)
        return 1
    focus = {"variant": params.variant, **{k: row[k] for k in HEADLINE}}
    atomic_write_json(args.out, focus)
    per = focus["phoneme_error_rate"]
    print(f"focus: {params.variant}: " + (f"PER {per:.3f}, " if per is not None else "")
          + f"exact match {focus['exact_match']:.3f}, {focus['trainable_params']:,} trainable params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
