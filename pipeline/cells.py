"""The comparison grid: one cell per (variant, training seed, lr multiple), and how its files are named.

A run trains every variant of `run` once per seed of `seeds` and per multiple of `lr_grid`
(each multiple times the variant's own lr: VeRA's grid sits around its 2e-2, LoRA's around 2e-3).
dvc.yaml spans the cells with `matrix:`; DVC names a cell's stage `train@<variant>-<seed>-<label>`
(the label is DVC's print of the lr_grid value, `params.lr_label`) and passes every path on the
stage's command line. Below a folder that a command line names, the per-cell files are named
here, once, for the stage that writes them and the stages that read them:

    models/adapters/<variant>/seed<s>/lr<label>/     train@<variant>-<s>-<label>  (the adapter)
    reports/curves/<variant>/seed<s>-lr<label>.csv   train@<variant>-<s>-<label>  (its loss curve)
    reports/selection/<variant>.json                 select@<variant>   (the chosen lr multiple)
    reports/validation/<variant>.csv                 select@<variant>   (every cell's validation loss)
    models/selected/<variant>/seed<s>/               select@<variant>   (a copy of the seed's chosen cell)
    reports/metrics/<variant>/seed<s>.json           evaluate@<variant>-<s>  (test metrics, chosen lr)
    reports/predictions/<variant>/seed<s>.jsonl      evaluate@<variant>-<s>
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params import LrPoint

# select@<variant>'s validation table (reports/validation/<variant>.csv): one row per cell, and the
# column each `lr_selection` criterion scores. Here, free of pandas, for the stage that writes it
# (torch- and pandas-free) and the ones that read it (schemas, compare).
VALIDATION_COLUMNS = ("variant", "seed", "lr_multiple", "lr", "val_loss_final", "val_loss_min", "chosen")
CRITERION_COLUMN = {"final_val_loss": "val_loss_final", "min_val_loss": "val_loss_min"}


@dataclass(frozen=True)
class Cell:
    variant: str
    seed: int
    lr: LrPoint

    @property
    def stage(self) -> str:
        return f"train@{self.variant}-{self.seed}-{self.lr.label}"

    @property
    def adapter(self) -> str:
        """The adapter folder below the variant's folder of adapters."""
        return f"{seed_name(self.seed)}/{lr_folder(self.lr.label)}"

    @property
    def curve(self) -> str:
        """The curve file below the variant's folder of curves."""
        return f"{seed_name(self.seed)}-lr{self.lr.label}.csv"


def seed_name(seed: int) -> str:
    return f"seed{seed}"


def lr_folder(label: str) -> str:
    """A cell's adapter folder below its seed's folder: lr_folder('0.5') == 'lr0.5'."""
    return f"lr{label}"


def seed_file(seed: int, suffix: str) -> str:
    """A per-seed file below a variant's folder: seed_file(1, '.json') == 'seed1.json'."""
    return f"{seed_name(seed)}{suffix}"


def select_stage(variant: str) -> str:
    return f"select@{variant}"


def evaluate_stage(variant: str, seed: int) -> str:
    return f"evaluate@{variant}-{seed}"


def cells(variant: str, seeds, lr_grid) -> list[Cell]:
    """The variant's cells, seeds outer, lr multiples inner (the order DVC's matrix lists them)."""
    return [Cell(variant, seed, point) for seed in seeds for point in lr_grid]


def find_point(lr_grid, label: str) -> LrPoint:
    """The lr_grid point DVC labelled `label`; a ValueError naming the grid when there is none."""
    for point in lr_grid:
        if point.label == label:
            return point
    raise ValueError(f"lr multiple {label!r} is not in lr_grid ({', '.join(p.label for p in lr_grid)})")
