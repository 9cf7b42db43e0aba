"""Stage `focus`: the headline metrics of the variant named by the `variant` param, over the seeds.

    python -m pipeline.focus --metrics reports/metrics/${variant} --out reports/focus.json

Reads the variant's test metrics of every seed of `seeds` (`<metrics>/seed<s>.json`,
pipeline/cells.py; each on the lr multiple `select` chose) and writes their mean, the chosen lr
multiple and lr, and every seed's values. `dvc exp run -S variant=vera` changes only this
stage's parameter, so it re-runs nothing but this: reports/focus.json (declared as DVC metrics)
then holds vera's numbers and `dvc exp show` lists them per experiment. Add
`-S variants.vera.r=512` to retrain vera (and only vera) in the same experiment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.cells import seed_file
from pipeline.errors import DataError
from pipeline.files import atomic_write_json
from pipeline.stage import start

HEADLINE = ("phoneme_error_rate", "exact_match", "eval_loss", "trainable_params", "adapter_bytes",
            "training_memory_bytes", "train_seconds", "tokens_per_second")


def mean(values: list) -> float | None:
    """The mean over seeds; None when a value is missing (no phoneme error rate outside G2P)."""
    if any(v is None for v in values):
        return None
    return values[0] if len(set(values)) == 1 else sum(values) / len(values)  # (an int stays an int)


def focus_row(variant: str, seeds, folder: Path) -> dict:
    """The headline metrics of `variant`: mean over `seeds`, the chosen lr, and each seed's values."""
    rows = {}
    for seed in seeds:
        path = folder / seed_file(seed, ".json")
        if not path.is_file():
            raise DataError(f"no test metrics {path} for seed {seed}: run evaluate@{variant}-{seed} first")
        row = json.loads(path.read_text())
        if (row.get("variant"), row.get("seed")) != (variant, seed):
            raise DataError(f"{path} holds the metrics of {row.get('variant')!r} seed {row.get('seed')!r}, not of "
                            f"variant {variant!r} seed {seed}")
        rows[seed] = row
    chosen = {(r.get("lr_multiple"), r.get("lr")) for r in rows.values()}
    if len(chosen) != 1:  # select@<variant> chooses one multiple for all seeds
        raise DataError(f"the metrics in {folder} come from different lr multiples {sorted(map(str, chosen))}: "
                        f"rerun evaluate@{variant}-<seed> for the seeds of {seeds}")
    (multiple, lr), = chosen
    return {"variant": variant, **{k: mean([r[k] for r in rows.values()]) for k in HEADLINE},
            "lr_multiple": multiple, "lr": lr, "seeds": list(seeds),
            "per_seed": {str(s): {k: r[k] for k in HEADLINE} for s, r in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    args, params = start("focus", __doc__, argv,
                         inputs={"--metrics": "the headline variant's folder of per-seed metrics"},
                         outputs={"--out": "the headline metrics (DVC metrics)"})
    if params is None:
        return 1
    try:
        focus = focus_row(params.variant, params.seeds, Path(args.metrics))
    except DataError as err:
        print(f"focus: {err}", file=sys.stderr)
        return 1
    atomic_write_json(args.out, focus)
    per = focus["phoneme_error_rate"]
    print(f"focus: {params.variant} (lr x{focus['lr_multiple']}, mean of {len(params.seeds)} seed(s)): "
          + (f"PER {per:.3f}, " if per is not None else "")
          + f"exact match {focus['exact_match']:.3f}, {focus['trainable_params']:,.0f} trainable params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
