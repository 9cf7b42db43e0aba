"""Stage `evaluate@<variant>` (and `evaluate_base`): quality and cost of one trained variant.

    python -m pipeline.evaluate <variant> --adapter models/adapters/<variant> --data data/prepared \
        --base models/base --metrics reports/metrics/<variant>.json --predictions reports/predictions/<variant>.jsonl
    python -m pipeline.evaluate base --data ... --base ... --metrics ... --predictions ...   # no --adapter:
                                                  # the untouched base model, the baseline row named `base`

On the test split: eval loss on response tokens only, and greedy generations scored by
exact match and — for the G2P task — phoneme error rate (edit distance over phonemes /
reference length). The costs measured in training (trainable params, adapter bytes,
base-weight bytes, peak memory, wall time, tokens/s) come from the adapter folder's
train_summary.json. Writes, atomically:

- the metrics (--metrics): one flat row (validated by the VariantMetrics schema);
- the predictions (--predictions): every test prompt's generation and its edit distance
  (the report's paired bootstrap uses them).

MLflow: the metrics go onto the variant's run (opened by `train@<variant>`); this stage's own
run, nested under it, spans the stage and holds its cost (eval_seconds) and the predictions.
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


def parse(argv: list[str] | None = None):
    """(arguments, params as the stage may read them); params is None after a printed error."""
    return start("evaluate", __doc__, argv,
                 # a variant is stage evaluate@<name>; the base model alone is stage evaluate_base
                 stage=lambda a: f"evaluate@{a.name}" if a.adapter else "evaluate_base",
                 positional=(("name", {"help": "the row's name: the variant, or `base` for the base model"}),),
                 inputs={"--data": "the prepared data folder", "--base": "the base model folder"},
                 outputs={"--metrics": "the metrics row (JSON)", "--predictions": "the predictions (JSON lines)"},
                 options=(("--adapter", {"metavar": "PATH", "help": "(read) the adapter folder; without it the "
                                                                     "base model is evaluated"}),))


def run(args, params) -> dict:
    name = args.name if args.adapter else None  # None: the base model alone
    label = args.name
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is not None and not (adapter / "train_summary.json").is_file():
        raise DataError(f"no trained adapter in {adapter} (train_summary.json is missing)")
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
        tracker.start(run_name=f"{name} evaluate", tags=standard_tags(name, "evaluate"), parent_run_id=train_run)
        tracker.log_metrics({"eval_seconds": peak.seconds, "eval_peak_memory_bytes": peak.bytes,
                             "n_test": len(test_ex)})
        tracker.log_artifact(args.predictions, "predictions")
        tracker.end("FINISHED")
        # ...and the variant's numbers on its training run (once: one bar per variant in the charts), so the
        # runs table shows them next to its params.
        tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None},
                            run_id=train_run)
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
