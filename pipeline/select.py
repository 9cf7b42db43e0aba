"""Stage `select@<variant>`: the variant's lr multiple, chosen on validation loss (never the test split).

    python -m pipeline.select <variant> --curves reports/curves/<variant> --adapters models/adapters/<variant> \
        --selection reports/selection/<variant>.json --validation reports/validation/<variant>.csv \
        --chosen models/selected/<variant>

A learning rate that happens to suit one method must not decide a comparison, and choosing it
on the test split would leak the test into the result. So each variant is trained at every
multiple of `lr_grid` (times its own lr) and every seed of `seeds`, and this stage picks one
multiple from the training curves' validation losses alone (the test split is not even on its
command line):

    score(f) = mean over seeds s of  L_val(s, f)     L_val: the curve's last validation loss
                                                      (lr_selection final_val_loss) or its lowest
                                                      (min_val_loss)
    chosen   = argmin_f score(f); ties -> the multiple nearest 1 (smallest |log f|), then the smaller

Only the curves of the cells that params name are read (pipeline/cells.py): a curve that an
earlier grid left in the folder is ignored. A missing curve is an error naming the train stage
that writes it. Writes, atomically:

- the selection (--selection, DVC metrics): {"variant", "lr_multiple", "lr", "criterion"} and
  nothing else, so adding a seed that keeps the choice leaves the file byte-identical and the
  evaluations of the earlier seeds are not rerun;
- the validation table (--validation): one row per cell (variant, seed, lr_multiple, lr,
  val_loss_final, val_loss_min, chosen); schema `validate_validation` (pipeline/schemas.py);
- the chosen adapters (--chosen): `seed<s>/`, a copy of each seed's adapter folder at the chosen
  multiple. `evaluate@<variant>-<s>` depends on exactly that copy: a new multiple that does not win,
  or a new seed, leaves the earlier copies byte-identical, so DVC reruns no earlier evaluation
  (DVC's cache holds the copy's files once: they are the train stage's, by content).

The stage builds no model: it skips the adapter specs' validation, imports neither torch nor
pandas, and starts in a fraction of a second.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
from pathlib import Path

from pipeline.cells import CRITERION_COLUMN, VALIDATION_COLUMNS, Cell, cells, seed_name
from pipeline.errors import DataError
from pipeline.files import commit_outputs
from pipeline.params import ParamsError
from pipeline.stage import start


def parse(argv: list[str] | None = None):
    """(arguments, params as `select@<variant>` may read them); params is None after a printed error."""
    return start("select", __doc__, argv, stage=lambda a: f"select@{a.variant}", adapter_specs=False,
                 positional=(("variant", {"help": "the variants.<name> entry of params.yaml"}),),
                 inputs={"--curves": "the variant's folder of training curves",
                         "--adapters": "the variant's folder of trained cells"},
                 outputs={"--selection": "the chosen lr multiple (JSON)",
                          "--validation": "every cell's validation loss (CSV)",
                          "--chosen": "the chosen cell's adapter of every seed (a folder)"})


def read_validation(path: Path, cell: Cell) -> dict:
    """A cell's final and lowest validation loss from its curve; both None for an imported adapter (no rows)."""
    if not path.is_file():
        raise DataError(f"no training curve {path} for seed {cell.seed}, lr multiple {cell.lr.label}: "
                        f"run {cell.stage} first (dvc repro {cell.stage})")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:  # an imported adapter (peft_adapter): nothing was trained, nothing validated
        return {"val_loss_final": None, "val_loss_min": None}
    losses = []
    for row in rows:
        text = (row.get("val_loss") or "").strip()
        value = float(text) if text else None
        if value is not None and not math.isfinite(value):
            raise DataError(f"{path}: validation loss {text!r} at step {row.get('step')} is not finite")
        losses.append(value)
    if losses[-1] is None:
        raise DataError(f"{path} has no validation loss at its last step (step {rows[-1].get('step')}); it was "
                        f"written by an older train stage: rerun {cell.stage}")
    return {"val_loss_final": losses[-1], "val_loss_min": min(v for v in losses if v is not None)}


def choose(scores: dict[float, float | None]) -> float:
    """The multiple with the lowest score; ties (and scores that are all missing) go to the multiple
    nearest 1 on a log scale, then to the smaller."""
    return min(scores, key=lambda f: (scores[f] is None, scores[f] or 0.0, abs(math.log(f)), f))


def select(variant: str, curves: Path, params) -> tuple[dict, list[dict]]:
    """(the selection, the validation rows) of `variant` from its curves under `curves`."""
    vcfg = params.get_variant(variant)
    grid, seeds, criterion = params.lr_grid, params.seeds, params.lr_selection
    trained = vcfg.peft_adapter is None  # an imported adapter has no lr
    lr = {p.label: vcfg.learning_rate(params.train, p.factor) if trained else None for p in grid}
    the_cells = cells(variant, seeds, grid)
    missing = [c for c in the_cells if not (curves / c.curve).is_file()]
    if missing:
        raise DataError(f"no training curve for {len(missing)} of the {len(the_cells)} cells of {variant} in "
                        f"{curves}: run {', '.join(c.stage for c in missing)} first")
    rows = [{"variant": variant, "seed": c.seed, "lr_multiple": c.lr.label, "lr": lr[c.lr.label],
             **read_validation(curves / c.curve, c)} for c in the_cells]
    column = CRITERION_COLUMN[criterion]
    scores: dict[float, float | None] = {}
    for point in grid:
        values = [r[column] for r in rows if r["lr_multiple"] == point.label]
        scores[point.factor] = None if any(v is None for v in values) else sum(values) / len(values)
    best = next(p for p in grid if p.factor == choose(scores))
    for row in rows:
        row["chosen"] = row["lr_multiple"] == best.label
    selection = {"variant": variant, "lr_multiple": best.label, "lr": lr[best.label], "criterion": criterion}
    return selection, rows


def chosen_adapters(variant: str, adapters: Path, params, label: str) -> list[tuple[Path, str]]:
    """(the adapter folder, its name below --chosen) of every seed at the chosen multiple; a DataError
    naming the train stage when one is missing."""
    picked = [c for c in cells(variant, params.seeds, params.lr_grid) if c.lr.label == label]
    out = []
    for cell in picked:
        folder = adapters / cell.adapter
        if not (folder / "train_summary.json").is_file():
            raise DataError(f"no trained adapter in {folder} (train_summary.json is missing): run {cell.stage} "
                            f"(dvc repro {cell.stage})")
        out.append((folder, seed_name(cell.seed)))
    return out


def copy_adapters(found: list[tuple[Path, str]]):
    """The --chosen folder's writer: one copy per seed."""
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for folder, name in found:
            shutil.copytree(folder, tmp / name)
    return write


def validation_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=VALIDATION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    args, params = parse(argv)
    if params is None:
        return 1
    try:
        selection, rows = select(args.variant, Path(args.curves), params)
        found = chosen_adapters(args.variant, Path(args.adapters), params, selection["lr_multiple"])
    except (ParamsError, DataError) as err:
        print(f"select@{args.variant}: {err}", file=sys.stderr)
        return 1
    commit_outputs({args.selection: json.dumps(selection, indent=2, sort_keys=True) + "\n",
                    args.validation: validation_csv(rows)}, {args.chosen: copy_adapters(found)})
    column = CRITERION_COLUMN[selection["criterion"]]
    shown = ", ".join(f"x{r['lr_multiple']} seed {r['seed']}: {r[column]:.4f}" if r[column] is not None else
                      f"x{r['lr_multiple']} seed {r['seed']}: none" for r in rows)
    print(f"select@{args.variant}: lr multiple {selection['lr_multiple']} ({selection['criterion']}; {shown})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
