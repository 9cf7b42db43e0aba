"""The compare stage on constructed files in the grid's layout (variant x seed x lr multiple): what it reads,
the statistics its context carries (seed and item effects, Holm labels, the one-seed case), the lr plot,
and the two templates. No model, no DVC: tests/compare_files.py writes what the other stages would."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from compare_files import GIB, grid_params, write_run
from safetensors.torch import save_file

from pipeline import compare
from pipeline import report as R
from pipeline.errors import DataError
from pipeline.schemas import COMPARISON_COLUMNS

PROJECTIONS = compare.projections


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    """The 7B projection builds a meta-device Llama per variant (~0.4 s each); tests that need it say so."""
    monkeypatch.setattr(compare, "projections", lambda params: {})


def _items(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 9, size=n), rng.integers(0, 4, size=n)


def _context(params, args):
    return compare.build_context(params, compare.load_inputs(params, args), True, "CPU", compare.projections(params),
                                 "2026-11-29", "0123456789abcdef")


def _method(ctx, name):
    return next(m for m in ctx["methods"] if m["name"] == name)


# ----- reading the grid --------------------------------------------------------------------------------
def test_compare_reads_the_chosen_cells_of_every_seed_and_writes_means_over_seeds(tmp_path):
    params = grid_params(["lora", "dora"], seeds=(0, 1), lr_grid=(0.5, 1))
    lengths, edits = _items()
    # dora's two seeds differ: its row is their mean; lora was chosen at 0.5, dora at 1
    args = write_run(tmp_path, params, {"lora": [edits, edits], "dora": [edits + 1, edits]}, lengths,
                     chosen={"lora": "0.5", "dora": "1"}, memory={"dora": [1.70 * GIB, 1.80 * GIB]})
    # files of another grid (a seed and a multiple no longer in params) are never read
    (tmp_path / "reports/metrics/dora/seed7.json").write_text("not json")
    ctx = compare.run(args, params)

    table = pd.read_csv(args.csv, dtype={"lr_multiple": str}).set_index("variant")
    assert tuple(table.reset_index().columns) == COMPARISON_COLUMNS
    assert list(table.index) == ["lora", "dora", "base"]
    per_seed = [(edits + 1).sum() / lengths.sum(), edits.sum() / lengths.sum()]
    assert table.loc["dora", "phoneme_error_rate"] == pytest.approx(np.mean(per_seed))
    assert table.loc["dora", "error_rate"] == pytest.approx(np.mean(per_seed))
    assert table.loc["dora", "training_memory_bytes"] == round(1.75 * GIB)
    assert table.loc["dora", "seeds"] == 2 and table.loc["dora", "lr_multiple"] == "1"
    assert table.loc["lora", "lr_multiple"] == "0.5" and table.loc["lora", "lr"] == pytest.approx(1e-3)
    assert pd.isna(table.loc["base", "seeds"]) and table.loc["base", "quality_label"] == "not_compared"
    assert table.loc["dora", "error_low"] < table.loc["dora", "error_rate"] < table.loc["dora", "error_high"]

    md = (tmp_path / "reports/comparison.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| dora |") and "%" in line]
    assert f"{np.mean(per_seed):.3f} [" in row and row.endswith("| 2e-03 (×1) |")
    assert "| lora |" in md and "1e-03 (×0.5)" in md
    assert ctx["seeds"] == [0, 1] and ctx["lr_grid"] == ["0.5", "1"]
    assert sorted(p.name for p in (tmp_path / "reports/plots").iterdir()) == [
        "loss_curves.png", "lr_sensitivity.png", "quality_vs_memory.png", "quality_vs_params.png"]


def test_a_missing_cell_names_the_stage_to_run_and_writes_nothing(tmp_path):
    params = grid_params(["lora", "dora"], seeds=(0, 1))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits, edits], "dora": [edits, edits]}, lengths)
    (tmp_path / "reports/metrics/dora/seed1.json").unlink()
    with pytest.raises(DataError, match=r"dora/seed1\.json is missing: run `dvc repro evaluate@dora-1`"):
        compare.run(args, params)
    assert not (tmp_path / "reports/comparison.md").exists()


def test_a_selection_outside_the_grid_or_a_stale_evaluation_is_refused(tmp_path):
    params = grid_params(["lora"], seeds=(0,), lr_grid=(1, 2))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits]}, lengths)
    (tmp_path / "reports/selection/lora.json").write_text(json.dumps({"variant": "lora", "lr_multiple": "4"}))
    with pytest.raises(DataError, match=r"lr multiple '4' is not in lr_grid \(1, 2\); run `dvc repro select@lora`"):
        compare.load_inputs(params, args)
    (tmp_path / "reports/selection/lora.json").write_text(json.dumps({"variant": "lora", "lr_multiple": "2", "lr": 4e-3}))
    # the metrics on disk were evaluated at the old choice (1): evaluate must rerun first
    with pytest.raises(DataError, match=r"not at the chosen 0 and 2: run `dvc repro evaluate@lora-0`"):
        compare.load_inputs(params, args)


# ----- the statistics, through compare's context --------------------------------------------------------
def test_a_pure_seed_effect_widens_the_interval_through_the_seeds_only(tmp_path):
    # every item of a seed has the same error rate: seed 0 at 0.2, seed 1 at 0.4; nothing varies between items
    params = grid_params(["lora", "dora"], seeds=(0, 1))
    lengths = np.full(30, 5)
    args = write_run(tmp_path, params, {"lora": [np.ones(30), np.ones(30)], "dora": [np.ones(30), 2 * np.ones(30)]},
                     lengths)
    dora = _method(_context(params, args), "dora")
    assert dora["error"]["value"] == pytest.approx(0.3)
    # resampling two seeds: both 0.2, one of each, or both 0.4; the items cannot move a seed's rate
    assert (dora["error"]["low"], dora["error"]["high"]) == pytest.approx((0.2, 0.4))
    assert dora["delta"]["value"] == pytest.approx(0.1) and dora["delta"]["low"] == pytest.approx(0.0)

    one = grid_params(["lora", "dora"], seeds=(1,))
    args = write_run(tmp_path / "one", one, {"lora": [np.ones(30)], "dora": [2 * np.ones(30)]}, lengths)
    alone = _method(_context(one, args), "dora")
    assert (alone["error"]["low"], alone["error"]["high"]) == pytest.approx((0.4, 0.4))  # one seed: no seed variance


def test_a_pure_item_effect_is_not_narrowed_by_seeds_that_agree(tmp_path):
    lengths, edits = _items(60, seed=3)
    runs = {}
    for seeds in ((0,), (0, 1, 2, 3)):
        params = grid_params(["lora", "dora"], seeds=seeds)
        args = write_run(tmp_path / str(len(seeds)), params, {"lora": [edits] * len(seeds),
                                                              "dora": [edits + 1] * len(seeds)}, lengths)
        runs[len(seeds)] = _method(_context(params, args), "dora")["error"]
    expected = R.stats.hierarchical_bootstrap(np.tile(edits + 1, (4, 1)), lengths)  # the known answer
    assert (runs[4]["low"], runs[4]["high"]) == pytest.approx((expected.low, expected.high))
    assert runs[4]["value"] == pytest.approx(runs[1]["value"]) == pytest.approx((edits + 1).sum() / lengths.sum())
    width = {k: r["high"] - r["low"] for k, r in runs.items()}
    assert 0.8 < width[4] / width[1] < 1.25  # independent item draws per seed would halve it


def test_holm_labels_only_the_method_that_is_clearly_better(tmp_path):
    params = grid_params(["lora", "dora", "rslora"], seeds=(0, 1))
    lengths, edits = _items(80, seed=5)
    better = np.maximum(edits - 1, 0)
    args = write_run(tmp_path, params, {"lora": [edits, edits], "dora": [better, better], "rslora": [edits, edits]},
                     lengths)
    ctx = compare.run(args, params)
    dora, rslora = _method(ctx, "dora"), _method(ctx, "rslora")
    assert (dora["quality"], rslora["quality"]) == ("better", "comparable")
    assert dora["delta"]["p_holm"] <= R.ALPHA < rslora["delta"]["p_holm"]
    assert ctx["guide"]["best"]["name"] == "dora" and ctx["stats"]["significant"] == ["dora"]
    md = (tmp_path / "reports/comparison.md").read_text()
    (t1,) = [line for line in md.splitlines() if line.startswith("| dora |") and "%" not in line]
    assert f"better (Δ {R.fmt_pp(dora['delta'])} pp, p_Holm {R.fmt_p(dora['delta']['p_holm'])})" in t1
    (t1,) = [line for line in md.splitlines() if line.startswith("| rslora |") and "%" not in line]
    assert "| comparable (p_Holm 1.000) |" in t1
    assert "- **Best quality at this budget**: **dora**" in md


def test_no_measurable_winner_is_said_when_nothing_beats_lora(tmp_path):
    params = grid_params(["lora", "dora", "vera"], seeds=(0,))
    lengths, edits = _items(60)
    args = write_run(tmp_path, params, {"lora": [edits], "dora": [edits], "vera": [edits + 2]}, lengths)
    ctx = compare.run(args, params)
    assert ctx["guide"]["best"] is None and ctx["guide"]["worse"] == ["vera"]
    md = (tmp_path / "reports/comparison.md").read_text()
    zh = (tmp_path / "reports/comparison.zh.md").read_text()
    assert "- **Best quality at this budget**: no measurable winner" in md
    assert "- **General purpose**: **lora**" in md
    assert "没有可测量的赢家" in zh


def test_one_seed_says_seed_variance_is_unmeasured_and_several_do_not(tmp_path):
    lengths, edits = _items()
    texts = {}
    for seeds in ((0,), (0, 1)):
        params = grid_params(["lora", "dora"], seeds=seeds)
        args = write_run(tmp_path / str(len(seeds)), params, {"lora": [edits] * len(seeds),
                                                              "dora": [edits[::-1]] * len(seeds)}, lengths)
        compare.run(args, params)
        texts[len(seeds)] = [(tmp_path / str(len(seeds)) / f"reports/comparison{s}.md").read_text() for s in ("", ".zh")]
    assert "- **One seed**: seed-to-seed variance is unmeasured." in texts[1][0]
    assert "- **只有一个种子**：种子间的方差没有被测量。" in texts[1][1]
    assert "seed-to-seed variance is unmeasured" not in texts[2][0] and "只有一个种子" not in texts[2][1]
    for en in (texts[1][0], texts[2][0]):
        assert "- **What this run can detect**: at its size" in en


def test_without_lora_there_is_no_reference_no_delta_column_and_no_label(tmp_path):
    params = grid_params(["dora", "vera"], seeds=(0,))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"dora": [edits], "vera": [edits + 3]}, lengths)
    ctx = compare.run(args, params)
    assert ctx["stats"]["reference"] is None and ctx["stats"]["detectable"] is None
    md = (tmp_path / "reports/comparison.md").read_text()
    assert "Δ vs LoRA" not in md and "p (Holm)" not in md
    assert "LoRA is not in this run, so there is no reference" in md
    assert "without LoRA in the run there is no reference to test against" in md
    table = pd.read_csv(args.csv).set_index("variant")
    assert table["delta_vs_lora"].isna().all() and set(table["quality_label"]) == {"no_reference", "not_compared"}
    assert set(table["memory_label"]) == {"no_reference", "not_compared"}


# ----- the lr grid --------------------------------------------------------------------------------------
def test_the_lr_plot_and_its_sentence_appear_only_with_a_grid(tmp_path):
    lengths, edits = _items()
    for grid, expected in (((1,), False), ((0.5, 1, 2), True)):
        params = grid_params(["lora", "vera"], seeds=(0, 1), lr_grid=grid)
        folder = tmp_path / str(len(grid))
        # vera's validation loss falls with the lr (its best lies beyond the grid); lora's is lowest at 1
        args = write_run(folder, params, {"lora": [edits] * 2, "vera": [edits] * 2}, lengths,
                         chosen={"vera": params.lr_grid[-1].label, "lora": "1"},
                         val_loss=lambda n, s, f: 3.0 - f + 0.01 * s if n == "vera" else 2.0 + (f - 1) ** 2)
        ctx = compare.run(args, params)
        md = (folder / "reports/comparison.md").read_text()
        zh = (folder / "reports/comparison.zh.md").read_text()
        assert (folder / "reports/plots/lr_sensitivity.png").exists() == expected
        assert ("## 2b. Learning-rate sensitivity" in md) == expected == ("## 2b. 学习率敏感性" in zh)
        assert ("plots/lr_sensitivity.png" in md) == expected
    assert ctx["sensitivity"]["edge"] == ["vera"]
    assert "The chosen lr lies at an end of the 3-point grid for 1 of 2 methods (vera)" in md
    assert "1e-03 (×0.5)" not in md and "4e-02 (×2)" in md  # each method's chosen lr in the table


def test_the_lr_plot_reads_only_this_grids_cells(tmp_path):
    params = grid_params(["lora"], seeds=(0, 1), lr_grid=(0.5, 1))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits] * 2}, lengths, chosen={"lora": "1"},
                     val_loss=lambda n, s, f: 2.0 + s + f)
    with open(tmp_path / "reports/validation/lora.csv", "a") as handle:  # a row of an older, wider grid
        handle.write("lora,5,4,0.008,99.0,99.0,False\n")
    points = compare.load_inputs(params, args).sensitivity["lora"]["points"]
    assert [p["label"] for p in points] == ["0.5", "1"]
    assert points[1]["per_seed"] == [3.0, 4.0] and points[1]["mean"] == pytest.approx(3.5)
    assert points[0]["lr"] == pytest.approx(1e-3)


# ----- the templates ------------------------------------------------------------------------------------
QUANT = {"quantized_layers": 210, "base_fp32_bytes": 538_060_288, "base_4bit_bytes": 168_400_000, "double_quant": True,
         "bits_per_param_measured": 4.144, "bits_per_param_formula": 4.127, "relative_error_mean": 0.0939,
         "relative_error_max": 0.1019}
DISTRIBUTED = {"strategy": "fsdp", "world_size": 2, "backend": "gloo", "nnodes": 1, "nproc_per_node": 2,
               "per_rank": [{"rank": 0, "peak_memory_bytes": 2 * GIB, "base_weight_bytes": 300 * 2**20},
                            {"rank": 1, "peak_memory_bytes": 3 * GIB, "base_weight_bytes": 260 * 2**20}]}


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    """A run that fills every section: a grid, a 4-bit method, AdaLoRA's ranks, a distributed run, an imported
    adapter, the quantize summary and the 7B projection."""
    tmp_path = tmp_path_factory.mktemp("everything")
    peft = tmp_path / "peft_folder"  # a PEFT LoRA folder: its config and the keys of its tensors are read
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"]}))
    save_file({f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight": torch.zeros(4, 4) for ab in "AB"},
              str(peft / "adapter_model.safetensors"))
    params = grid_params(["lora", "qlora", "adalora", "mine"], seeds=(0, 1), lr_grid=(0.5, 1),
                         entries={"mine": {"peft_adapter": str(peft)}})
    lengths, edits = _items(60)
    ranks = {f"model.layers.{i}.self_attn.{m}": k for i in range(6) for m, k in (("q_proj", 4 + i % 3), ("v_proj", 8))}
    args = write_run(tmp_path, params, {"lora": [edits] * 2, "qlora": [np.maximum(edits - 1, 0)] * 2,
                                        "adalora": [edits + 1] * 2, "mine": [edits] * 2}, lengths,
                     memory={"qlora": 1.48 * GIB, "adalora": 1.97 * GIB},
                     extra={"adalora": {"parts": {"layer": {"rank_pattern": ranks}}},
                            "mine": {"training_memory_bytes": None, "peak_memory_bytes": None, "steps": 0}},
                     summaries={"lora": {"distributed": DISTRIBUTED}})
    (tmp_path / "reports/quantize.json").write_text(json.dumps(QUANT))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "projections", PROJECTIONS)  # the real one
        ctx = compare.run(args, params)
    return ctx, (tmp_path / "reports/comparison.md").read_text(), (tmp_path / "reports/comparison.zh.md").read_text()


SECTIONS = {"en": ["# LoRA variants compared", "## 1. Comparison table", "## 2. Measured numbers",
                   "## 2b. Learning-rate sensitivity", "## 3. Memory for Llama-2-7B (projection)", "Quantize stage",
                   "## 3b. Where the adaptive methods put their rank", "## 3c. Distributed training (measured)",
                   "## 4. Selection guide", "## 5. Plots", "## 6. Notes", "- 4-bit base (qlora)", "- AdaLoRA follows",
                   "- Imported, not trained here: mine", "| 1 GPU | 2 GPUs | 8 GPUs |"],
            "zh": ["# LoRA 变体对比", "## 1. 变体对比表", "## 2. 实测数据", "## 2b. 学习率敏感性",
                   "## 3. Llama-2-7B 的显存需求（推算）", "量化阶段", "## 3b. 自适应方法把秩分配到了哪里",
                   "## 3c. 分布式训练（实测）", "## 4. 选择指南", "## 5. 图表", "## 6. 说明", "- 4-bit 基座（qlora）",
                   "- AdaLoRA 完全按照", "- 导入而非在此训练：mine", "| 1 张 GPU | 2 张 GPU | 8 张 GPU |"]}


def test_both_templates_render_every_section_in_order(everything):
    ctx, en, zh = everything
    for lang, text in (("en", en), ("zh", zh)):
        positions = [text.find(marker) for marker in SECTIONS[lang]]
        assert -1 not in positions, [m for m, p in zip(SECTIONS[lang], positions, strict=True) if p < 0]
        headings = [p for m, p in zip(SECTIONS[lang], positions, strict=True) if m.startswith("#")]
        assert headings == sorted(headings), lang
        assert "\n\n\n" not in text and "{{" not in text and "{%" not in text
    (row,) = [line for line in en.splitlines() if line.startswith("| mine |") and "%" in line]
    assert row.endswith("| imported | imported | imported | imported | imported |")
    assert ctx["methods"][1]["memory"] == "lowest" and ctx["methods"][2]["memory"] == "high"


def test_the_english_and_chinese_reports_carry_the_same_numbers(everything):
    ctx, en, zh = everything
    for m in ctx["methods"]:  # the parts' own descriptions ("4-bit NormalFloat") are words, not results
        en, zh = en.replace(m["idea"]["en"], "idea"), zh.replace(m["idea"]["zh"], "idea")
    decimals = re.compile(r"[-+]?\d+\.\d+")
    assert sorted(decimals.findall(en)) == sorted(decimals.findall(zh))
    assert len(decimals.findall(en)) > 100
    # every table row, cell by cell: the same numbers in the same order
    number = re.compile(r"[-+]?\d+(?:\.\d+)?")
    en_rows = [number.findall(line) for line in en.splitlines() if line.startswith("| ")]
    zh_rows = [number.findall(line) for line in zh.splitlines() if line.startswith("| ")]
    assert en_rows == zh_rows


def test_a_template_never_prints_a_missing_number(tmp_path):
    params = grid_params(["lora"], seeds=(0,))
    lengths, edits = _items()
    ctx = _context(params, write_run(tmp_path, params, {"lora": [edits]}, lengths))
    del ctx["guide"]["params"]
    for lang in R.LANGUAGES:
        with pytest.raises(Exception, match="'dict object' has no attribute 'params'"):
            R.render(lang, ctx)
    with pytest.raises(ValueError, match="no report template for language 'fr'"):
        R.render("fr", ctx)


# ----- what compare may read ----------------------------------------------------------------------------
# compare's `params:` in dvc.yaml (the grid contract): DVC reruns it when one of these changes, and only then
COMPARE_PARAMS = ("run", "seeds", "lr_grid", "lr_selection", "variants", "quantize", "model.source", "data.source",
                  "data.n_test", "train.steps", "train.batch_size", "train.schedule", "train.warmup_steps",
                  "train.device", "tracking")


def test_compare_reads_only_the_params_its_stage_declares(tmp_path):
    from pipeline.declared import restrict

    params = grid_params(["lora", "vera"], seeds=(0, 1), lr_grid=(0.5, 1))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits] * 2, "vera": [edits] * 2}, lengths)
    seen = restrict(params, "compare", COMPARE_PARAMS)
    ctx = compare.run(args, seen)  # an undeclared read (train.lr, seed, ...) raises UndeclaredParamError
    assert seen.used() <= set(COMPARE_PARAMS)
    # the chosen cell's lr comes from select's files (select declares train.lr and variants.<v>.lr)
    assert _method(ctx, "vera")["lr"] == pytest.approx(1e-2) and _method(ctx, "lora")["lr"] == pytest.approx(1e-3)
