"""pandera schemas for the tables that cross stage boundaries, and validators with readable errors.

- ``PreparedData``: the prepared prompt/response rows of every split (prepare -> train/evaluate).
  Ids are unique, prompt and response are non-blank, split is train/validation/test, and no word
  (G2P data; the prompt for user data without a ``word`` column) appears in two splits.
- ``VariantMetrics``: one row per variant (or the base-model baseline), columns ``METRIC_COLUMNS``
  (evaluate -> compare).
- ``ComparisonTable``: ``VariantMetrics`` (means over seeds) plus the chosen lr, the error rate's
  interval, the difference to LoRA with its Holm-adjusted p, and the report's labels (compare).
- ``ValidationTable``: one row per grid cell (variant, seed, lr multiple) with its validation
  losses and whether its multiple is the chosen one (select -> compare's lr-sensitivity plot).

All schemas are strict (no unknown columns) and coerce dtypes. ``validate_prepared``,
``validate_metrics`` and ``validate_comparison`` validate lazily, so one run reports every failing
check, and raise ``DataError`` listing, per failing check, the column, the check and up to
``MAX_SHOWN`` failing row indices and values, e.g.::

    prepared data failed validation:
      column 'response' check 'not_blank' failed on rows [3, 7]: ['', '']
"""

from __future__ import annotations

import math

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from pipeline.cells import VALIDATION_COLUMNS
from pipeline.errors import DataError

__all__ = [
    "COMPARISON_COLUMNS",
    "MAX_SHOWN",
    "MEMORY_LABELS",
    "METRIC_COLUMNS",
    "QUALITY_LABELS",
    "SPLITS",
    "ComparisonTable",
    "DataError",
    "PreparedData",
    "VALIDATION_COLUMNS",
    "ValidationTable",
    "VariantMetrics",
    "validate_comparison",
    "validate_metrics",
    "validate_prepared",
    "validate_validation",
]

SPLITS = ("train", "validation", "test")
# "imported": an adapter trained elsewhere (`peft_adapter`), whose training memory is unknown
# "not_compared": the base model's row (not a method of the run); "no_reference": no LoRA in the run
MEMORY_LABELS = ("lowest", "low", "medium", "high", "imported", "no_reference", "not_compared")
QUALITY_LABELS = ("better", "comparable", "worse", "baseline", "no_reference", "not_compared")
MAX_SHOWN = 10

# The name of the dataframe-level leakage check; the error formatter reports it on its key column.
_ONE_SPLIT_CHECK = "in_one_split_only"


def _not_blank(series: pd.Series) -> pd.Series:
    return series.str.strip().str.len() > 0


def _leakage_key(df: pd.DataFrame) -> str:
    # G2P data is split by word; user data has no word column, so a prompt is the unit that must
    # not be seen in training and then scored in test.
    return "word" if "word" in df.columns else "prompt"


class PreparedData(pa.DataFrameModel):
    """All prepared rows of one dataset, every split in one frame (column ``split``)."""

    id: Series[str] = pa.Field(unique=True)
    prompt: Series[str]
    response: Series[str]
    split: Series[str] = pa.Field(isin=list(SPLITS))
    word: Series[str] | None = pa.Field(nullable=False)

    @pa.check("prompt", "response", name="not_blank")
    def _text_not_blank(cls, series: pd.Series) -> pd.Series:
        return _not_blank(series)

    @pa.check("word", name="not_blank")
    def _word_not_blank(cls, series: pd.Series) -> pd.Series:
        return _not_blank(series)

    @pa.dataframe_check(name=_ONE_SPLIT_CHECK)
    def _in_one_split_only(cls, df: pd.DataFrame) -> pd.Series:
        key = _leakage_key(df)
        if key not in df.columns or "split" not in df.columns:
            # A missing column is reported by its own check; don't add a confusing KeyError here.
            return pd.Series(True, index=df.index)
        return df.groupby(key)["split"].transform("nunique") <= 1

    class Config:
        strict = True
        coerce = True


class VariantMetrics(pa.DataFrameModel):
    """Measured metrics, one row per variant (or the base-model baseline)."""

    variant: Series[str] = pa.Field(unique=True)
    layer: Series[str]
    # Null for non-G2P data, where phonemes do not exist. PER can exceed 1 (insertions).
    phoneme_error_rate: Series[float] = pa.Field(ge=0, nullable=True)
    exact_match: Series[float] = pa.Field(in_range={"min_value": 0, "max_value": 1})
    eval_loss: Series[float] = pa.Field(ge=0)
    trainable_params: Series[int] = pa.Field(ge=0)
    trainable_percent: Series[float] = pa.Field(in_range={"min_value": 0, "max_value": 100})
    adapter_bytes: Series[int] = pa.Field(ge=0)
    base_weight_bytes: Series[int] = pa.Field(gt=0)
    # Null for an adapter imported with `peft_adapter` (trained elsewhere: nothing was measured here);
    # a nullable integer dtype, so the CSV still prints whole numbers.
    peak_memory_bytes: Series[pd.Int64Dtype] = pa.Field(gt=0, nullable=True)
    # base weights + what training added on top (see pipeline/runtime.PeakMemory); the memory label uses it
    training_memory_bytes: Series[pd.Int64Dtype] = pa.Field(gt=0, nullable=True)
    train_seconds: Series[float] = pa.Field(ge=0)
    tokens_per_second: Series[float] = pa.Field(ge=0)
    steps: Series[int] = pa.Field(ge=0)
    optimizer: Series[str]
    # The grid cell a variant's row comes from: its training seed and the chosen lr multiple (lr_grid's
    # label); null for the base-model row. Optional columns, so tables of one row per variant still validate.
    seed: Series[pd.Int64Dtype] | None = pa.Field(ge=0, nullable=True)
    lr_multiple: Series[str] | None = pa.Field(nullable=True)

    # The method is named like its check: validating the subclass ComparisonTable renames the
    # parent's inherited check to its method name (pandera 0.35), so both must agree.
    @pa.check("variant", name="not_blank")
    def not_blank(cls, series: pd.Series) -> pd.Series:
        return _not_blank(series)

    class Config:
        strict = True
        coerce = True


# The metric columns in schema order, for stages that build one dict per variant.
METRIC_COLUMNS = (
    "variant",
    "layer",
    "phoneme_error_rate",
    "exact_match",
    "eval_loss",
    "trainable_params",
    "trainable_percent",
    "adapter_bytes",
    "base_weight_bytes",
    "peak_memory_bytes",
    "training_memory_bytes",
    "train_seconds",
    "tokens_per_second",
    "steps",
    "optimizer",
    "seed",
    "lr_multiple",
)


class ComparisonTable(VariantMetrics):
    """The report's table: the metrics averaged over seeds, the chosen lr, the error rate's interval,
    the difference to LoRA with its Holm-adjusted p, and the labels derived from them.

    The error rate is the compared one: phoneme error rate for G2P, else 1 - exact match. The base
    model's row has no seeds, lr, difference or labels ("not_compared"); without LoRA in the run no
    row has a difference."""

    seeds: Series[pd.Int64Dtype] = pa.Field(ge=1, nullable=True)  # how many seeds the means are over
    lr_multiple: Series[str] = pa.Field(nullable=True)             # the lr_grid label select chose
    lr: Series[float] = pa.Field(gt=0, nullable=True)
    error_rate: Series[float] = pa.Field(ge=0)
    error_low: Series[float] = pa.Field(ge=0)    # 95% hierarchical-bootstrap interval (seeds, then items)
    error_high: Series[float] = pa.Field(ge=0)
    delta_vs_lora: Series[float] = pa.Field(nullable=True)  # error rate minus LoRA's
    delta_low: Series[float] = pa.Field(nullable=True)
    delta_high: Series[float] = pa.Field(nullable=True)
    p_holm: Series[float] = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    memory_label: Series[str] = pa.Field(isin=list(MEMORY_LABELS))
    quality_label: Series[str] = pa.Field(isin=list(QUALITY_LABELS))


_COMPARISON_EXTRA = ("seeds", "lr_multiple", "lr", "error_rate", "error_low", "error_high", "delta_vs_lora",
                     "delta_low", "delta_high", "p_holm", "memory_label", "quality_label")
# (a metrics row may already carry its cell's lr_multiple: each column is listed once, in the metrics' place)
COMPARISON_COLUMNS = METRIC_COLUMNS + tuple(c for c in _COMPARISON_EXTRA if c not in METRIC_COLUMNS)


class ValidationTable(pa.DataFrameModel):
    """Every cell's validation losses, one row per (variant, seed, lr multiple); `chosen` marks the
    rows of the multiple that select@<variant> picked (one multiple per variant, all its seeds)."""

    variant: Series[str]
    seed: Series[int] = pa.Field(ge=0)
    lr_multiple: Series[str]  # lr_grid's label as DVC names it ("1", "0.5"); a string, never re-printed
    lr: Series[float] = pa.Field(gt=0, nullable=True)  # null: an imported adapter (not trained here)
    val_loss_final: Series[float] = pa.Field(ge=0, nullable=True)
    val_loss_min: Series[float] = pa.Field(ge=0, nullable=True)
    chosen: Series[bool]

    @pa.dataframe_check(name="one_row_per_cell")
    def _one_row_per_cell(cls, df: pd.DataFrame) -> pd.Series:
        return ~df.duplicated(["variant", "seed", "lr_multiple"], keep=False)

    @pa.dataframe_check(name="one_chosen_multiple_per_variant")
    def _one_chosen_multiple(cls, df: pd.DataFrame) -> pd.Series:
        # per variant, exactly one multiple is chosen, and it is chosen for every seed
        chosen = df[df["chosen"]].groupby("variant")["lr_multiple"].nunique()
        per_multiple = df.groupby(["variant", "lr_multiple"])["chosen"].transform("nunique")
        return df["variant"].map(chosen).eq(1) & per_multiple.eq(1)

    @pa.dataframe_check(name="min_not_above_final")
    def _min_not_above_final(cls, df: pd.DataFrame) -> pd.Series:
        return df["val_loss_final"].isna() | (df["val_loss_min"] <= df["val_loss_final"])

    class Config:
        strict = True
        coerce = True


def validate_validation(df: pd.DataFrame) -> pd.DataFrame:
    """Validate (and coerce) a ValidationTable (read the CSV with dtype={"lr_multiple": str}: "1.0" is not "1")."""
    return _validate(ValidationTable, df, "validation table", {"one_row_per_cell": "lr_multiple",
                                                               "one_chosen_multiple_per_variant": "chosen",
                                                               "min_not_above_final": "val_loss_min"})


def validate_prepared(df: pd.DataFrame) -> pd.DataFrame:
    """Validate (and coerce) prepared data; DataError lists every failing check."""
    return _validate(PreparedData, df, "prepared data", {_ONE_SPLIT_CHECK: _leakage_key(df)})


def validate_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Validate (and coerce) a VariantMetrics table; DataError lists every failing check."""
    return _validate(VariantMetrics, df, "variant metrics")


def validate_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Validate (and coerce) a ComparisonTable; DataError lists every failing check."""
    return _validate(ComparisonTable, df, "comparison table")


def _validate(
    model: type[pa.DataFrameModel],
    df: pd.DataFrame,
    what: str,
    frame_check_columns: dict[str, str] | None = None,
) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
    # pandera coerces 1.5 to the int 1 silently; a fractional byte or step count is a bug upstream,
    # so catch it before coercion hides it.
    lines = _fractional_int_failures(model, df)
    try:
        validated = model.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        lines += _format_failures(exc.failure_cases, frame_check_columns or {})
    if lines:
        raise DataError(f"{what} failed validation:\n" + "\n".join("  " + line for line in lines))
    return validated


def _fractional_int_failures(model: type[pa.DataFrameModel], df: pd.DataFrame) -> list[str]:
    lines = []
    for name, column in model.to_schema().columns.items():
        if name not in df.columns or "int" not in str(column.dtype).lower():  # int64 and Int64
            continue
        values = df[name]
        if not pd.api.types.is_float_dtype(values):
            continue
        bad = values[values.notna() & (values != values.round())]
        if len(bad):
            lines.append(_line(name, "integer", list(bad.index), list(bad)))
    return lines


def _format_failures(cases: pd.DataFrame, frame_check_columns: dict[str, str]) -> list[str]:
    grouped: dict[tuple[str, str], list[tuple[object, object]]] = {}
    for column, check, value, index in cases[["column", "check", "failure_case", "index"]].itertuples(index=False):
        if check in frame_check_columns and column != frame_check_columns[check]:
            # A dataframe-level check reports each failing row once per column; keep the column
            # the check is about (the word, or the prompt) so the message names it.
            continue
        if check in ("column_in_schema", "column_in_dataframe"):
            # Schema-level failures name the schema as their column and the column as the value.
            column = value
        grouped.setdefault((column, check), []).append((index, value))
    lines = []
    for (column, check), failures in grouped.items():
        if check == "column_in_schema":
            lines.append(f"column {column!r} check 'column_in_schema' failed: not in the schema (strict mode)")
        elif check == "column_in_dataframe":
            lines.append(f"column {column!r} check 'column_in_dataframe' failed: required column is missing")
        elif all(_is_missing(index) for index, _ in failures):
            values = [value for _, value in failures]
            lines.append(f"column {column!r} check {check!r} failed: {values[:MAX_SHOWN]}")
        else:
            rows = [(index, value) for index, value in failures if not _is_missing(index)]
            lines.append(_line(column, check, [i for i, _ in rows], [v for _, v in rows]))
    return lines


def _line(column: str, check: str, rows: list, values: list) -> str:
    more = f" (and {len(rows) - MAX_SHOWN} more)" if len(rows) > MAX_SHOWN else ""
    values = [None if _is_missing(v) else _plain(v) for v in values[:MAX_SHOWN]]
    return f"column {column!r} check {check!r} failed on rows {[_plain(i) for i in rows[:MAX_SHOWN]]}: {values}{more}"


def _plain(value: object) -> object:
    # numpy scalars print as np.int64(3) in lists; show plain Python values.
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA
