"""dvc.yaml is the one map of the data and of the params: every stage reads exactly the params it
declares, gets every path it reads or writes on its cmd line, and imports no other stage."""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from stage_cmds import split_cmd, stage_argv
from tiny_assets import save_tiny_model, small_pipeline_params

from pipeline.declared import UndeclaredParamError, declared_params, restrict
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SCRATCH_OPTIONS = ("--checkpoints",)  # scratch folders: read and written, but never a dep or an out


@pytest.fixture(scope="module")
def dvc_stages():
    """dvc.yaml as DVC itself resolves it (foreach, ${key}, ${variant})."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


def _code(path: str) -> bool:
    return path.split("/")[0] in ("pipeline", "variants")


def test_our_declarations_are_the_ones_dvc_resolves(dvc_stages):
    for name, stage in dvc_stages.items():
        from_dvc = [key for dep in stage.deps if type(dep).__name__ == "ParamsDependency" for key in dep.params]
        assert list(declared_params(name)) == from_dvc, name


def test_a_read_of_an_undeclared_key_is_refused_naming_key_and_stage():
    stage = restrict(load_params(ROOT / "params.yaml"), "train@lora-0-1")
    assert stage.data.max_length == 64 and stage.model.dtype == "float32" and stage.get_variant("lora").spec.r == 8
    for read in (lambda p: p.eval, lambda p: p.data.template, lambda p: vars(p.data), lambda p: list(p.variants),
                 lambda p: p.variants["vera"], lambda p: p.variant):
        with pytest.raises(UndeclaredParamError, match=r"stage train@lora-0-1 reads params.yaml key '[a-z_.*]+'"):
            read(stage)
    assert stage.reads == {"data.max_length", "model", "variants.lora"}


def test_every_stage_reads_exactly_the_params_it_declares(tmp_path, monkeypatch):
    """Runs every stage script on a tiny model with its dvc.yaml command line; a read of an
    undeclared key fails the stage, and a declared key that no stage code reads fails here."""
    from pipeline import base, compare, declared, evaluate, focus, prepare, quantize, select, stage, train

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = small_pipeline_params(raw, save_tiny_model(tmp_path / "tiny-model"), {"lora": {"r": 2}}, steps=2,
                                   eval_interval=1, checkpoint_interval=1)
    words = ["cat", "dog", "bird", "fish", "cow", "pig", "hen", "owl", "ant", "bee", "elk", "yak", "emu", "fox",
             "bat", "rat"]
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"id": w, "prompt": f"Spell: {' '.join(w)}\nARPAbet:", "response": "K AE T"}) + "\n"
        for w in words))
    params["data"].update(source="jsonl", path=str(tmp_path / "rows.jsonl"), n_train=8, n_validation=4, n_test=4)
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    seen = {}

    def recording(params, name):
        seen[name] = declared.restrict(params, name)
        return seen[name]

    monkeypatch.setattr(stage, "restrict", recording)
    runs = [(prepare, "prepare"), (base, "base"), (quantize, "quantize"), (train, "train@lora-0-1"),
            (select, "select@lora"), (evaluate, "evaluate@lora-0"), (evaluate, "evaluate_base"), (compare, "compare"),
            (focus, "focus")]
    for module, name in runs:
        assert module.main(stage_argv(name)) == 0, name
    assert sorted(seen) == sorted(name for _, name in runs)
    for name, got in seen.items():
        assert got.used() == set(declared_params(name)), (name, sorted(got.reads))


def test_every_path_on_a_cmd_line_is_a_dep_or_out_and_back(dvc_stages):
    for name, stage in dvc_stages.items():
        words = shlex.split(stage.cmd)
        split_cmd(words)  # python -m pipeline.run <stage> ...
        scratch = [words[i + 1] for i, w in enumerate(words) if w in SCRATCH_OPTIONS]
        paths = {w for i, w in enumerate(words[3:], 3) if "/" in w and words[i - 1] not in SCRATCH_OPTIONS}
        deps = {d.def_path for d in stage.deps if type(d).__name__ != "ParamsDependency" and not _code(d.def_path)}
        outs = {o.def_path for o in stage.outs}
        assert paths == deps | outs, (name, paths ^ (deps | outs))
        for folder in scratch:  # git ignores it and it lies outside every declared path
            assert subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{folder}/current/state.json"],
                                  cwd=ROOT).returncode == 0, folder
            assert not any(folder == p or folder.startswith(p + "/") or p.startswith(folder + "/")
                           for s in dvc_stages.values() for p in [o.def_path for o in s.outs]
                           + [d.def_path for d in s.deps if type(d).__name__ != "ParamsDependency"]), folder


def test_the_baseline_row_name_is_the_one_compare_expects(dvc_stages):
    from pipeline.compare import BASELINE

    module, words = split_cmd(shlex.split(dvc_stages["evaluate_base"].cmd))
    assert module == "pipeline.evaluate" and words[0] == BASELINE and "--adapter" not in words
    assert f"reports/metrics/{BASELINE}.json" in words


def test_no_stage_module_imports_another_stage():
    modules = {split_cmd(shlex.split(s["cmd"] if "cmd" in s else s["do"]["cmd"]))[0]
               for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()}
    assert modules == {f"pipeline.{m}" for m in ("prepare", "base", "quantize", "train", "select", "evaluate", "compare",
                                                      "focus")}
    for module in modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported = {a.name for a in node.names}
            else:
                continue
            assert not (imported & (modules - {module})), (module, imported & modules)


def test_matrix_and_foreach_stage_names_resolve_their_params():
    assert declared_params("train@vera-3-0.5")[-1] == "variants.vera"
    assert declared_params("train@lora-0-1e-05")[-1] == "variants.lora"  # only the last value may hold a '-'
    assert "variants.dora" in declared_params("select@dora") and "lr_selection" in declared_params("select@dora")
    assert "seed" in declared_params("evaluate@lora-2")
    assert stage_argv("train@vera-3-0.5")[:5] == ["vera", "--seed", "3", "--lr-multiple", "0.5"]
    assert "models/adapters/vera/seed3/lr0.5" in stage_argv("train@vera-3-0.5")
    assert "models/selected/lora/seed2" in stage_argv("evaluate@lora-2")


@pytest.mark.parametrize("stage, fragment", [
    ("train@lora", "stage 'train' is a matrix stage; name it as train@<variant>-<seed>-<lr>, got 'train@lora'"),
    ("train@lora-0", "name it as train@<variant>-<seed>-<lr>, got 'train@lora-0'"),
    ("train@lora--1", "got 'train@lora--1'"),
    ("train", "name it as train@<variant>-<seed>-<lr>, got 'train'"),
    ("evaluate@lora", "name it as evaluate@<variant>-<seed>, got 'evaluate@lora'"),
    ("select", "stage 'select' is a foreach stage; name it as select@<key>, got 'select'"),
    ("compare@lora", "stage 'compare' is neither a foreach nor a matrix stage, got 'compare@lora'"),
    ("trian@lora-0-1", "has no stage 'trian'"),
])
def test_a_malformed_stage_name_is_refused_naming_the_form(stage, fragment):
    with pytest.raises(UndeclaredParamError) as err:
        declared_params(stage)
    assert fragment in str(err.value)


def test_a_foreach_over_a_mapping_keeps_its_key(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fit": {
        "foreach": {"a": 1}, "do": {"cmd": "python -m x ${key}", "params": ["variants.${key}", "train"]}}}}))
    assert declared_params("fit@lora", tmp_path / "dvc.yaml") == ("variants.lora", "train")


def test_dvc_names_the_grid_cells_as_cells_and_lr_label_do(tmp_path):
    """DVC's own matrix expansion (YAML 1.2 numbers, its printing of floats) gives the stage names and
    command-line labels that pipeline/cells.py and params.lr_label predict, for every kind of lr_grid value."""
    from dvc.repo import Repo

    from pipeline.cells import cells
    from pipeline.params import params_from_dict

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    grid_text = "[0.5, 1, 2.0, 1e-3, 3e-05]"  # as a user writes it (PyYAML reads 1e-3 as a string)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "lr_grid: [1]", f"lr_grid: {grid_text}").replace("seeds: [0]", "seeds: [0, 7]"))
    params = params_from_dict(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    assert [p.label for p in params.lr_grid] == ["0.5", "1", "2.0", "0.001", "3e-05"]
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
    expected = {c.stage for v in raw["run"] for c in cells(v, params.seeds, params.lr_grid)}
    assert {name for name in stages if name.startswith("train@")} == expected
    for cell in cells("lora", params.seeds, params.lr_grid):
        words = shlex.split(stages[cell.stage].cmd)
        assert words[words.index("--lr-multiple") + 1] == cell.lr.label
        assert f"models/adapters/lora/{cell.adapter}" in words and f"reports/curves/lora/{cell.curve}" in words
        assert declared_params(cell.stage, tmp_path / "dvc.yaml")[-1] == "variants.lora"
    assert {name for name in stages if name.startswith("evaluate@")} == {
        f"evaluate@{v}-{s}" for v in raw["run"] for s in (0, 7)}


def test_dvc_lock_holds_only_the_stages_dvc_yaml_defines(dvc_stages):
    """DVC rewrites the whole dvc.lock after every stage (a round-trip YAML parse and dump, ~0.3 s per 1000
    lines), and never drops the entries of stages dvc.yaml no longer defines: 22 such entries from an
    older layout had doubled the file. A stage renamed or removed is removed from dvc.lock too."""
    lock = yaml.load((ROOT / "dvc.lock").read_text(), Loader=yaml.CSafeLoader)["stages"]
    assert sorted(set(lock) - {name.split(":")[-1] for name in dvc_stages}) == []
