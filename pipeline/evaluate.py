"""Stage `evaluate@<variant>-<seed>` (and `evaluate_base`): quality and cost of one trained variant.

    python -m pipeline.evaluate <variant> --seed <s> --selection reports/selection/<variant>.json \
        --adapter models/selected/<variant>/seed<s> --data data/prepared --base models/base \
        --metrics reports/metrics/<variant>/seed<s>.json --predictions reports/predictions/<variant>/seed<s>.jsonl
    python -m pipeline.evaluate base --data ... --base ... --metrics ... --predictions ...   # no --adapter:
                                                  # the untouched base model, the baseline row named `base`

A variant is tested once per seed, with the lr multiple that `select@<variant>` chose on
validation loss (--selection): --adapter is select's copy of the seed's chosen cell, checked
against the selection (variant, seed, multiple). The other cells are never tested.

On the test split: eval loss on response tokens only, and greedy generations scored by
exact match and — for the G2P task — phoneme error rate (edit distance over phonemes /
reference length). The costs measured in training (trainable params, adapter bytes,
base-weight bytes, peak memory, wall time, tokens/s) come from the adapter folder's
train_summary.json. Writes, atomically:

- the metrics (--metrics): one flat row (validated by the VariantMetrics schema), with the
  cell's seed, lr multiple and lr;
- the predictions (--predictions): every test prompt's generation and its edit distance
  (the report's paired bootstrap uses them).

MLflow: the metrics go onto the chosen cell's run (opened by its train stage, recorded in its
adapter folder), which is tagged `selected=true` (compare marks every other cell of the grid
`selected=false`, so a choice that moved leaves one selected run per seed); this stage's own run,
nested under it, spans the stage and holds its cost
(eval_seconds) and the predictions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

import variants
from pipeline.errors import DataError
from pipeline.files import commit_outputs
from pipeline.gguf_base import load_base
from pipeline.lm import encode_records, generate, mean_response_loss
from pipeline.metrics import edit_distance, exact_match, normalize_generation, phoneme_error_rate
from pipeline.params import ParamsError
from pipeline.runtime import PeakMemory, Progress, configure_cpu, pick_device, seed_everything
from pipeline.schemas import METRIC_COLUMNS, validate_metrics
from pipeline.splits import read_split
from pipeline.stage import start
from pipeline.tracking import Tracker, standard_tags


def base_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def stage_name(args) -> str:
    """A variant's seed is stage evaluate@<name>-<seed>; the base model alone is stage evaluate_base."""
    return f"evaluate@{args.name}-{args.seed}" if args.adapter else "evaluate_base"


def parse(argv: list[str] | None = None):
    """(arguments, params as the stage may read them); params is None after a printed error."""
    return start("evaluate", __doc__, argv, stage=stage_name,
                 positional=(("name", {"help": "the row's name: the variant, or `base` for the base model"}),),
                 inputs={"--data": "the prepared data folder", "--base": "the base model folder"},
                 outputs={"--metrics": "the metrics row (JSON)", "--predictions": "the predictions (JSON lines)"},
                 options=(("--adapter", {"metavar": "PATH", "help": "(read) the seed's chosen adapter (select's "
                                                                     "copy); without it the base model is evaluated"}),
                          ("--seed", {"type": int, "metavar": "SEED", "help": "the training seed of --adapter"}),
                          ("--selection", {"metavar": "PATH", "help": "(read) the variant's chosen lr multiple "
                                                                      "(select@<variant>)"})))


def chosen_adapter(args) -> tuple[Path, dict]:
    """The adapter folder of the lr multiple select@<variant> chose for this seed, and the selection.

    Every mismatch is a DataError naming the file and the stage that makes it right, raised before
    any model is loaded."""
    given = [flag for flag, value in (("--seed", args.seed), ("--selection", args.selection)) if value is not None]
    if len(given) < 2:
        raise DataError("--adapter needs --seed and --selection (the seed's chosen adapter, and the chosen "
                        f"multiple); got only {', '.join(given) or 'neither'}")
    if args.seed < 0:
        raise DataError(f"--seed must be a non-negative integer, got {args.seed}")
    path = Path(args.selection)
    if not path.is_file():
        raise DataError(f"no lr selection at {path}: run select@{args.name} first")
    try:
        selection = json.loads(path.read_text())
        label = selection["lr_multiple"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not an lr selection (needs lr_multiple): {err}") from None
    if selection.get("variant") != args.name:
        raise DataError(f"{path} holds the selection of {selection.get('variant')!r}, not of {args.name!r}")
    adapter = Path(args.adapter)
    if not (adapter / "train_summary.json").is_file():
        raise DataError(f"no trained adapter in {adapter} (train_summary.json is missing): select@{args.name} "
                        f"chose lr multiple {label}; run train@{args.name}-{args.seed}-{label}, then "
                        f"select@{args.name}")
    summary = json.loads((adapter / "train_summary.json").read_text())
    found = (summary.get("variant"), summary.get("seed"), summary.get("lr_multiple"))
    if found != (args.name, args.seed, str(label)):
        raise DataError(f"{adapter} holds the adapter of variant, seed, lr multiple {found}, not "
                        f"{(args.name, args.seed, str(label))}: rerun select@{args.name} (it copies the chosen cell)")
    return adapter, selection


def check_base_arguments(args) -> None:
    given = [flag for flag, value in (("--seed", args.seed), ("--selection", args.selection)) if value is not None]
    if given:
        raise DataError(f"{' and '.join(given)} only go with --adapter (the base model has no seed or lr)")


def run(args, params) -> dict:
    name = args.name if args.adapter else None  # None: the base model alone
    label = args.name
    if name is not None:
        adapter, _ = chosen_adapter(args)
    else:
        adapter = None
        check_base_arguments(args)
    configure_cpu()
    seed_everything(params.seed)
    device = pick_device(params.train.device)
    model, tokenizer = load_base(args.base, params.model.dtype, params.model.trust_remote_code)
    summary = None
    if name is not None:
        adapted = variants.load(model, adapter)
        summary = json.loads((adapter / "train_summary.json").read_text())
        # An exact merge makes generation cost what the base model costs.
        if all(getattr(p, "merge_is_exact", True) for p in adapted.parts):
            adapted.merge()
    model.to(device).eval()

    test_records = read_split(args.data, "test")
    test_ex = encode_records(tokenizer, test_records, params.data.max_length)
    ev = params.eval
    with PeakMemory(device, resident=model) as peak:
        eval_loss = mean_response_loss(model, test_ex, ev.batch_size, tokenizer.pad_token_id, device)
        progress = Progress(f"eval {label}", len(test_ex), every=ev.batch_size)
        raw = generate(model, tokenizer, test_ex, ev.batch_size, ev.max_new_tokens, device, progress)
    predictions = [normalize_generation(text) for text in raw]
    references = [normalize_generation(r["response"]) for r in test_records]
    g2p = params.data.source == "cmudict"
    per = phoneme_error_rate(predictions, references) if g2p else None
    em = exact_match(predictions, references)

    row = {
        "variant": label,
        "layer": summary["layer"] if summary else "none",
        "phoneme_error_rate": per,
        "exact_match": em,
        "eval_loss": eval_loss,
        "trainable_params": summary["trainable_params"] if summary else 0,
        "trainable_percent": summary["trainable_percent"] if summary else 0.0,
        "adapter_bytes": summary["adapter_bytes"] if summary else 0,
        "base_weight_bytes": summary["base_weight_bytes"] if summary else base_bytes(model),
        # variants: peak memory of training; the baseline: of its evaluation (it is not trained)
        "peak_memory_bytes": summary["peak_memory_bytes"] if summary else peak.bytes,
        "training_memory_bytes": summary["training_memory_bytes"] if summary else (
            base_bytes(model) + peak.increment if device.type == "cpu" else peak.bytes),
        "train_seconds": summary["train_seconds"] if summary else 0.0,
        "tokens_per_second": summary["tokens_per_second"] if summary else 0.0,
        "steps": summary["steps"] if summary else 0,
        "optimizer": summary["optimizer"] if summary else "none",
        # the cell: its training seed and the chosen lr multiple (the base model has neither)
        "seed": args.seed if summary else None,
        "lr_multiple": summary["lr_multiple"] if summary else None,
    }
    validate_metrics(pd.DataFrame([row], columns=list(METRIC_COLUMNS)))
    extra = {"label": summary["label"] if summary else "base model", "eval_seconds": peak.seconds,
             "n_test": len(test_ex), "task": "g2p" if g2p else params.data.source,
             "lr": summary["lr"] if summary else None,
             "final_train_loss": summary["final_loss"] if summary else None,
             "peak_memory_method": summary["peak_memory_method"] if summary else peak.method,
             "parts": summary.get("parts", {}) if summary else {},
             "spec": summary["spec"] if summary else None}
    lines = []
    for rec, pred, ref in zip(test_records, predictions, references, strict=True):
        lines.append(json.dumps({"id": rec["id"], "prediction": pred, "reference": ref,
                                 "edits": edit_distance(pred.split(), ref.split()), "ref_len": len(ref.split()),
                                 "exact": pred == ref}, ensure_ascii=False))
    commit_outputs({args.predictions: "\n".join(lines) + "\n",
                    args.metrics: json.dumps({**row, **extra}, indent=2, sort_keys=True, allow_nan=False) + "\n"})

    if name is not None:
        run_info = json.loads((adapter / "mlflow.json").read_text())
        train_run = run_info.get("run_id")
        tracker = Tracker(params.tracking.enabled and train_run is not None, params.tracking.experiment,
                          run_info.get("uri"))
        # A run of its own, nested under the training run: this stage's start, end, cost and predictions...
        cell = {"seed": str(args.seed), "lr_multiple": row["lr_multiple"]}
        tracker.start(run_name=f"{name} seed={args.seed} evaluate", tags={**standard_tags(name, "evaluate"), **cell},
                      parent_run_id=train_run)
        tracker.log_metrics({"eval_seconds": peak.seconds, "eval_peak_memory_bytes": peak.bytes,
                             "n_test": len(test_ex)})
        tracker.log_artifact(args.predictions, "predictions")
        tracker.end("FINISHED")
        # ...and the test numbers on the chosen cell's training run (the only cell of the seed that is tested),
        # so the runs table shows them next to its params.
        tracker.log_metrics({k: v for k, v in row.items()
                             if isinstance(v, (int, float)) and v is not None and k != "seed"}, run_id=train_run)
        tracker.set_tags(train_run, {"selected": "true"})  # the cell select chose (filter: tags.selected = 'true')
    shown = f"PER {per:.3f}, " if per is not None else ""
    print(f"[eval {label}] {shown}exact match {em:.3f}, eval loss {eval_loss:.3f} ({len(test_ex)} test examples)",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args, params = parse(argv)
    if params is None:
        return 1
    try:
        run(args, params)
    except (ParamsError, DataError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
