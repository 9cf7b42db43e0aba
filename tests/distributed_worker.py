"""One rank of the distributed training tests (tests/test_distributed.py launches it under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT CASE [CASE ...]

A CASE is "method:strategy" (train 3 steps on the shared global batch and write what the rank
ends with) or "resume:method:strategy" (train 4 steps without a break, then again with a
checkpoint at step 2 and a crash at step 3 on every rank, then resume, and compare). Every
rank writes OUT/<case>.rank<k>.safetensors (the adapter, the adapted base weights) and a
.json (the step records, per-rank base bytes, ranks). The test process builds the
single-process references with `run_case(..., strategy="none")` from this same module.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's tiny models
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the worktree's variants

from conftest import randomize_adapter, tiny_gpt2, tiny_llama  # noqa: E402

import variants  # noqa: E402
from variants import distributed  # noqa: E402

STEPS = 3
# Small ranks for the tiny model; dropout 0 everywhere (the split changes which rows a rank's
# dropout masks fall on, so only dropout-free runs can equal one process). AdaLoRA masks at
# steps 1 and 2 (the final allocation), SoRA's threshold zeroes gates within 3 steps.
SPECS = {
    "lora": {}, "rslora": {}, "dora": {}, "lora_fa": {}, "lora_plus": {}, "delta_lora": {},
    "qlora": {"r": 4, "alpha": 8}, "loftq": {},
    "vera": {"r": 16},
    "adalora": {"r": 6, "target_r": 2, "tinit": 0, "tfinal": 1},
    "sora": {"sora_xi": 0.3},
}
LR = {"vera": 5e-3}
GPT2 = ["delta_lora@gpt2", "lora_fa@gpt2"]  # Conv1D bases: W stored (in, out)


def spec_for(method: str, steps: int = STEPS, dropout: float = 0.0) -> dict:
    method = method.split("@")[0]
    spec = {"preset": method, "r": 4, "alpha": 8, "dropout": dropout, **SPECS[method]}
    if method == "adalora":
        spec["total_step"] = steps
    return spec


def global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """5 rows (2 ranks split them 3 + 2) with padding and prompt positions: each rank's share of the
    loss tokens differs, so an unweighted mean of the ranks' losses would give a wrong gradient."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (5, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, pad) in enumerate([(2, 0), (5, 3), (1, 1), (7, 0), (3, 4)]):
        labels[row, :prompt] = -100
        if pad:
            mask[row, -pad:] = 0
            labels[row, -pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(steps: int) -> list[dict[str, torch.Tensor]]:
    return [global_batch(seed) for seed in range(steps)]


def build(method: str, steps: int = STEPS, dropout: float = 0.0):
    # "method@gpt2": on GPT-2, whose Conv1D stores W as (in, out), so FSDP2 shards W by input rows;
    # "method@bf16": a bf16 base (Delta-LoRA then keeps a sharded fp32 residual of W's updates)
    model = (tiny_gpt2(seed=0) if method.endswith("@gpt2") else
             tiny_llama(seed=0, dtype=torch.bfloat16 if method.endswith("@bf16") else torch.float32))
    adapted = variants.build(model, spec_for(method, steps, dropout))
    # generic gradients: with B = 0 or λ_b = 0 some gradients are exactly 0 in one process and
    # ~1e-10 under a different summation order, which Adam's first step turns into ±lr
    randomize_adapter(adapted, seed=1)
    return adapted


def result(adapted) -> dict[str, torch.Tensor]:
    """What a run ends with: the adapter (AdaLoRA's rank masks, Delta-LoRA's references included),
    SoRA's gates (folded into B by the pruning; the kept ranks are in the json) and the base
    weights of the adapted layers (Delta-LoRA moves them)."""
    out = {f"adapter/{k}": v.detach().clone() for k, v in adapted.adapter_state_dict().items()}
    for name, layer in adapted.layers.items():
        if not layer.base_is_quantized:
            out[f"base/{name}"] = layer.base_layer.weight.detach().clone()
    return out


def run_case(method: str, strategy: str, steps: int = STEPS, checkpoint=None, on_step=None, dropout: float = 0.0):
    adapted = build(method, steps, dropout)
    if on_step is None:
        def on_step(record):  # a validation forward on every rank, as the train stage runs one
            adapted.model.eval()
            with torch.no_grad():
                adapted.model(**{k: v[:2] for k, v in global_batch(99).items()})
            adapted.model.train()
    settings = variants.TrainSettings(steps=steps, lr=LR.get(method, 1e-3))
    records = variants.train(adapted, batches(steps), settings, checkpoint=checkpoint, on_step=on_step,
                             strategy=strategy)
    return adapted, records


class Crash(RuntimeError):
    pass


def resume_case(method: str, strategy: str, folder: Path) -> dict:
    """Uninterrupted 4 steps vs 4 steps checkpointed at 2, crashed at 3 and resumed: torch.equal?

    With dropout where the method allows it: each rank's generator must continue its own stream.
    """
    dropout = 0.0 if method.startswith("delta_lora") else 0.1
    whole, _ = run_case(method, strategy, steps=4, dropout=dropout)

    def crash(record):
        if record.step == 2:
            raise Crash("simulated crash after the checkpoint at step 2")

    try:
        run_case(method, strategy, steps=4, checkpoint=variants.Checkpointer(folder, 2, "test"), on_step=crash,
                 dropout=dropout)
        raise AssertionError("the run did not crash")
    except Crash:
        pass
    checkpoint = variants.Checkpointer(folder, 2, "test")
    steps_run: list[int] = []
    resumed, _ = run_case(method, strategy, steps=4, checkpoint=checkpoint, dropout=dropout,
                          on_step=lambda record: steps_run.append(record.step))
    a, b = result(whole), result(resumed)
    return {"equal": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
            "steps_run_after_resume": steps_run, "resumed_from": str(checkpoint.resumed_from)}


def unwrapped(model: torch.nn.Module) -> bool:
    """No sharded tensor, no FSDP class or hook left, the 4-bit codes buffers again."""
    return (not any(distributed.is_sharded(t) for t in list(model.parameters()) + list(model.buffers()))
            and not any(type(m).__name__.startswith("FSDP") or m._forward_pre_hooks for m in model.modules())
            and all(name in m._buffers for m in model.modules() for name in getattr(m, "weight_buffers", ())))


def nan_case(method: str, strategy: str, rank: int) -> str | None:
    """Rank 1's loss turns NaN at step 1: every rank must stop there; the message each rank raised."""
    calls: list[int] = []

    def poisoned(model, batch):
        calls.append(1)
        loss = variants.training.model_loss(model, batch)
        return loss * float("nan") if rank == 1 and len(calls) == 2 else loss

    try:
        variants.train(build(method), batches(STEPS), variants.TrainSettings(steps=STEPS, lr=1e-3),
                       loss_fn=poisoned, strategy=strategy)
    except variants.NonFiniteLossError as err:
        return str(err)
    return None


def main(out: Path, cases: list[str]) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    w = distributed.world()
    try:
        for case in cases:
            parts = case.split(":")
            info: dict = {"world_size": w.world_size, "rank": w.rank}
            if parts[0] == "nan":
                info["error"] = nan_case(parts[1], parts[2], w.rank)
            elif parts[0] == "resume":
                with tempfile.TemporaryDirectory() as tmp:
                    # every rank must see the folder rank 0 writes: one shared name, made by rank 0
                    folder = Path(distributed.all_gather_object(tmp)[0]) / "ckpt"
                    info.update(resume_case(parts[1], parts[2], folder))
                    distributed.barrier()  # rank 0's folder goes when its TemporaryDirectory does
            else:
                method, strategy = parts
                adapted, records = run_case(method, strategy)
                if w.rank == 0:  # one rank alone: a leftover DDP/FSDP hook would wait for the other here
                    adapted.model(**global_batch(5)).loss.backward()
                distributed.barrier()
                save_file({k: v.contiguous() for k, v in result(adapted).items()},
                          str(out / f"{case}.rank{w.rank}.safetensors"))
                info.update(records=[vars(r) for r in records], parts=adapted.parts_summary(),
                            base_bytes_per_rank=distributed.base_bytes_per_rank(adapted),
                            base_bytes_whole=adapted.base_weight_bytes(),
                            unwrapped=unwrapped(adapted.model))
            (out / f"{case}.rank{w.rank}.json").write_text(json.dumps(info, default=str))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main(Path(sys.argv[1]), sys.argv[2:])
