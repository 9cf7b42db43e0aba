"""Faults real users hit: bad params and data cost no work, NaN stops at once, a killed run resumes
to the same result, failed writes keep the previous outputs, MLflow down is survivable, and
nothing is unpickled. (Parallel experiments are in test_pipeline_e2e.py.)"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stage_cmds import stage_argv
from tiny_assets import prepared_workspace, save_tiny_model, small_pipeline_params

ROOT = Path(__file__).resolve().parents[1]


def small_params(model_dir: Path) -> dict:
    root = yaml.safe_load((ROOT / "params.yaml").read_text())
    return small_pipeline_params(root, model_dir, {
        "lora": {"preset": "lora", "r": 4, "alpha": 8},
        "adalora": {"preset": "adalora", "r": 6, "target_r": 3, "alpha": 8, "tinit": 2, "tfinal": 3, "total_step": 12},
        "sora": {"preset": "sora", "r": 4, "alpha": 8, "sora_xi": 0.02},
        "delta_lora": {"preset": "delta_lora", "r": 4, "alpha": 8, "delta_start_step": 2},
    }, steps=12, eval_interval=4, checkpoint_interval=4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A stage-ready folder: params.yaml, models/base (tiny random Llama), data/prepared."""
    root = tmp_path_factory.mktemp("ws")
    return prepared_workspace(root, small_params(save_tiny_model(root / "tiny-model")))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- 1. params -------------------------------------------------------------------------------------
def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def _set(raw, path, value):
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def _mappings(node, prefix=""):
    if isinstance(node, dict):
        yield prefix[:-1]
        for key, value in node.items():
            yield from _mappings(value, f"{prefix}{key}.")


BAD_BY_TYPE = {
    bool: ["yes", 1, None, [True]],
    int: ["eight", 2.5, True, None, [3], {"a": 1}],
    float: ["fast", True, None, [0.1], {"x": 1}, float("nan")],
    str: [5, True, [], {"k": "v"}],
}
NUMERIC_BAD = [0, -1]  # for fields that must be positive
POSITIVE_KEYS = {"n_train", "n_validation", "n_test", "max_length", "steps", "batch_size", "lr", "max_new_tokens",
                 "r", "alpha", "target_r", "total_step", "loraplus_ratio", "delta_update_ratio", "d_initial",
                 "grad_clip", "delta_t", "blocksize", "quant_blocksize", "loftq_iter"}
INT_KEYS = {"seed", "n_train", "n_validation", "n_test", "max_length", "blocksize", "steps", "batch_size",
            "warmup_steps", "eval_interval", "checkpoint_interval", "max_new_tokens", "r", "target_r", "tinit",
            "tfinal", "delta_t", "total_step", "delta_start_step", "quant_blocksize", "loftq_iter",
            "projection_prng_key"}


def malformed_cases(raw: dict) -> list[tuple[str, dict, str]]:
    """(label, params dict, fragment every error must contain) — types, ranges, unknown keys, names..."""
    cases = []
    for path, value in _leaves(raw):
        if path.endswith(("preset", "target_modules")) or value is None:
            continue
        for bad in BAD_BY_TYPE.get(type(value), []):
            if bad is None and (path == "train.grad_clip" or path.endswith(".lr")):
                continue  # null is allowed there (no clipping; the global lr)
            if bad == 2.5 and path.rsplit(".", 1)[-1] not in INT_KEYS:
                continue  # a number field that happens to be written as an integer in the file
            if path in ("data.template", "tracking.experiment", "model.source", "data.hf_split", "data.prompt_field",
                        "data.response_field") and isinstance(bad, str):
                continue
            mutated = copy.deepcopy(raw)
            _set(mutated, path, bad)
            key_part = path.rsplit(".", 1)[-1]
            cases.append((f"{path}={bad!r}", mutated, key_part))
        if path.rsplit(".", 1)[-1] in POSITIVE_KEYS:
            for bad in NUMERIC_BAD:
                mutated = copy.deepcopy(raw)
                _set(mutated, path, bad)
                cases.append((f"{path}={bad!r}", mutated, path.rsplit(".", 1)[-1]))
    for path in _mappings(raw):
        mutated = copy.deepcopy(raw)
        node = mutated
        for key in filter(None, path.split(".")):
            node = node[key]
        node["bogus_key"] = 1
        cases.append((f"unknown key under {path or 'top'}", mutated, "bogus_key"))
    named = [("variants.lora.preset", "lorax", "'lorax'"), ("variants.lora.layer", "conv", "'conv'"),
             ("variants.lora.scaling", "sqrt", "'sqrt'"), ("variants.lora.optimizer", "sgd", "'sgd'"),
             ("variants.lora.step", "warp", "'warp'"), ("variants.lora.init", "pisa", "'pisa'"),
             ("variants.pissa.base", "nf4", "init=pissa with base=nf4"),
             ("variants.lora.base", "int8", "'int8'"), ("variant", "qdora", "'qdora'"),
             ("model.source", "./no/such/model", "'./no/such/model'"),
             ("variants.vera.optimizer", "lora_fa", "optimizer=lora_fa with layer=vera"),
             ("variants.vera.scaling", "rslora", "layer=vera with scaling=rslora"),
             ("variants.dora.optimizer", "lora_fa", "optimizer=lora_fa with layer=dora"),
             ("variants.delta_lora.dropout", 0.2, "step=delta_lora with dropout=0.2"),
             ("variants.delta_lora.base", "nf4", "step=delta_lora with base=nf4"),
             ("variants.loftq.base", "full", "init=loftq with base=full"),
             ("variants.adalora.target_r", 99, "target_r (99)"), ("variants.adalora.total_step", 9, "total_step (9)"),
             ("variants.sora.sora_xi", -1.0, "-1.0"), ("variants.lora.target_modules", [], "target_modules"),
             ("variants.lora.dropout", 1.0, "1.0"), ("tracking.uri", "sqlite:////etc/mlflow.db", "/etc/mlflow.db")]
    for path, bad, fragment in named:
        mutated = copy.deepcopy(raw)
        _set(mutated, path, bad)
        cases.append((f"{path}={bad!r}", mutated, fragment))
    data_missing = copy.deepcopy(raw)
    data_missing["data"].update(source="jsonl", path="no/such/file.jsonl")
    cases.append(("missing data file", data_missing, "no/such/file.jsonl"))
    return cases


STAGES = ("prepare", "base", "quantize", "train", "evaluate", "compare", "focus")


def test_malformed_params_fail_before_any_work_with_key_and_value(tmp_path, monkeypatch, capsys):
    from pipeline import base, compare, evaluate, focus, gguf_base, prepare, quantize, select, train
    from pipeline.params import ParamsError, load_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cases = malformed_cases(raw)
    assert len(cases) >= 200, len(cases)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded despite bad params")

    for module in (gguf_base, base, quantize, train, evaluate):
        for attr in ("load_base", "convert_gguf", "write_gguf_as_transformers"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, no_model)
    monkeypatch.chdir(tmp_path)
    mains = {"prepare": lambda a: prepare.main(stage_argv("prepare", *a)),
             "base": lambda a: base.main(stage_argv("base", *a)),
             "quantize": lambda a: quantize.main(stage_argv("quantize", *a)),
             "train": lambda a: train.main(stage_argv("train@lora-0-1", *a)),
             "evaluate": lambda a: evaluate.main(stage_argv("evaluate@lora-0", *a)),
             "compare": lambda a: compare.main(stage_argv("compare", *a)),
             "focus": lambda a: focus.main(stage_argv("focus", *a))}
    seen_by_select = []  # select builds no model: it checks every key but the adapter specs (those need torch)
    for label, params, fragment in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        with pytest.raises(ParamsError) as err:
            load_params(path)
        message = str(err.value)
        assert fragment in message, (label, message)
        assert message.count("\n") == 0, (label, message)  # one message
        for stage in STAGES:
            assert mains[stage](["--params", str(path)]) == 1, (label, stage)
        try:
            load_params(path, adapter_specs=False)
        except ParamsError:
            seen_by_select.append(label)
        assert select.main(stage_argv("select@lora", "--params", str(path))) == 1, label  # (or: no curves)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], (label, "a stage wrote something")
    err_text = capsys.readouterr().err
    assert err_text.count("bad.yaml: ") == len(cases) * len(STAGES) + len(seen_by_select)  # each said why, once
    missed = [label for label, _, _ in cases if label not in seen_by_select]
    assert missed and all(m.startswith(("variants.", "unknown key under variants.")) for m in missed), missed


# ----- 2. data ---------------------------------------------------------------------------------------
GOOD = [{"id": f"r{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(30)]


def _lines(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


BAD_DATA = {
    "broken json": (_lines(GOOD[:5]) + b'{"id": "x", "prompt": "p", "response": \n' + _lines(GOOD[5:]), "line 6"),
    "missing field": (_lines(GOOD[:3]) + b'{"id": "m", "prompt": "p"}\n' + _lines(GOOD[3:]), "line 4"),
    "empty response": (_lines(GOOD[:7] + [{"id": "e", "prompt": "p", "response": "  "}] + GOOD[7:]), "response"),
    "duplicate ids": (_lines(GOOD + [dict(GOOD[0])]), "id"),
    "non-utf8": (_lines(GOOD[:9]) + b'{"id": "u", "prompt": "\xff\xfe", "response": "r"}\n' + _lines(GOOD[9:]),
                 "line 10"),
    "zero rows": (b"\n\n", "no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_user_data_fails_prepare_and_keeps_previous_output(case, tmp_path, monkeypatch, capsys):
    from pipeline import prepare

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source="jsonl", path="user.jsonl", n_train=20, n_validation=4, n_test=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.jsonl").write_bytes(_lines(GOOD))
    assert prepare.main(stage_argv("prepare")) == 0
    before = _snapshot(tmp_path / "data")
    content, fragment = BAD_DATA[case]
    (tmp_path / "user.jsonl").write_bytes(content)
    capsys.readouterr()
    assert prepare.main(stage_argv("prepare")) == 1
    err = capsys.readouterr().err
    assert fragment in err, err
    if case in ("empty response", "duplicate ids"):
        assert "failed on rows" in err  # pandera's failure cases, with the rows
    assert _snapshot(tmp_path / "data") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]


# ----- 3. NaN ----------------------------------------------------------------------------------------
def test_nan_loss_stops_at_once_and_fails_the_mlflow_run(workspace, monkeypatch):
    import mlflow

    import variants
    from pipeline import lm, train

    calls = {"n": 0}
    real = lm.response_loss

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train, "response_loss", poisoned)
    monkeypatch.chdir(workspace)
    with pytest.raises(variants.NonFiniteLossError, match=r"lora: loss is nan at step 2"):
        train.run(*train.parse(stage_argv("train@lora-0-1")))
    assert not (workspace / "models/adapters/lora/seed0/lr1").exists()
    assert not (workspace / "reports/curves/lora/seed0-lr1.csv").exists()
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.variant = 'lora' and tags.stage = 'train'")
    assert list(runs["status"])[:1] == ["FAILED"]


# ----- 4. resume after SIGKILL ---------------------------------------------------------------------
def _train_subprocess(workspace, variant, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *stage_argv(f"train@{variant}-0-1")],
                            cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _adapter_tensors(workspace, variant):
    return load_file(str(workspace / f"models/adapters/{variant}/seed0/lr1/adapter.safetensors"))


@pytest.mark.parametrize("variant", ["lora", "adalora", "sora", "delta_lora"])
def test_training_killed_with_sigkill_resumes_to_the_same_adapter(workspace, variant):
    # an uninterrupted run first
    done = _train_subprocess(workspace, variant)
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0, out
    reference = _adapter_tensors(workspace, variant)
    reference_curve = (workspace / f"reports/curves/{variant}/seed0-lr1.csv").read_text()
    assert not (workspace / f"models/checkpoints/{variant}/seed0-lr1/current").exists()  # cleared when done

    # the same run, killed (SIGKILL) once a mid-run checkpoint exists, then started again
    state = workspace / f"models/checkpoints/{variant}/seed0-lr1/current/state.json"
    proc = _train_subprocess(workspace, variant)
    deadline = time.time() + 600
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                killed_after = json.loads(state.read_text())["step"]
            except (json.JSONDecodeError, FileNotFoundError):
                continue
            if killed_after >= 4:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = _train_subprocess(workspace, variant)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    match = re.search(r"resuming from the checkpoint at step (\d+)", out)
    assert match and int(match.group(1)) >= killed_after, out
    got = _adapter_tensors(workspace, variant)
    assert set(got) == set(reference)
    max_diff = max((got[k].double() - reference[k].double()).abs().max().item() for k in got)
    assert max_diff == 0.0 and all(torch.equal(got[k], reference[k]) for k in got), max_diff
    # the curve is whole too (steps before the kill came from the checkpoint)
    curve = (workspace / f"reports/curves/{variant}/seed0-lr1.csv").read_text().splitlines()
    assert [line.split(",")[:3] for line in curve] == [line.split(",")[:3] for line in reference_curve.splitlines()]


# ----- 5. atomic outputs -----------------------------------------------------------------------------
def test_an_exception_while_writing_keeps_previous_outputs(tmp_path, monkeypatch):
    from pipeline.files import atomic_write_text, commit_outputs

    monkeypatch.chdir(tmp_path)
    commit_outputs({"reports/a.md": "old a", "reports/b.csv": "old b"},
                   {"reports/plots": lambda d: (d / "p.png").write_bytes(b"old")})
    before = _snapshot(tmp_path)

    def half_written_then_fail(folder):
        (folder / "p.png").write_bytes(b"new, half")
        raise RuntimeError("plotting crashed")

    with pytest.raises(RuntimeError, match="plotting crashed"):
        commit_outputs({"reports/a.md": "new a", "reports/b.csv": "new b"}, {"reports/plots": half_written_then_fail})
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["a.md", "b.csv", "plots"]

    class Exploding(str):
        def encode(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_text("reports/a.md", Exploding("x"))
    assert _snapshot(tmp_path) == before


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if re.match(r"\..+\.(tmp|old)-", p.name))


def test_staging_files_of_a_killed_stage_are_removed_when_it_next_starts(workspace, monkeypatch):
    """What a SIGKILL mid-write leaves: a staged file, a staged folder, a folder swap cut in half
    (the previous adapter moved aside, the new one not yet in place), and the checkpoint's own."""
    from pipeline import train

    monkeypatch.chdir(workspace)
    planted = {
        "reports/curves/lora/.seed0-lr1.csv.tmp-k1ll3d": b"step,loss\n1,",
        "models/adapters/lora/seed0/.lr1.tmp-k1ll3d/adapter.safetensors": b"half",
        "models/adapters/lora/seed0/.lr1.old-k1ll3d/previous/adapter.safetensors": b"previous",
        "models/checkpoints/lora/seed0-lr1/.current.tmp-k1ll3d/state.safetensors": b"half",
        "models/checkpoints/lora/seed0-lr1/.previous.old-k1ll3d/state.json": b"{}",
        "reports/curves/lora/.seed0-lr2.csv.tmp-0ther": b"another cell's: not ours to remove",
    }
    for path, data in planted.items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_bytes(data)
    train.run(*train.parse(stage_argv("train@lora-0-1")))
    assert _leftovers(workspace) == ["reports/curves/lora/.seed0-lr2.csv.tmp-0ther"]
    assert (workspace / "models/adapters/lora/seed0/lr1/adapter.safetensors").stat().st_size > 100
    (workspace / "reports/curves/lora/.seed0-lr2.csv.tmp-0ther").unlink()


def test_a_folder_swap_cut_in_half_gets_its_previous_version_back(tmp_path):
    from pipeline.files import remove_leftovers

    (tmp_path / ".plots.old-k1ll3d" / "previous").mkdir(parents=True)
    (tmp_path / ".plots.old-k1ll3d" / "previous" / "a.png").write_bytes(b"previous")
    (tmp_path / ".plots.tmp-k1ll3d").mkdir()
    (tmp_path / ".plots.tmp-k1ll3d" / "a.png").write_bytes(b"half")
    remove_leftovers([tmp_path / "plots"])
    assert _snapshot(tmp_path) == {"plots/a.png": b"previous"}


def test_git_ignores_scratch_and_staging_files():
    names = ["reports/curves/lora/.seed0-lr1.csv.tmp-abc123", "reports/metrics/lora/.seed0.json.tmp-abc123",
             "models/adapters/lora/seed0/.lr1.tmp-abc123/adapter.safetensors",
             "models/adapters/lora/seed0/.lr1.old-abc123/previous/adapter.safetensors",
             "models/checkpoints/lora/seed0-lr1/current/state.safetensors"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.stdout.split() == names
    dvcignore = (ROOT / ".dvcignore").read_text().split()
    assert ".*.tmp-*" in dvcignore and ".*.old-*" in dvcignore


def test_compare_stage_failure_keeps_the_previous_report(workspace, monkeypatch):
    from pipeline import compare

    monkeypatch.chdir(workspace)
    reports = workspace / "reports"
    reports.mkdir(exist_ok=True)
    for name, text in (("comparison.md", "previous report"), ("comparison.zh.md", "旧报告"), ("comparison.csv", "x\n")):
        (reports / name).write_text(text)
    before = _snapshot(reports)
    monkeypatch.setattr(compare, "load_inputs", lambda params, args: (_ for _ in ()).throw(FileNotFoundError("metrics")))
    with pytest.raises(FileNotFoundError):
        compare.main(stage_argv("compare"))
    assert _snapshot(reports) == before


# ----- 6. MLflow down --------------------------------------------------------------------------------
def test_unreachable_mlflow_warns_once_and_the_metrics_are_still_written(workspace, monkeypatch, capsys):
    from pipeline import evaluate, select, tracking, train

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(tracking, "_DISABLED_REASON", None)
    started = time.time()
    train.run(*train.parse(stage_argv("train@lora-0-1")))
    assert select.main(stage_argv("select@lora")) == 0
    evaluate.run(*evaluate.parse(stage_argv("evaluate@lora-0")))
    err = capsys.readouterr().err
    assert err.count("WARNING: MLflow tracking is off") == 1, err
    assert time.time() - started < 120
    metrics = json.loads((workspace / "reports/metrics/lora/seed0.json").read_text())
    assert metrics["variant"] == "lora" and metrics["eval_loss"] > 0
    assert json.loads((workspace / "models/adapters/lora/seed0/lr1/mlflow.json").read_text())["run_id"] is None


# ----- 8. safety -------------------------------------------------------------------------------------
def test_nothing_is_unpickled_and_saved_state_is_safetensors_and_json(workspace):
    sources = [p for folder in ("variants", "pipeline", "bench") for p in (ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.load", text, re.M), path
        assert "trust_remote_code=True" not in text, path
    produced = [p for folder in ("models/adapters", "models/checkpoints") for p in (workspace / folder).rglob("*")
                if p.is_file()]
    assert produced and {p.suffix for p in produced} <= {".safetensors", ".json"}


def test_trust_remote_code_reaches_the_loader_only_as_given(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.gguf_base import load_base

    seen = []
    model_dir = save_tiny_model(tmp_path / "m")
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (seen.append(k.get("trust_remote_code")), real_model(*a, **k))[1])
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda *a, **k: (seen.append(k.get("trust_remote_code")), real_tok(*a, **k))[1])
    load_base(model_dir)
    assert seen == [False, False]
