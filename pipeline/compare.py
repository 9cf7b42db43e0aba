"""Stage `compare`: every cell of the run -> the comparison report (en + zh), its table, plots and MLflow run.

    python -m pipeline.compare --metrics reports/metrics --predictions reports/predictions --curves reports/curves \
        --validation reports/validation --selection reports/selection --quantize reports/quantize.json \
        --adapters models/adapters --csv reports/comparison.csv --md reports/comparison.md \
        --md-zh reports/comparison.zh.md --plots reports/plots

Reads only the cells of the current params (pipeline/cells.py names their files): for every
variant v of `run`, the lr multiple `select@v` chose (<selection>/v.json), and for every seed s
of `seeds` its test metrics and predictions (<metrics>/v/seed<s>.json, <predictions>/v/seed<s>.jsonl),
the chosen cell's curve and adapter folder (train_summary.json: a distributed run's ranks;
mlflow.json: its run); with more than one lr multiple, every cell's validation loss
(<validation>/v.csv) for the lr-sensitivity plot. Files of earlier grids are ignored. Plus the
`base` baseline (<metrics>/base.json, <predictions>/base.jsonl) and the quantize summary.

Writes (atomically, after everything is rendered) the comparison CSV (validated by the
ComparisonTable schema; one row per variant, means over seeds), the markdown report and its
Chinese twin (pipeline/templates, filled from one context built here by `build_context`), and
PNG plots: loss curves, quality vs trainable parameters, quality vs training memory, and with
an lr grid, validation loss vs lr. The judgements (intervals, Holm-corrected labels, memory
labels, use cases) come from pipeline/report.py and pipeline/stats.py.

MLflow (tracking on): one "comparison" run (tag kind=comparison; params run, seeds, lr_grid,
lr_selection) with the reports, CSV, plots and validation tables as artifacts and members.json
(every cell's run id); each member run is tagged `comparison_run=<that run's id>` and
`selected=true|false` (whether it is its variant's chosen multiple).

A variant imported with `peft_adapter` (trained elsewhere) is compared on quality; its training
columns read "imported", and it is left out of the memory labels, the memory and speed guide,
the 7B projection and the loss-curve plot. A variant trained over several processes gets a row
in the "distributed training" section.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import report as R
from pipeline import stats
from pipeline.cells import CRITERION_COLUMN, cells, find_point, seed_file
from pipeline.errors import DataError
from pipeline.files import commit_outputs
from pipeline.params import ParamsError
from pipeline.projection import FSDP_WAYS, project
from pipeline.schemas import COMPARISON_COLUMNS, METRIC_COLUMNS, validate_comparison
from pipeline.stage import start
from pipeline.tracking import Tracker, git_commit, standard_tags

BASELINE = "base"  # the base model's row: the name dvc.yaml's evaluate_base stage gives it
REFERENCE = "lora"  # every quality and memory judgement is relative to plain LoRA
TUTORIAL_7B = {"lora": "~15 GB", "qlora": "~6 GB"}
# the measurements a variant's row averages over seeds (counts and bytes rounded back to integers)
MEASURED = ("phoneme_error_rate", "exact_match", "eval_loss", "trainable_params", "trainable_percent", "adapter_bytes",
            "base_weight_bytes", "peak_memory_bytes", "training_memory_bytes", "train_seconds", "tokens_per_second",
            "steps")
INT_COLUMNS = ("trainable_params", "adapter_bytes", "base_weight_bytes", "peak_memory_bytes", "training_memory_bytes",
               "steps")


@dataclass
class Method:
    """One variant of the run at its chosen lr multiple: one entry per seed (params.seeds order)."""

    name: str
    lr_multiple: str
    lr: float | None                 # None: an imported adapter
    seeds: tuple[int, ...]
    rows: list[dict]                 # the test metrics of each seed
    predictions: list[list[dict]]    # the test predictions of each seed
    summaries: list[dict]            # train_summary.json of each seed's chosen cell
    curve: pd.DataFrame | None       # the first seed's chosen cell (none for an imported adapter)
    imported: bool = False

    @property
    def row(self) -> dict:
        """The metrics row averaged over seeds (counts and bytes rounded; text from the first seed)."""
        return mean_row(self.rows)


@dataclass
class Inputs:
    methods: dict[str, Method]
    base: dict | None
    base_predictions: list[dict] | None
    quant: dict | None
    sensitivity: dict[str, dict] = field(default_factory=dict)  # variant -> the lr plot's points
    members: list[dict] = field(default_factory=list)           # every cell's MLflow run


def mean_row(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for key in MEASURED:
        values = [r.get(key) for r in rows]
        if any(v is None for v in values) or not all(isinstance(v, (int, float)) for v in values):
            continue
        mean = float(np.mean(values))
        out[key] = int(round(mean)) if key in INT_COLUMNS else mean
    return out


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing: run `dvc repro {stage}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path, stage: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} is missing: run `dvc repro {stage}` first")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def chosen_multiple(params, variant: str, selection_dir: str):
    """(the lr_grid point select@<variant> chose, its lr); a DataError when the file is missing or names
    another grid. The lr comes from the file (select declares train.lr and the variant's lr; compare need not)."""
    chosen = _read_json(Path(selection_dir) / f"{variant}.json", f"select@{variant}")
    if chosen.get("variant") != variant:
        raise DataError(f"{selection_dir}/{variant}.json is the selection of {chosen.get('variant')!r}, not {variant!r}")
    try:
        point = find_point(params.lr_grid, str(chosen.get("lr_multiple")))
    except ValueError as err:
        raise DataError(f"{selection_dir}/{variant}.json: {err}; run `dvc repro select@{variant}`") from None
    lr = chosen.get("lr")
    imported = params.variants[variant].peft_adapter is not None  # trained elsewhere: no lr of ours
    if not (imported and lr is None) and (not R.is_finite(lr) or lr <= 0):
        raise DataError(f"{selection_dir}/{variant}.json: lr must be a positive number, got {lr!r}; "
                        f"run `dvc repro select@{variant}`")
    return point, None if lr is None else float(lr)


def load_method(params, args, name: str) -> Method:
    point, lr = chosen_multiple(params, name, args.selection)
    imported = params.variants[name].peft_adapter is not None
    rows, preds, summaries, curve = [], [], [], None
    for seed in params.seeds:
        stage = f"evaluate@{name}-{seed}"
        row = _read_json(Path(args.metrics) / name / seed_file(seed, ".json"), stage)
        if row.get("seed", seed) != seed or str(row.get("lr_multiple", point.label)) != point.label:
            raise DataError(f"{args.metrics}/{name}/{seed_file(seed, '.json')} was evaluated at seed "
                            f"{row.get('seed')} and lr multiple {row.get('lr_multiple')}, not at the chosen "
                            f"{seed} and {point.label}: run `dvc repro {stage}`")
        rows.append(row)
        preds.append(_read_jsonl(Path(args.predictions) / name / seed_file(seed, ".jsonl"), stage))
        cell = next(c for c in cells(name, (seed,), (point,)))
        summaries.append(_read_json(Path(args.adapters) / name / cell.adapter / "train_summary.json", cell.stage))
        if curve is None and not imported:
            path = Path(args.curves) / name / cell.curve
            if not path.is_file():
                raise DataError(f"{path} is missing: run `dvc repro {cell.stage}` first")
            curve = pd.read_csv(path)
    return Method(name, point.label, lr, tuple(params.seeds), rows, preds, summaries, curve, imported)


def load_sensitivity(params, args, name: str, chosen: str) -> dict:
    """Every cell's validation loss under the selection criterion, from select@<name>'s table."""
    path = Path(args.validation) / f"{name}.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing: run `dvc repro select@{name}` first")
    table = pd.read_csv(path, dtype={"lr_multiple": str})
    column = CRITERION_COLUMN[params.lr_selection]
    missing = {"seed", "lr_multiple", "lr", column} - set(table.columns)
    if missing:
        raise DataError(f"{path} lacks the columns {sorted(missing)}: run `dvc repro select@{name}`")
    labels = [p.label for p in params.lr_grid]
    table = table[table["seed"].isin(params.seeds) & table["lr_multiple"].isin(labels)]  # this grid's cells only
    points = []
    for point in params.lr_grid:
        cell_rows = table[table["lr_multiple"] == point.label]
        if cell_rows.empty:
            raise DataError(f"{path} has no row for lr multiple {point.label}: run `dvc repro select@{name}`")
        points.append({"label": point.label, "factor": point.factor,
                       "lr": float(cell_rows["lr"].iloc[0]),
                       "mean": float(cell_rows[column].mean()),
                       "per_seed": [float(v) for v in cell_rows[column]]})
    return {"points": points, "chosen": chosen}


def load_members(params, adapters: str, chosen: dict[str, str]) -> list[dict]:
    """The MLflow run of every cell of the grid that has one (mlflow.json in its adapter folder), and
    whether it is its variant's chosen multiple (`chosen`: variant -> label)."""
    out = []
    for name in params.run:
        for cell in cells(name, params.seeds, params.lr_grid):
            path = Path(adapters) / name / cell.adapter / "mlflow.json"
            info = json.loads(path.read_text()) if path.is_file() else {}
            if info.get("run_id"):
                out.append({"stage": cell.stage, "variant": name, "seed": cell.seed, "lr_multiple": cell.lr.label,
                            "run_id": info["run_id"], "uri": info.get("uri"),
                            "selected": cell.lr.label == chosen.get(name)})
    return out


def load_inputs(params, args) -> Inputs:
    methods = {name: load_method(params, args, name) for name in params.run}
    base = _read_json(Path(args.metrics) / f"{BASELINE}.json", "evaluate_base")
    base_predictions = _read_jsonl(Path(args.predictions) / f"{BASELINE}.jsonl", "evaluate_base")
    quantize = Path(args.quantize)
    quant = json.loads(quantize.read_text()) if quantize.exists() else None
    sensitivity = {}
    if len(params.lr_grid) > 1:
        sensitivity = {name: load_sensitivity(params, args, name, m.lr_multiple) for name, m in methods.items()
                       if not m.imported}
    return Inputs(methods, base, base_predictions, quant, sensitivity,
                  load_members(params, args.adapters, {name: m.lr_multiple for name, m in methods.items()}))


def distributed_runs(methods: dict[str, Method]) -> dict[str, dict]:
    """The `distributed` record (first seed's chosen cell) of every variant trained over several processes."""
    return {name: m.summaries[0]["distributed"] for name, m in methods.items() if m.summaries[0].get("distributed")}


def projections(params):
    out = {}
    for name in params.run:
        v = params.variants[name]
        if v.peft_adapter is not None:
            continue  # trained elsewhere, perhaps differently: no training-memory projection
        bits = "4bit" if v.spec.base != "full" else "bf16"
        out[name] = project(name, v.spec, bits, params.quantize.blocksize, params.quantize.double_quant)
    if REFERENCE in out and not any(params.variants[n].spec.base != "full" for n in out):
        # No 4-bit variant in this run: still show what LoRA on QLoRA's storage would need.
        out["lora on nf4 (projection)"] = project("lora on nf4", params.variants[REFERENCE].spec, "4bit",
                                                  params.quantize.blocksize, params.quantize.double_quant)
    return out


# ----- the report's context: every number the templates print, computed once ------------------------
def _interval(est) -> dict:
    return {"value": est.value, "low": est.low, "high": est.high}


def _numbers(row: dict) -> dict:
    keys = ("exact_match", "eval_loss", "trainable_params", "trainable_percent", "adapter_bytes", "base_weight_bytes",
            "training_memory_bytes", "peak_memory_bytes", "train_seconds", "tokens_per_second")
    return {**{k: row.get(k) for k in keys}, "metrics": {k: row.get(k) for k in METRIC_COLUMNS}}


def build_context(params, inputs: Inputs, g2p: bool, device: str, projs: dict, date: str, commit: str) -> dict:
    """The one context both templates render: numbers and derived judgements, no words."""
    methods = inputs.methods
    imported = frozenset(name for name, m in methods.items() if m.imported)  # evaluated here, trained elsewhere
    rows = {name: m.row for name, m in methods.items()}
    quality = R.quality({name: m.predictions for name, m in methods.items()}, g2p, REFERENCE)
    margin = R.memory_margin({name: [r["training_memory_bytes"] for r in m.rows] for name, m in methods.items()
                              if name not in imported and None not in [r["training_memory_bytes"] for r in m.rows]})
    memories = R.memory_labels(rows, REFERENCE, imported, margin)
    uses = R.use_cases(rows, quality.labels, memories, REFERENCE, imported)

    entries = []
    for name, m in methods.items():
        delta = quality.deltas.get(name)
        entries.append({
            "name": name, "imported": name in imported, "seeds": len(m.seeds),
            "idea": {lang: R.core_idea(params.variants[name].spec, lang) for lang in R.LANGUAGES},
            "memory": memories[name], "quality": quality.labels[name], "uses": uses[name],
            "error": _interval(quality.estimates[name]),
            "delta": {**_interval(delta), "p": delta.p, "p_holm": quality.p_holm[name]} if delta else None,
            "lr": m.lr, "lr_multiple": m.lr_multiple, **_numbers(rows[name])})
    base = None
    if inputs.base is not None:
        table, lengths, _ = R.error_table([inputs.base_predictions], g2p, name=BASELINE)
        base = {"name": BASELINE, "error": _interval(stats.hierarchical_bootstrap(table, lengths)),
                **_numbers(inputs.base)}
    trained = [n for n in methods if n not in imported]
    by_name = {e["name"]: e for e in entries}
    ctx = {
        "macros_only": False,
        "date": date, "commit": commit[:10],
        "model": params.model.source if params.model.source != "smollm2" else "SmolLM2-135M-Instruct",
        "g2p": g2p, "source": params.data.source,
        "steps": params.train.steps, "batch": params.train.batch_size, "schedule": params.train.schedule,
        "warmup": params.train.warmup_steps, "device": device,
        "n_test": next(iter(rows.values())).get("n_test", params.data.n_test),
        "seeds": list(params.seeds), "lr_grid": [p.label for p in params.lr_grid], "criterion": params.lr_selection,
        "methods": entries, "base": base,
        "stats": {"samples": stats.BOOTSTRAP_SAMPLES, "seeds": quality.seeds, "alpha": R.ALPHA, "power": R.POWER,
                  "reference": quality.reference, "comparisons": len(quality.deltas),
                  "significant": sorted(n for n in quality.deltas if quality.significant(n)),
                  "detectable": (dict(zip(("median", "low", "high"), quality.detectable, strict=True))
                                 if quality.detectable else None)},
        "memory_margin": margin, "memory_noise": R.MEMORY_NOISE,
        "peak_memory_method": next((rows[n].get("peak_memory_method") for n in trained), "") or "",
        "speed_margin": R.SPEED_MARGIN,
        "projection": projection_context(params, projs, inputs.quant),
        "quant": inputs.quant,
        "ranks": ranks_context(params, rows),
        "distributed": distributed_context(rows, distributed_runs(methods)),
        "sensitivity": sensitivity_context(params, inputs.sensitivity),
        "guide": guide_context(params, rows, by_name, quality, projs, imported),
        "notes": notes_context(params, rows, imported, methods),
    }
    return ctx


def projection_context(params, projs: dict, quant: dict | None) -> dict:
    rows = []
    for name, p in projs.items():
        rows.append({"name": name, "trainable_params": p.trainable_params, "base": p.base_bytes,
                     "adapter": p.adapter_bytes, "gradients": p.gradient_bytes, "adamw": p.optimizer_bytes,
                     "extra": p.extra_bytes, "total_gib": p.total_gib,
                     "claim": TUTORIAL_7B.get("qlora" if ("nf4" in name or "qlora" in name) else name, ""),
                     "per_gpu_gib": [p.per_gpu_bytes(n) / 2**30 for n in FSDP_WAYS]})
    lora = projs.get(REFERENCE)
    four_bit = next((p for n, p in projs.items()
                     if "nf4" in n or (n in params.variants and params.variants[n].spec.base != "full")), None)
    return {"rows": rows, "ways": list(FSDP_WAYS), "bits": quant["bits_per_param_formula"] if quant else 4.127,
            "lora_gib": lora.total_gib if lora else None, "four_bit_gib": four_bit.total_gib if four_bit else None}


def _module_kind(layer_name: str) -> str:
    return layer_name.rsplit(".", 1)[-1]


def _mean_rank(layers: dict[int, list[int]], ids: list[int]) -> float:
    """Mean kept rank over the adapted layers of the transformer blocks `ids`."""
    return sum(sum(layers[i]) for i in ids) / sum(len(layers[i]) for i in ids)


def ranks_context(params, rows) -> dict | None:
    """AdaLoRA's final rank pattern and SoRA's kept ranks (first seed), averaged per module kind and by depth."""
    found = []
    for name in params.run:
        layer_part = rows[name].get("parts", {}).get("layer", {})
        ranks = layer_part.get("rank_pattern") or layer_part.get("kept_ranks")
        if ranks:
            found.append((name, params.variants[name].spec.r, ranks))
    if not found:
        return None
    kinds = sorted({_module_kind(layer) for _, _, ranks in found for layer in ranks})
    table, depth = [], []
    for name, r, ranks in found:
        means = []
        for kind in kinds:
            values = [k for layer, k in ranks.items() if _module_kind(layer) == kind]
            means.append(sum(values) / len(values) if values else None)
        total = sum(ranks.values())
        table.append({"name": name, "r": r, "means": means, "kept": total, "initial": r * len(ranks),
                      "fraction": total / (r * len(ranks))})
        layers: dict[int, list[int]] = {}
        for layer, k in ranks.items():
            idx = next((int(p) for p in layer.split(".") if p.isdigit()), None)
            if idx is not None:
                layers.setdefault(idx, []).append(k)
        if layers:
            ids = sorted(layers)
            third = max(1, len(ids) // 3)
            depth.append({"name": name, "first": _mean_rank(layers, ids[:third]), "last": _mean_rank(layers, ids[-third:])})
    return {"kinds": kinds, "rows": table, "depth": depth}


def _per_rank(values: list, fmt) -> str:
    """Every rank's value (up to 4 ranks), else the range over ranks."""
    if any(v is None for v in values):
        return "—"
    if len(values) <= 4:
        return " / ".join(fmt(v) for v in values)
    return f"{fmt(min(values))} – {fmt(max(values))}"


def distributed_context(rows: dict[str, dict], distributed: dict[str, dict]) -> dict:
    """World size, strategy and per-rank memory of the variants trained over several processes."""
    out = []
    for name, d in distributed.items():
        ranks = sorted(d["per_rank"], key=lambda r: r["rank"])
        held = [r["base_weight_bytes"] for r in ranks]
        whole = rows.get(name, {}).get("base_weight_bytes")
        out.append({"name": name, "strategy": d["strategy"], "backend": d["backend"], "world": d["world_size"],
                    "nnodes": d["nnodes"], "nproc": d["nproc_per_node"], "held": _per_rank(held, R.fmt_bytes),
                    "ratio": max(held) / whole if whole and None not in held else None,
                    "peak": _per_rank([r["peak_memory_bytes"] for r in ranks], R.fmt_bytes)})
    method = next((rows[n].get("peak_memory_method") for n in distributed if n in rows), "") or ""
    return {"rows": out, "method": method}


def distributed_section(lang: str, rows: dict[str, dict], distributed: dict[str, dict]) -> list[str]:
    """The report's distributed-training section alone, as lines (none for a run of one process)."""
    text = R.section(lang, "distributed_section", distributed_context(rows, distributed))
    return text.strip("\n").splitlines() if text.strip() else []


def sensitivity_context(params, sensitivity: dict[str, dict]) -> dict | None:
    """What the lr-sensitivity sentence says: the methods whose chosen multiple lies at an end of the grid."""
    if len(params.lr_grid) < 2 or not sensitivity:
        return None
    factors = sorted(p.factor for p in params.lr_grid)
    edge = []
    for name, s in sensitivity.items():
        factor = next(p["factor"] for p in s["points"] if p["label"] == s["chosen"])
        if factor in (factors[0], factors[-1]):
            edge.append(name)
    chosen = {name: s["chosen"] for name, s in sensitivity.items()}
    return {"edge": edge, "chosen": chosen, "points": len(factors), "methods": len(sensitivity)}


def guide_context(params, rows, entries: dict[str, dict], quality, projs, imported) -> dict:
    names = list(params.run)
    trained = [n for n in names if n not in imported]
    error = {n: entries[n]["error"]["value"] for n in names}
    lora = rows.get(REFERENCE)
    out: dict = {"reference": quality.reference, "memory": None}
    candidates = [n for n in trained if n in projs]
    if candidates:
        mem = min(candidates, key=lambda n: projs[n].total_bytes)
        out["memory"] = {"name": mem, "gib": projs[mem].total_gib,
                         "lora_gib": projs[REFERENCE].total_gib if REFERENCE in projs else None,
                         "measured": rows[mem]["training_memory_bytes"]}
    better = [n for n in names if quality.labels[n] == "better"]
    lowest = min(names, key=error.get)
    out["lowest"] = {"name": lowest, "value": error[lowest]}
    out["best"] = None
    if better:
        best = min(better, key=error.get)
        out["best"] = {"name": best, "value": error[best], "delta": entries[best]["delta"]}
    out["speed"] = None
    if trained:
        fast = max([n for n in trained if n != REFERENCE] or trained, key=lambda n: rows[n]["tokens_per_second"])
        field = [r["tokens_per_second"] for n, r in rows.items() if n not in imported and r["tokens_per_second"] > 0]
        out["speed"] = {"name": fast, "tps": rows[fast]["tokens_per_second"],
                        "faster": R.is_faster(rows, fast, REFERENCE, imported),
                        "lora": lora["tokens_per_second"] if lora else None,
                        "median": float(np.median(field)) if field else None}
    few = min(names, key=lambda n: rows[n]["trainable_params"])
    out["params"] = {"name": few, "params": rows[few]["trainable_params"], "size": rows[few]["adapter_bytes"],
                     "ratio": rows[few]["trainable_params"] / lora["trainable_params"] if lora else None}
    out["worse"] = [n for n in names if quality.labels[n] == "worse"]
    return out


# init parts of the initialisation family (docs/init-family.md): they start from W0 or from data
INIT_FAMILY = ("pissa", "olora", "eva", "corda", "lora_ga")


def init_family_context(specs: dict, methods: dict | None) -> list[dict]:
    """The run's methods with an init of the family, and what building (+ calibrating) cost them:
    `init_seconds` of each seed's train summary (absent in summaries written before it existed)."""
    out = []
    for name, sp in specs.items():
        if sp.init not in INIT_FAMILY:
            continue
        seconds = [s["init_seconds"] for s in (methods[name].summaries if methods and name in methods else [])
                   if s.get("init_seconds") is not None]
        out.append({"name": name, "init": sp.init, "seconds": sum(seconds) / len(seconds) if seconds else None})
    return out


def notes_context(params, rows, imported, methods: dict | None = None) -> dict:
    specs = {n: params.variants[n].spec for n in params.run if n not in imported}
    four_bit = [n for n, sp in specs.items() if sp.base != "full"]
    full = [n for n, sp in specs.items() if sp.base == "full"]
    note = None
    if four_bit and full:
        q, f = rows[four_bit[0]], rows[full[0]]
        note = {"name": four_bit[0], "q": q["base_weight_bytes"], "f": f["base_weight_bytes"],
                "ratio": f["base_weight_bytes"] / q["base_weight_bytes"]}
    return {"four_bit": note, "loftq": any(sp.init == "loftq" for sp in specs.values()),
            "adalora": any(sp.layer == "adalora" for sp in specs.values()),
            "init_family": init_family_context(specs, methods),
            "imported": [n for n in params.run if n in imported]}


def comparison_table(ctx: dict) -> pd.DataFrame:
    """The CSV: one row per variant (means over seeds) and the base model, with intervals and labels."""
    records = []
    for e in [*ctx["methods"], *([ctx["base"]] if ctx["base"] else [])]:
        is_base = e["name"] == BASELINE
        delta = None if is_base else e["delta"]
        records.append({**e["metrics"], "variant": e["name"],
                        "seed": None,  # a mean over seeds (where the metrics carry their cell's seed)
                        "seeds": None if is_base else e["seeds"],
                        "lr_multiple": None if is_base else e["lr_multiple"], "lr": None if is_base else e["lr"],
                        "error_rate": e["error"]["value"], "error_low": e["error"]["low"],
                        "error_high": e["error"]["high"],
                        "delta_vs_lora": delta["value"] if delta else None, "delta_low": delta["low"] if delta else None,
                        "delta_high": delta["high"] if delta else None, "p_holm": delta["p_holm"] if delta else None,
                        "memory_label": "not_compared" if is_base else e["memory"],
                        "quality_label": "not_compared" if is_base else e["quality"]})
    return validate_comparison(pd.DataFrame(records, columns=list(COMPARISON_COLUMNS)))


# ----- plots ------------------------------------------------------------------------------------------
def label_points(ax, points: list[tuple[str, float, float]], fontsize: int = 8) -> None:
    """Name every point without overprinting: each label goes right of its point, moved up (with a
    leader line) until its box clears the labels already placed (greedy, lowest point first).

    Methods with the same parameter count or similar memory sit on top of each other.
    """
    ax.figure.canvas.draw()  # fix the axes limits so data -> display positions are final
    to_pt = 72.0 / ax.figure.dpi
    height, char_width = fontsize * 1.25, fontsize * 0.62  # label box in points (DejaVu Sans)
    boxes: list[tuple[float, float, float, float]] = []
    located = [(*(c * to_pt for c in ax.transData.transform((x, y))), name, x, y) for name, x, y in points]
    for px, py, name, x, y in sorted(located, key=lambda item: (item[1], item[0])):
        left, right = px + 8, px + 8 + char_width * len(name)
        bottom = py + 2
        while any(left < r and l < right and bottom < t and b < bottom + height for l, b, r, t in boxes):
            bottom += 1.0
        boxes.append((left, bottom, right, bottom + height))
        dy = bottom - (py + 2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(8, 2 + dy), fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"} if dy > 0 else None)


def make_plots(folder: Path, rows, curves, g2p: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality_key = "phoneme_error_rate" if g2p else "exact_match"
    quality_name = "phoneme error rate (lower is better)" if g2p else "exact match (higher is better)"

    # one style per variant in every plot; the 10 colours repeat with another line style and marker
    names = list(dict.fromkeys([*curves, *(n for n in rows if n != BASELINE)]))
    palette = plt.get_cmap("tab10").colors
    style = {name: (palette[i % 10], ("-", "-.", ":")[i // 10 % 3], ("o", "s", "^")[i // 10 % 3])
             for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        color, linestyle, marker = style[name]
        ax.plot(curve["step"], curve["loss"], linestyle, color=color, label=name, alpha=0.85)
        val = curve.dropna(subset=["val_loss"])
        ax.plot(val["step"], val["val_loss"], "--", marker=marker, color=color, alpha=0.6, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("response loss (solid: train, dashed dots: validation)")
    ax.set_title("Loss curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=110)
    plt.close(fig)

    for key, xlabel, fname, logx in (("trainable_params", "trainable parameters", "quality_vs_params.png", True),
                                     ("training_memory_bytes", "training memory (MiB)", "quality_vs_memory.png", False)):
        fig, ax = plt.subplots(figsize=(7, 5))
        points = []
        for name, row in rows.items():
            if name == BASELINE or row.get(quality_key) is None or row[key] is None:  # imported: no training memory
                continue
            x = row[key] / (2**20 if key.endswith("memory_bytes") else 1)
            color, _, marker = style[name]
            ax.scatter(x, row[quality_key], s=40, color=color, marker=marker)
            points.append((name, x, row[quality_key]))
        if logx:
            ax.set_xscale("log")
        label_points(ax, points)
        base = rows.get(BASELINE)
        if base and base.get(quality_key) is not None:
            ax.axhline(base[quality_key], color="gray", linestyle=":", label="base model (no adapter)")
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality_name)
        ax.set_title(f"Quality vs {xlabel}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)



def lr_sensitivity_plot(folder: Path, sensitivity: dict[str, dict], criterion: str) -> None:
    """Validation loss vs lr per method (log x): the mean over seeds joined, each seed's point, the chosen lr ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, s) in enumerate(sensitivity.items()):
        color, linestyle = palette[i % 10], ("-", "-.", ":")[i // 10 % 3]
        xs = [p["lr"] for p in s["points"]]
        ax.plot(xs, [p["mean"] for p in s["points"]], linestyle, marker="o", color=color, label=name, markersize=4)
        for p in s["points"]:
            ax.scatter([p["lr"]] * len(p["per_seed"]), p["per_seed"], s=10, color=color, alpha=0.4)
            if p["label"] == s["chosen"]:
                ax.scatter([p["lr"]], [p["mean"]], s=140, facecolors="none", edgecolors=color, linewidths=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation loss ({criterion}; line: mean over seeds, dots: seeds)")
    ax.set_title("Learning-rate sensitivity (ringed: the chosen lr)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(folder / "lr_sensitivity.png", dpi=110)
    plt.close(fig)


# ----- MLflow -----------------------------------------------------------------------------------------
def track_comparison(params, args, members: list[dict]) -> str | None:
    """The comparison run: the report, CSV, plots and validation tables as artifacts, members.json, and
    the `comparison_run` tag on every member run (those in this run's store). None with tracking off."""
    if not params.tracking.enabled:
        return None
    tracker = Tracker(True, params.tracking.experiment, params.tracking.uri)
    tags = {k: v for k, v in standard_tags("comparison", "compare").items() if k != "variant"}
    run_id = tracker.start("comparison", {**tags, "kind": "comparison"})
    if run_id is None:
        return None
    tracker.log_params({"run": ",".join(params.run), "seeds": ",".join(map(str, params.seeds)),
                        "lr_grid": ",".join(p.label for p in params.lr_grid), "lr_selection": params.lr_selection})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "members.json"
        path.write_text(json.dumps({"comparison_run": run_id, "members": members}, indent=2))
        tracker.log_artifact(path)
    for path in (args.md, args.md_zh, args.csv):
        tracker.log_artifact(path, "report")
    tracker.log_artifacts(args.plots, "plots")
    for name in params.run:
        path = Path(args.validation) / f"{name}.csv"
        if path.is_file():
            tracker.log_artifact(path, "validation")
    for member in members:
        if member.get("uri") in (None, tracker.uri):  # a run in another store cannot be tagged from here
            # `selected` too: evaluate tags the cell it tests; a cell chosen by an earlier grid is untagged here
            tracker.set_tags(member["run_id"], {"comparison_run": run_id,
                                                "selected": str(member["selected"]).lower()})
    tracker.end("FINISHED")
    return run_id


# ----- the stage --------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None):
    """(arguments, params as the stage may read them); params is None after a printed error."""
    return start("compare", __doc__, argv,
                 inputs={"--metrics": "the folder of metrics rows", "--predictions": "the folder of predictions",
                         "--curves": "the folder of training curves",
                         "--validation": "the folder of validation tables (select's)",
                         "--selection": "the folder of chosen lr multiples (select's)",
                         "--quantize": "the quantize summary",
                         "--adapters": "the folder of trained adapters (train_summary.json, mlflow.json)"},
                 outputs={"--csv": "the comparison table", "--md": "the report", "--md-zh": "the Chinese report",
                          "--plots": "the plots folder"})


def run(args, params) -> dict:
    """Read the cells, build the context, write every output at once (a failure keeps the previous report)."""
    inputs = load_inputs(params, args)
    g2p = params.data.source == "cmudict"
    device = "cuda" if params.train.device == "cuda" else (
        "CPU" if params.train.device == "cpu" or not __import__("torch").cuda.is_available() else "cuda")
    ctx = build_context(params, inputs, g2p, device, projections(params), dt.date.today().isoformat(), git_commit())
    buf = io.StringIO()
    comparison_table(ctx).to_csv(buf, index=False)
    files = {args.csv: buf.getvalue(), args.md: R.render("en", ctx), args.md_zh: R.render("zh", ctx)}
    rows = {name: m.row for name, m in inputs.methods.items()}
    if inputs.base is not None:
        rows[BASELINE] = inputs.base
    curves = {name: m.curve for name, m in inputs.methods.items() if m.curve is not None}

    def plots(tmp: Path) -> None:
        make_plots(tmp, rows, curves, g2p)
        if ctx["sensitivity"]:
            lr_sensitivity_plot(tmp, inputs.sensitivity, params.lr_selection)

    commit_outputs(files, {args.plots: plots})
    track_comparison(params, args, inputs.members)
    print(f"compare: wrote {args.csv}, {args.md}, {args.md_zh} and {args.plots}/ for {len(params.run)} variants × "
          f"{len(params.seeds)} seed(s)", flush=True)
    return ctx


def main(argv: list[str] | None = None) -> int:
    args, params = parse(argv)
    if params is None:
        return 1
    try:
        run(args, params)
    except (ParamsError, DataError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
