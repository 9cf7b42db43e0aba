"""pandera schemas: valid tables pass; each malformation fails naming its column and rows."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.schemas import (
    COMPARISON_COLUMNS,
    METRIC_COLUMNS,
    ComparisonTable,
    VariantMetrics,
    validate_comparison,
    validate_metrics,
    validate_prepared,
)


def prepared(with_word: bool = True) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "id": [f"cmudict:w{i}" for i in range(6)],
            "prompt": [f"Spell: w {i}\nARPAbet:" for i in range(6)],
            "response": [f" P{i}" for i in range(6)],
            "split": ["train", "train", "train", "validation", "test", "test"],
            "word": [f"w{i}" for i in range(6)],
        }
    )
    return df if with_word else df.drop(columns="word")


def metrics_row(variant: str = "lora", **overrides) -> dict:
    row = {
        "variant": variant,
        "layer": "lora",
        "phoneme_error_rate": 0.42,
        "exact_match": 0.08,
        "eval_loss": 1.3,
        "trainable_params": 921_600,
        "trainable_percent": 0.68,
        "adapter_bytes": 3_686_400,
        "base_weight_bytes": 538_090_408,
        "peak_memory_bytes": 1_600_000_000,
        "training_memory_bytes": 900_000_000,
        "train_seconds": 100.5,
        "tokens_per_second": 175.0,
        "steps": 40,
        "optimizer": "adamw",
        "seed": 0,            # the cell: training seed and the chosen lr multiple (null for the base row)
        "lr_multiple": "1",
    }
    row.update(overrides)
    return row


def metrics(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows or [metrics_row("lora"), metrics_row("dora", layer="dora")]))


def comparison() -> pd.DataFrame:
    df = metrics(metrics_row("base", layer="none", trainable_params=0, trainable_percent=0.0,
                             adapter_bytes=0, steps=0, train_seconds=0.0), metrics_row("lora"))
    return df.assign(seeds=[None, 3], lr_multiple=[None, "1"], lr=[None, 2e-3], error_rate=[1.3, 0.53],
                     error_low=[1.2, 0.49], error_high=[1.4, 0.57], delta_vs_lora=[None, 0.0], delta_low=[None, -0.01],
                     delta_high=[None, 0.01], p_holm=[None, 1.0], memory_label=["not_compared", "low"],
                     quality_label=["not_compared", "comparable"])


def failure(df: pd.DataFrame, validate=validate_prepared) -> str:
    with pytest.raises(DataError) as info:
        validate(df)
    return str(info.value)


def line_for(message: str, column: str, check: str) -> str:
    """The message line about one column and check (fails the test if there is none)."""
    for line in message.splitlines():
        if line.strip().startswith(f"column {column!r} check {check!r}") or (
            line.strip().startswith(f"column {column!r} check \"{check}")
        ):
            return line
    raise AssertionError(f"no line for column {column!r} check {check!r} in:\n{message}")


# ---------------------------------------------------------------- PreparedData


@pytest.mark.parametrize("with_word", [True, False])
def test_valid_prepared_data_passes(with_word):
    df = prepared(with_word)
    out = validate_prepared(df)
    assert list(out.columns) == list(df.columns)
    assert len(out) == 6


def test_prepared_coerces_to_strings():
    df = prepared().assign(id=range(6))
    assert validate_prepared(df)["id"].tolist() == [str(i) for i in range(6)]


def test_empty_response_names_column_and_rows():
    df = prepared()
    df.loc[[3, 5], "response"] = ["", "   "]
    msg = failure(df)
    assert msg.startswith("prepared data failed validation:\n")
    assert line_for(msg, "response", "not_blank").endswith("failed on rows [3, 5]: ['', '   ']")


def test_duplicate_id_names_both_rows():
    df = prepared()
    df.loc[4, "id"] = df.loc[1, "id"]
    assert line_for(failure(df), "id", "field_uniqueness").endswith(
        "failed on rows [1, 4]: ['cmudict:w1', 'cmudict:w1']"
    )


def test_word_in_two_splits_names_the_word_column():
    df = prepared()
    df.loc[4, "word"] = "w0"  # w0 is in train, row 4 is test
    msg = failure(df)
    assert line_for(msg, "word", "in_one_split_only").endswith("failed on rows [0, 4]: ['w0', 'w0']")
    # Reported once, on the word column, not repeated for every column of the frame.
    assert msg.count("in_one_split_only") == 1


def test_same_word_within_one_split_is_allowed():
    df = prepared().assign(id=[f"id{i}" for i in range(6)])
    df.loc[1, "word"] = "w0"  # both in train
    validate_prepared(df)


def test_without_word_column_the_prompt_must_stay_in_one_split():
    df = prepared(with_word=False)
    df.loc[3, "prompt"] = df.loc[2, "prompt"]  # train and validation
    msg = failure(df)
    assert line_for(msg, "prompt", "in_one_split_only").endswith(
        "failed on rows [2, 3]: ['Spell: w 2\\nARPAbet:', 'Spell: w 2\\nARPAbet:']"
    )
    # With a word column, equal prompts of different words are not leakage by this check.
    validate_prepared(prepared().assign(prompt="same"))


def test_unknown_split_and_blank_prompt_and_null_word():
    df = prepared()
    df.loc[2, "split"] = "dev"
    df.loc[0, "prompt"] = " \n"
    df.loc[5, "word"] = None
    msg = failure(df)
    assert line_for(msg, "split", "isin(['train', 'validation', 'test'])").endswith("failed on rows [2]: ['dev']")
    assert line_for(msg, "prompt", "not_blank").endswith("failed on rows [0]: [' \\n']")
    assert line_for(msg, "word", "not_nullable").endswith("failed on rows [5]: [None]")


def test_strict_mode_rejects_extra_and_missing_columns():
    msg = failure(prepared().assign(label=1).drop(columns="response"))
    assert "column 'label' check 'column_in_schema' failed: not in the schema" in msg
    assert "column 'response' check 'column_in_dataframe' failed: required column is missing" in msg


def test_lazy_validation_reports_every_failure_at_once():
    df = prepared()
    df.loc[0, "response"] = ""
    df.loc[1, "split"] = "dev"
    msg = failure(df)
    assert len(msg.splitlines()) == 3  # header + two failing checks


def test_many_failures_are_truncated_with_a_count():
    df = pd.DataFrame(
        {"id": [str(i) for i in range(25)], "prompt": ["p"] * 25, "response": [""] * 25, "split": ["test"] * 25}
    )
    line = line_for(failure(df), "response", "not_blank")
    assert "rows [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]:" in line
    assert line.endswith("(and 15 more)")


# ---------------------------------------------------------------- VariantMetrics


def test_metric_columns_follow_the_schema():
    assert tuple(VariantMetrics.to_schema().columns) == METRIC_COLUMNS
    assert tuple(ComparisonTable.to_schema().columns) == COMPARISON_COLUMNS
    assert list(metrics_row()) == list(METRIC_COLUMNS)


def test_valid_metrics_pass_with_null_per():
    df = metrics(metrics_row("lora"), metrics_row("vera", layer="vera", phoneme_error_rate=None))
    out = validate_metrics(df)
    assert out["trainable_params"].dtype == "int64"
    assert out["phoneme_error_rate"].isna().tolist() == [False, True]


@pytest.mark.parametrize(
    ("column", "value", "check"),
    [
        ("eval_loss", -0.5, "greater_than_or_equal_to(0)"),
        ("exact_match", 1.5, "in_range(0, 1)"),
        ("trainable_percent", 100.5, "in_range(0, 100)"),
        ("phoneme_error_rate", -0.1, "greater_than_or_equal_to(0)"),
        ("base_weight_bytes", 0, "greater_than(0)"),
        ("peak_memory_bytes", -1, "greater_than(0)"),
        ("steps", -1, "greater_than_or_equal_to(0)"),
        ("steps", 2.5, "integer"),
        ("tokens_per_second", None, "not_nullable"),
        ("variant", " ", "not_blank"),
    ],
)
def test_bad_metric_names_column_and_row(column, value, check):
    bad = metrics_row("dora")
    bad[column] = value
    df = metrics(metrics_row("lora"), bad)
    line = line_for(failure(df, validate_metrics), column, check)
    assert re.search(r"failed on rows \[1\]: \[", line), line


def test_duplicate_variant_and_extra_column():
    df = metrics(metrics_row("lora"), metrics_row("lora")).assign(notes="x")
    msg = failure(df, validate_metrics)
    assert line_for(msg, "variant", "field_uniqueness").endswith("failed on rows [0, 1]: ['lora', 'lora']")
    assert "column 'notes' check 'column_in_schema' failed" in msg
    assert msg.startswith("variant metrics failed validation:\n")


# ---------------------------------------------------------------- ComparisonTable


def test_valid_comparison_passes_and_metrics_schema_rejects_its_labels():
    validate_comparison(comparison())
    msg = failure(comparison(), validate_metrics)  # strict: the derived columns are not metrics
    assert "column 'memory_label' check 'column_in_schema'" in msg


def test_bad_labels_fail():
    df = comparison()
    df.loc[1, "memory_label"] = "tiny"
    df.loc[0, "quality_label"] = "best"
    msg = failure(df, validate_comparison)
    assert msg.startswith("comparison table failed validation:\n")
    assert line_for(msg, "memory_label", "isin(['lowest', 'low', 'medium', 'high', 'imported', 'no_reference', 'not_compared'])").endswith("rows [1]: ['tiny']")
    assert line_for(msg, "quality_label", "isin(['better', 'comparable', 'worse', 'baseline', 'no_reference', 'not_compared'])").endswith(
        "rows [0]: ['best']"
    )


def test_comparison_allows_null_delta_but_requires_labels():
    validate_comparison(comparison().assign(delta_vs_lora=[None, None], p_holm=[None, None]))
    msg = failure(comparison().drop(columns="quality_label"), validate_comparison)
    assert "column 'quality_label' check 'column_in_dataframe' failed" in msg


def test_check_names_survive_validating_the_subclass_first():
    """pandera renames an inherited check to its method name once the subclass validated."""
    with pytest.raises(DataError):
        validate_comparison(comparison().assign(variant=["base", " "]))
    bad = metrics_row("dora")
    bad["variant"] = " "
    assert "check 'not_blank'" in failure(metrics(metrics_row("lora"), bad), validate_metrics)
