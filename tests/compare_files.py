"""Constructed inputs of the compare stage in the grid's layout (pipeline/cells.py), with errors chosen by the
test: every file the train, select and evaluate stages would leave, no model and no DVC."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import yaml

from pipeline.cells import cells, seed_file
from pipeline.params import params_from_dict

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def grid_params(names, seeds=(0,), lr_grid=(1,), entries: dict | None = None, **top) -> object:
    """The repository's params.yaml with `run`, `seeds` and `lr_grid` set (catalog entries: the repository's,
    plus `entries`); keyword `section__field=value` sets one field."""
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["variants"].update(entries or {})
    raw.update(run=list(names), seeds=list(seeds), lr_grid=list(lr_grid), variant=names[0])
    raw["tracking"] = {**raw.get("tracking", {}), "enabled": False}
    for key, value in top.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return params_from_dict(raw)


def folders(root: Path) -> argparse.Namespace:
    """compare's arguments, as dvc.yaml passes them, below `root`."""
    r = Path(root)
    return argparse.Namespace(
        metrics=str(r / "reports/metrics"), predictions=str(r / "reports/predictions"),
        curves=str(r / "reports/curves"), validation=str(r / "reports/validation"),
        selection=str(r / "reports/selection"), quantize=str(r / "reports/quantize.json"),
        adapters=str(r / "models/adapters"), csv=str(r / "reports/comparison.csv"),
        md=str(r / "reports/comparison.md"), md_zh=str(r / "reports/comparison.zh.md"), plots=str(r / "reports/plots"))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _predictions(edits, lengths) -> list[dict]:
    return [{"id": f"w{i:03d}", "prediction": "x", "reference": "x", "edits": int(e), "ref_len": int(n),
             "exact": int(e) == 0} for i, (e, n) in enumerate(zip(edits, lengths, strict=True))]


def _metrics_row(name, seed, label, lr, preds, memory, tps, extra=None) -> dict:
    edits = sum(p["edits"] for p in preds)
    length = sum(p["ref_len"] for p in preds)
    row = {"variant": name, "layer": "lora", "phoneme_error_rate": edits / length,
           "exact_match": sum(p["exact"] for p in preds) / len(preds), "eval_loss": 1.5 + edits / length,
           "trainable_params": 2_442_240 if name != "vera" else 209_280, "trainable_percent": 1.783,
           "adapter_bytes": 9_813_168, "base_weight_bytes": 538_060_288, "peak_memory_bytes": int(2.2 * GIB),
           "training_memory_bytes": int(memory), "train_seconds": 20.0, "tokens_per_second": float(tps), "steps": 12,
           "optimizer": "AdamW", "seed": seed, "lr_multiple": label, "lr": lr, "n_test": len(preds),
           "peak_memory_method": "rss (VmHWM, reset at start)", "parts": {}, "label": name, "eval_seconds": 1.0}
    row.update(extra or {})
    return row


def write_run(root: Path, params, edits: dict, lengths, *, chosen: dict | None = None, val_loss=None,
              memory: dict | None = None, tps: dict | None = None, extra: dict | None = None,
              summaries: dict | None = None, run_ids: dict | None = None, uri: str | None = None) -> argparse.Namespace:
    """Every input compare reads, for the cells of `params`.

    edits[name][seed_index] -> the per-item phoneme edits of that method's chosen cell at that seed (the
    base model's under "base", one list); chosen[name]: the chosen lr label (default: the grid's first);
    val_loss(name, seed, factor) -> that cell's validation loss; memory/tps[name]: training memory and
    tokens/s (a number, or one per seed); run_ids[(name, seed, label)]: the cell's MLflow run id."""
    args = folders(root)
    chosen = chosen or {}
    val_loss = val_loss or (lambda name, seed, factor: 2.0 + (factor - 1.0) ** 2)
    for name in params.run:
        label = chosen.get(name, params.lr_grid[0].label)
        vcfg = params.variants[name]
        _write(Path(args.selection) / f"{name}.json",
               json.dumps({"variant": name, "lr_multiple": label, "lr": vcfg.learning_rate(params.train, float(label)),
                           "criterion": params.lr_selection}))
        rows = []
        for cell in cells(name, params.seeds, params.lr_grid):
            i = params.seeds.index(cell.seed)
            lr = vcfg.learning_rate(params.train, cell.lr.factor)
            loss = val_loss(name, cell.seed, cell.lr.factor)
            rows.append(f"{name},{cell.seed},{cell.lr.label},{lr},{loss},{loss - 0.1},{cell.lr.label == label}")
            folder = Path(args.adapters) / name / cell.adapter
            summary = {"variant": name, "lr": lr, **(summaries or {}).get(name, {})}
            _write(folder / "train_summary.json", json.dumps(summary))
            run_id = (run_ids or {}).get((name, cell.seed, cell.lr.label))
            _write(folder / "mlflow.json", json.dumps({"run_id": run_id, "uri": uri}))
            _write(Path(args.curves) / name / cell.curve,
                   "step,loss,lr,grad_norm,val_loss,tokens,seconds\n1,3.0,0.001,1.0,,100,1.0\n"
                   f"2,2.5,0.001,1.0,{loss},100,1.0\n")
            if cell.lr.label != label:
                continue
            preds = _predictions(edits[name][i], lengths)
            mem = (memory or {}).get(name, 1.75 * GIB)
            speed = (tps or {}).get(name, 150.0)
            row = _metrics_row(name, cell.seed, label, lr, preds, mem[i] if isinstance(mem, (list, tuple)) else mem,
                               speed[i] if isinstance(speed, (list, tuple)) else speed, (extra or {}).get(name))
            _write(Path(args.metrics) / name / seed_file(cell.seed, ".json"), json.dumps(row))
            _write(Path(args.predictions) / name / seed_file(cell.seed, ".jsonl"),
                   "\n".join(json.dumps(p) for p in preds) + "\n")
        _write(Path(args.validation) / f"{name}.csv",
               "variant,seed,lr_multiple,lr,val_loss_final,val_loss_min,chosen\n" + "\n".join(rows) + "\n")
    base = _predictions(edits.get("base", [3] * len(lengths)), lengths)
    base_row = _metrics_row("base", 0, None, None, base, 1.05 * GIB, 0.0,
                            {"layer": "none", "trainable_params": 0, "trainable_percent": 0.0, "adapter_bytes": 0,
                             "train_seconds": 0.0, "steps": 0, "optimizer": "none"})
    _write(Path(args.metrics) / "base.json", json.dumps(base_row))
    _write(Path(args.predictions) / "base.jsonl", "\n".join(json.dumps(p) for p in base) + "\n")
    return args
