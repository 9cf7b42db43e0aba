"""Stage `train@<variant>-<seed>-<lr>`: fine-tune the base model with one variant, one seed, one lr.

    python -m pipeline.train <variant> --seed <s> --lr-multiple <label> --data data/prepared \
        --base models/base --quantized models/quantized --adapter models/adapters/<variant>/seed<s>/lr<label> \
        --curve reports/curves/<variant>/seed<s>-lr<label>.csv --checkpoints models/checkpoints/<variant>/seed<s>-lr<label>

One cell of the grid (pipeline/cells.py): `--seed` seeds the initialisation and the batch order
(the top-level `seed` param is the data split's, not read here), and the learning rate is the
variant's own (variants.<v>.lr, else train.lr) times `--lr-multiple`, the lr_grid value as DVC
prints it (kept as given: it names the cell's stage and files). The stage never reads `seeds`,
`lr_grid` or `run`, so adding a seed or a multiple trains only the new cells.

Reads params (those dvc.yaml declares for `train`), the prepared data and the base
model (and the 4-bit base for QLoRA/LoftQ); builds the variant's adapter (`variants.build`),
trains it with the library's reference loop (every part's hooks, response-only loss) and
writes, atomically:

- the adapter folder (--adapter): the adapter (adapter_config.json + adapter.safetensors),
  train_summary.json (trainable params, peak memory, wall time, tokens/s, the cell's seed, lr and
  multiple, its final and lowest validation loss, ...) and mlflow.json (the cell's MLflow run,
  which `evaluate` completes when `select` chooses this cell);
- the curve (--curve): per-step loss, learning rate, gradient norm, and the
  validation loss every `train.eval_interval` steps and always at the last step (`select`
  compares the cells on it).

MLflow: one run per cell, named `<variant> seed=<s> lr=<lr>`, with variant, seed, lr and
lr_multiple as params and as tags (the UI's "Group by").

A variant whose params entry is `peft_adapter: <folder>` is imported, not trained
(`import_peft_adapter`): the PEFT adapter is loaded onto the base (`variants.load_peft`) and
written in our format with the same outputs, so `evaluate@<variant>` treats it like any other.

Checkpoints (every `train.checkpoint_interval` steps) go to --checkpoints, a scratch folder
that is neither a DVC output nor tracked by git: they serve only to resume a killed run, so
the stage stays restorable from DVC's run-cache. Progress (loss, s/step, ETA) is printed
every step. A non-finite loss or gradient stops
the run at once with an error naming the variant and step; the MLflow run then ends as
FAILED and no adapter is written.

With `train.distributed.strategy` ddp or fsdp the stage re-launches itself under torchrun
(pipeline/launch.py) and every worker runs `run`: each joins the process group, builds the
same model from the same seed, reads the same global batches (`variants.train` takes each
rank's share) and validates on every rank (FSDP2 needs every rank in a forward). Progress lines
carry `[<variant> rank k/N]`. Only rank 0 writes the outputs, clears the checkpoints and talks
to MLflow (the other ranks' Tracker is off); train_summary.json then also records the strategy,
the world size, and every rank's peak memory and bytes of base weights held. Evaluation stays
single-process on the gathered adapter.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

import variants
from pipeline import launch
from pipeline.errors import DataError
from pipeline.files import commit_outputs
from pipeline.gguf_base import load_base
from pipeline.lm import encode_records, mean_response_loss, response_loss, training_batches
from pipeline.params import ParamsError
from pipeline.runtime import PeakMemory, Progress, configure_cpu, format_seconds, pick_device, seed_everything
from pipeline.splits import read_split
from pipeline.stage import start
from pipeline.tracking import Tracker, standard_tags
from variants import peft_load
from variants.io import file_sha256
from variants.quant import load_quantized

CURVE_COLUMNS = ("step", "loss", "lr", "grad_norm", "val_loss", "tokens", "seconds")


def run_fingerprint(params, vcfg, data: str, base: str, quantized: str, seed: int, factor: float) -> str:
    """What a checkpoint must have been made with to be resumed: spec, lr, budget, the cell's seed, data,
    base, dtype and, for a distributed run, the strategy and world size (each rank's RNG state is in it)."""
    digest = hashlib.sha256()
    train = {k: v for k, v in vars(params.train).items() if k != "distributed"}
    dist = params.train.distributed
    if dist.enabled:  # (the rendezvous endpoint may change between a killed run and its resumption)
        train["world"] = [dist.strategy, dist.world_size]
    digest.update(json.dumps({"spec": vcfg.spec.to_dict(), "lr": vcfg.learning_rate(params.train, factor),
                              "train": train, "seed": seed, "dtype": params.model.dtype,
                              "max_length": params.data.max_length}, sort_keys=True, default=str).encode())
    bases = [Path(base) / "summary.json"] + ([Path(quantized) / "summary.json"] if vcfg.spec.base != "full" else [])
    for path in sorted(Path(data).glob("*.jsonl")) + bases:
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def seed_arg(text: str) -> int:
    """--seed: a non-negative integer (argparse reports the bad value)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def lr_multiple_arg(text: str) -> str:
    """--lr-multiple: the lr_grid value as DVC printed it; kept as given (it names the cell), checked to be a
    positive, finite number."""
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number (a multiple of the variant's lr), "
                                         f"got {text!r}")
    return text


def parse(argv: list[str] | None = None):
    """(arguments, params as `train@<variant>-<seed>-<lr>` may read them); params is None after a printed error."""
    return start("train", __doc__, argv, stage=stage_name,
                 positional=(("variant", {"help": "the variants.<name> entry of params.yaml"}),),
                 inputs={"--data": "the prepared data folder", "--base": "the base model folder",
                         "--quantized": "the 4-bit base folder (QLoRA, LoftQ)"},
                 outputs={"--adapter": "the adapter folder", "--curve": "the per-step curve (CSV)"},
                 options=(("--seed", {"required": True, "type": seed_arg,
                                      "help": "the cell's training seed (initialisation, batch order)"}),
                          ("--lr-multiple", {"required": True, "type": lr_multiple_arg, "metavar": "LABEL",
                                             "help": "the cell's multiple of the variant's lr, as lr_grid's "
                                                     "label (1, 0.5, 2.0, ...)"}),
                          ("--checkpoints", {"required": True, "metavar": "PATH",
                                             "help": "scratch folder for resumable checkpoints (not an output)"})))


def stage_name(args) -> str:
    """The cell's stage as DVC's matrix names it."""
    return f"train@{args.variant}-{args.seed}-{args.lr_multiple}"


def cell_params(name: str, seed: int, lr: float | None, multiple: str) -> dict:
    """The cell's coordinates: MLflow params and tags alike (the UI groups runs by tags)."""
    return {"variant": name, "seed": seed, "lr": lr, "lr_multiple": multiple}


def tag_values(cell: dict) -> dict[str, str]:
    return {k: str(v) for k, v in cell.items() if v is not None}


def run_name(name: str, seed: int, lr: float | None) -> str:
    return f"{name} seed={seed} lr={lr:.0e}" if lr is not None else f"{name} seed={seed}"


def train_params(train_cfg) -> dict:
    """train.* as flat MLflow params (train.distributed.strategy, ...)."""
    flat = {}
    for key, value in vars(train_cfg).items():
        if key == "distributed":
            flat.update({f"train.distributed.{k}": v for k, v in vars(value).items()})
        else:
            flat[f"train.{key}"] = value
    return flat


def run(args, params, worker: launch.Worker | None = None) -> dict:
    """Train one variant; `worker`: this process's rank in a distributed run (None: one process)."""
    name = args.variant
    vcfg = params.get_variant(name)
    if vcfg.peft_adapter is not None:
        return import_peft_adapter(args, params, vcfg)
    train_cfg = params.train
    seed, multiple = args.seed, args.lr_multiple
    configure_cpu()
    seed_everything(seed)
    device = worker.device if worker is not None else pick_device(train_cfg.device)
    label = worker.label(name) if worker is not None else name
    writes = worker is None or worker.writes

    model, tokenizer = load_base(args.base, params.model.dtype, params.model.trust_remote_code)
    train_ex = encode_records(tokenizer, read_split(args.data, "train"), params.data.max_length)
    val_ex = encode_records(tokenizer, read_split(args.data, "validation"), params.data.max_length)
    built = time.perf_counter()
    adapted = variants.build(model, vcfg.spec, quantized=load_quantized(args.quantized) if vcfg.spec.base != "full" else None)
    build_seconds = time.perf_counter() - built  # includes a data-free init's SVD/QR (PiSSA, OLoRA)
    model.to(device)
    trainable, total = adapted.parameter_counts()
    print(f"[{label}] {vcfg.spec.label}: {adapted.trainable_summary()}", flush=True)

    settings = variants.TrainSettings(
        steps=train_cfg.steps, lr=vcfg.learning_rate(train_cfg, float(multiple)), weight_decay=train_cfg.weight_decay,
        warmup_steps=train_cfg.warmup_steps, schedule=train_cfg.schedule, grad_clip=train_cfg.grad_clip)
    pad_id = tokenizer.pad_token_id
    init_info: dict = {}
    if adapted.needs_calibration:
        # A data-aware init (docs/init-family.md) sees the first n batches of the TRAINING stream only:
        # the same seed, from a generator of its own, so the training batch order stays every variant's.
        n = adapted.calibration_batches()
        calibration = [{k: v.to(device) for k, v in b.items()}
                       for b in training_batches(train_ex, train_cfg.batch_size, n, seed, pad_id)]
        init_info = adapted.calibrate(calibration, loss_fn=response_loss)
        print(f"[{label}] init={vcfg.spec.init}: calibrated on {n} training batches in "
              f"{format_seconds(init_info['seconds'])}", flush=True)
    init_seconds = build_seconds + float(init_info.get("seconds", 0.0))
    batches = ({k: v.to(device) for k, v in b.items()}
               for b in training_batches(train_ex, train_cfg.batch_size, train_cfg.steps, seed, pad_id))

    rows: list[dict] = []
    tracker = Tracker(params.tracking.enabled and writes, params.tracking.experiment, params.tracking.uri)
    checkpoint = None
    previous = None
    if train_cfg.checkpoint_interval:
        # The checkpoint also carries the curve so far and the MLflow run to continue.
        checkpoint = variants.Checkpointer(args.checkpoints, train_cfg.checkpoint_interval,
                                           run_fingerprint(params, vcfg, args.data, args.base, args.quantized, seed,
                                                           float(multiple)),
                                           get_extra=lambda: {"rows": rows, "run_id": tracker.run_id})
        previous = checkpoint.load()
        if previous is not None:
            print(f"[{label}] resuming from the checkpoint at step {previous['step']} of {train_cfg.steps}", flush=True)
            rows.extend(previous["extra"]["rows"])
    progress = Progress(label, train_cfg.steps)
    cell = cell_params(name, seed, settings.lr, multiple)
    tracker.start(run_name=run_name(name, seed, settings.lr),
                  tags={**standard_tags(name, "train"), **tag_values(cell), "layer": vcfg.spec.layer},
                  run_id=previous["extra"]["run_id"] if previous is not None else None)
    if previous is None:
        tracker.log_params({**{f"spec.{k}": v for k, v in vcfg.spec.to_dict().items()},
                            **train_params(train_cfg), "train.lr_used": settings.lr, **cell,
                            "model.source": params.model.source,
                            "data.source": params.data.source, "data.n_train": params.data.n_train})

    done = {"steps": previous["step"] if previous is not None else 0}

    def on_step(record: variants.StepRecord) -> None:
        done["steps"] = record.step + 1
        row = {"step": record.step + 1, "loss": record.loss, "lr": record.lr, "grad_norm": record.grad_norm,
               "val_loss": None, "tokens": record.tokens, "seconds": record.seconds}
        interval = train_cfg.eval_interval
        # always at the last step, whatever the interval: `select` compares the cells on it
        if (interval and (record.step + 1) % interval == 0) or record.step + 1 == train_cfg.steps:
            model.eval()
            row["val_loss"] = mean_response_loss(model, val_ex, 64, pad_id, device)
            model.train()
        rows.append(row)
        val = f" val {row['val_loss']:.3f}" if row["val_loss"] is not None else ""
        progress.update(record.step + 1, f"loss {record.loss:.3f}{val} lr {record.lr:.2e} {record.seconds:.2f}s/step")

    started = time.perf_counter()
    try:
        with PeakMemory(device, resident=model) as peak:
            variants.train(adapted, batches, settings, on_step=on_step, loss_fn=response_loss, checkpoint=checkpoint,
                           **({"strategy": worker.strategy} if worker is not None else {}))
    except BaseException as err:
        if worker is not None:  # every rank says where it stopped; torchrun's summary names the first to fail
            print(f"{stage_name(args)} [rank {worker.rank}/{worker.world_size}]: stopped after {done['steps']} of "
                  f"{train_cfg.steps} steps: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        tracker.log_curve(rows, ("loss", "lr", "grad_norm", "val_loss"))
        tracker.end("FAILED")
        raise
    wall = time.perf_counter() - started
    base_weight_bytes = adapted.base_weight_bytes()
    training_memory = (base_weight_bytes + peak.increment) if device.type == "cpu" else peak.bytes
    distributed = None
    if worker is not None:
        from variants.distributed import base_bytes_per_rank  # (what the rank held while the model was wrapped)

        per_rank = worker.gather({"rank": worker.rank, "device": str(device), "peak_memory_bytes": peak.bytes,
                                  "peak_memory_increment_bytes": peak.increment,
                                  "base_weight_bytes": base_bytes_per_rank(adapted)})
        distributed = {"strategy": worker.strategy, "world_size": worker.world_size, "backend": worker.backend,
                       "nnodes": train_cfg.distributed.nnodes, "nproc_per_node": train_cfg.distributed.nproc_per_node,
                       "per_rank": per_rank}
        if device.type == "cpu":  # what this rank held of the base (FSDP2: its shard) plus its growth
            training_memory = per_rank[0]["base_weight_bytes"] + peak.increment
        if not worker.writes:
            # (torchrun's exit barrier keeps every machine's stage running until rank 0 has written too)
            return {"variant": name, "distributed": distributed}
    step_seconds = sum(r["seconds"] for r in rows)  # training steps only, validation excluded
    tokens = sum(r["tokens"] for r in rows)
    summary = {
        "variant": name,
        "label": vcfg.spec.label,
        "layer": vcfg.spec.layer,
        "spec": vcfg.spec.to_dict(),
        "optimizer": type(adapted.optimizer_in_use).__name__,
        "seed": seed,
        "lr": settings.lr,
        "lr_multiple": multiple,
        "steps": train_cfg.steps,
        "batch_size": train_cfg.batch_size,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "base_weight_bytes": base_weight_bytes,
        "peak_memory_bytes": peak.bytes,
        "peak_memory_method": peak.method,
        # what training itself needs: the base weights (exact bytes; distributed: those rank 0 held) plus the
        # measured growth during training
        "training_memory_bytes": training_memory,
        "train_seconds": step_seconds,
        "wall_seconds": wall,
        "tokens": tokens,
        "tokens_per_second": tokens / step_seconds if step_seconds else 0.0,
        "final_loss": rows[-1]["loss"],
        "final_val_loss": next((r["val_loss"] for r in reversed(rows) if r["val_loss"] is not None), None),
        **validation_summary(rows),
        "parts": adapted.parts_summary(),
        # building the adapter plus a data-aware init's calibration (an init's SVDs live here, not in train_seconds)
        "init_seconds": init_seconds,
        **({"init": init_info} if init_info else {}),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if distributed is not None:
        summary["distributed"] = distributed

    def write_adapter(tmp: Path) -> None:
        variants.save(adapted, tmp, metadata={"variant": name, "base": args.base})
        summary["adapter_bytes"] = variants.file_bytes(tmp)
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        (tmp / "mlflow.json").write_text(json.dumps({"run_id": tracker.run_id, "uri": tracker.uri}, indent=2))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    commit_outputs({args.curve: buf.getvalue()}, {args.adapter: write_adapter})
    tracker.log_curve(rows, ("loss", "lr", "grad_norm", "val_loss"))
    tracker.log_metrics({"train_seconds": step_seconds, "train_wall_seconds": wall, "init_seconds": init_seconds,
                         "tokens_per_second": summary["tokens_per_second"], "peak_memory_bytes": peak.bytes,
                         "trainable_params": trainable, "adapter_bytes": summary["adapter_bytes"],
                         **(distributed_metrics(distributed) if distributed is not None else {})})
    tracker.log_artifacts(args.adapter, "adapter")
    tracker.end("FINISHED")
    if checkpoint is not None:
        checkpoint.clear()
    print(f"[{label}] done in {format_seconds(wall)}: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s, peak memory {peak.bytes / 2**20:.0f} MiB", flush=True)
    return summary


def validation_summary(rows: list[dict]) -> dict:
    """The validation losses `select` compares: at the last step, and the lowest of the curve."""
    losses = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    return {"val_loss_final": rows[-1]["val_loss"] if rows else None, "val_loss_min": min(losses) if losses else None}


def distributed_metrics(distributed: dict) -> dict:
    """The world size and every rank's peak memory and base-weight bytes, as MLflow metrics."""
    out = {"world_size": distributed["world_size"]}
    for entry in distributed["per_rank"]:
        out[f"peak_memory_bytes.rank{entry['rank']}"] = entry["peak_memory_bytes"]
        if entry["base_weight_bytes"] is not None:
            out[f"base_weight_bytes.rank{entry['rank']}"] = entry["base_weight_bytes"]
    return out


def import_peft_adapter(args, params, vcfg) -> dict:
    """The train stage of a `peft_adapter` entry: import the PEFT adapter, write a trained variant's outputs.

    The summary records zero steps, time and tokens, and null training memory (nothing was
    trained here), plus `imported_from`: the folder and the sha256 of its two files. DVC cannot
    declare that folder as a dep of a foreach stage, so these hashes (also MLflow params) are the
    record of which files the evaluated adapter came from; replacing them needs
    `dvc repro -f -s train@<name>` (README, "Experiments").
    """
    name, folder = args.variant, Path(vcfg.peft_adapter)
    configure_cpu()
    seed_everything(args.seed)
    device = pick_device(params.train.device)
    hashes = {f: file_sha256(folder / f) for f in (peft_load.CONFIG_NAME, peft_load.WEIGHTS_NAME)}
    started = time.perf_counter()
    model, _ = load_base(args.base, params.model.dtype, params.model.trust_remote_code)
    try:
        adapted = variants.load_peft(model, folder)
    except (ValueError, OSError) as err:  # e.g. the shapes do not fit this base model
        raise DataError(f"variants.{name}.peft_adapter ({str(folder)!r}): {err}") from None
    model.to(device)
    trainable, total = adapted.parameter_counts()
    summary = {
        "variant": name, "label": vcfg.spec.label, "layer": vcfg.spec.layer, "spec": vcfg.spec.to_dict(),
        "imported_from": {"path": str(folder), "sha256": hashes},
        "optimizer": "none", "seed": args.seed, "lr": None, "lr_multiple": args.lr_multiple, "steps": 0,
        "batch_size": None,
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
        "base_weight_bytes": adapted.base_weight_bytes(),
        # not trained here: there is no training memory to report (the report shows "imported")
        "peak_memory_bytes": None, "peak_memory_method": None, "training_memory_bytes": None,
        "train_seconds": 0.0, "wall_seconds": time.perf_counter() - started, "tokens": 0, "tokens_per_second": 0.0,
        "final_loss": None, "final_val_loss": None, "val_loss_final": None, "val_loss_min": None, "parts": adapted.parts_summary(), "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    tracker = Tracker(params.tracking.enabled, params.tracking.experiment, params.tracking.uri)
    cell = cell_params(name, args.seed, None, args.lr_multiple)
    tracker.start(run_name=run_name(name, args.seed, None),
                  tags={**standard_tags(name, "train"), **tag_values(cell), "layer": vcfg.spec.layer, "imported": "true"})
    tracker.log_params({**{f"spec.{k}": v for k, v in vcfg.spec.to_dict().items()}, **cell,
                        "imported_from": str(folder),
                        **{f"sha256.{f}": h for f, h in hashes.items()}})

    def write_adapter(tmp: Path) -> None:
        variants.save(adapted, tmp, metadata={"variant": name, "base": args.base, "imported_from": str(folder)})
        summary["adapter_bytes"] = variants.file_bytes(tmp)
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        (tmp / "mlflow.json").write_text(json.dumps({"run_id": tracker.run_id, "uri": tracker.uri}, indent=2))

    try:
        # an empty curve (header only): nothing was trained, and every variant has its curve file
        commit_outputs({args.curve: ",".join(CURVE_COLUMNS) + "\r\n"}, {args.adapter: write_adapter})
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    print(f"[{name}] {vcfg.spec.label}: imported, not trained, from {folder} ({adapted.trainable_summary()})",
          flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args, params = parse(argv)
    if params is None:
        return 1
    dist = params.train.distributed
    worker = None
    try:
        launch.refuse_stray_worker(dist)
        if dist.enabled and params.get_variant(args.variant).peft_adapter is None:
            if not launch.is_worker():  # the stage as dvc.yaml runs it: become torchrun (never returns)
                launch.relaunch(dist, "pipeline.train", list(sys.argv[1:] if argv is None else argv),
                                run_id=f"train-{args.variant}-{args.seed}-{args.lr_multiple}",
                                label=args.variant)
            worker = launch.start_worker(dist, params.train.device)
            return launch.recorded(_worker_main)(args, params, worker)
        run(args, params)
    except (ParamsError, DataError, variants.NonFiniteLossError) as err:
        print(f"{stage_name(args)}: {err}", file=sys.stderr)
        return 1
    finally:
        if worker is not None:
            worker.finish()
    return 0


def _worker_main(args, params, worker: launch.Worker) -> int:
    """One torchrun worker's stage; the errors `main` reports (with the rank) end it with status 1,
    anything else reaches torchrun's error file with its traceback."""
    try:
        run(args, params, worker)
    except (ParamsError, DataError, variants.NonFiniteLossError) as err:
        print(f"{stage_name(args)} [rank {worker.rank}/{worker.world_size}]: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
