#!/usr/bin/env bash
# One prepared check for a lent GPU machine (<= ~8 minutes), and its CPU dry run:
#
#   bench/gpu_check.sh          # CUDA: needs a visible GPU
#   bench/gpu_check.sh --cpu    # the dry run on any machine: the same steps on the CPU, tiny sizes
#
# 1. what is present: Python, torch (+ CUDA), the project's imports; nothing is installed (a lent
#    machine has no network): the project runs from this checkout (PYTHONPATH), with $GPU_CHECK_PYTHON,
#    else .venv/bin/python when there is one, else python3;
# 2. the distributed tests: tests/test_distributed.py (every method, DDP and FSDP2 vs one process,
#    CPU/gloo) and tests/test_distributed_stage.py (the train stage under torchrun); with 2+ GPUs the
#    stage tests run again on CUDA with nccl (DIST_STAGE_DEVICE=cuda);
# 3. step time, tokens/s and peak memory of LoRA, DoRA and QLoRA next to PEFT's (bench/scaling.py):
#    SmolLM2-135M in bf16, one process, and DDP/FSDP2 over 2 GPUs when 2+ are visible
#    (--cpu: the tiny Llama in float32, 1 process vs DDP/FSDP2 x 2 over gloo).
# Every step has a time limit; everything printed also goes to $GPU_CHECK_LOG (default: $OUT/gpu_check.log
# when $OUT is a folder, as on the lent machines, else /tmp/gpu_check.log).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=cuda
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
LOG=${GPU_CHECK_LOG:-/tmp/gpu_check.log}
[[ -z "${GPU_CHECK_LOG:-}" && -d "${OUT:-}" ]] && LOG="$OUT/gpu_check.log"
: > "$LOG"
PY=${GPU_CHECK_PYTHON:-python3}
[[ -z "${GPU_CHECK_PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore MLFLOW_DISABLE_TELEMETRY=true
STATUS=0

say() { echo "$@" | tee -a "$LOG"; }
step() {  # step <seconds> <title> <command...>: run with a time limit, keep going on failure
    local limit=$1 title=$2; shift 2
    say ""; say "=== $title (limit ${limit}s)"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "=== $title: exit $rc after $((SECONDS - started)) s"
    [[ $rc -ne 0 ]] && STATUS=1
    return 0
}

say "gpu_check ($MODE) at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$LOG"
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import importlib, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA devices: "
      f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
missing = []
for name in ("transformers", "safetensors", "yaml", "peft", "variants.distributed", "pipeline.train", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name} ({type(err).__name__}: {err})")
for name in ("bitsandbytes",):  # PEFT's QLoRA side only
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001
        print(f"note: {name} missing: PEFT's QLoRA is not timed")
if missing:
    sys.exit("missing: " + "; ".join(missing) + " (install with `make install` where there is a network)")
EOF
    say "the environment cannot run the check (above); nothing was installed"
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $MODE == cuda && $GPUS -eq 0 ]]; then
    say "no CUDA device visible: run with --cpu for the dry run"
    exit 2
fi

if [[ $MODE == cpu ]]; then
    step 240 "distributed stage tests (CPU, gloo)" "$PY" -m pytest tests/test_distributed_stage.py -q -x -p no:cacheprovider
    [[ -f tests/test_distributed.py ]] && step 300 "distributed library tests (CPU, gloo)" \
        "$PY" -m pytest tests/test_distributed.py -q -x -p no:cacheprovider
    step 300 "step time, tiny Llama: 1 process vs DDP/FSDP2 x 2 (gloo), PEFT" \
        "$PY" bench/scaling.py --models tiny --device cpu --variants lora,dora,qlora --peft --rounds 1 --steps 3 \
        --batch 4x32
else
    step 150 "distributed library tests (CPU, gloo; the CUDA run below uses the same code)" \
        "$PY" -m pytest tests/test_distributed.py -q -x -p no:cacheprovider
    if [[ $GPUS -ge 2 ]]; then
        step 120 "distributed stage tests on CUDA, nccl, 2 GPUs" \
            env DIST_STAGE_DEVICE=cuda "$PY" -m pytest tests/test_distributed_stage.py -q -x -p no:cacheprovider -k "two_node or sigkill or failing"
        NPROC=2
    else
        step 90 "distributed stage tests (CPU, gloo: 1 GPU cannot host 2 nccl ranks)" \
            "$PY" -m pytest tests/test_distributed_stage.py -q -x -p no:cacheprovider
        NPROC=2  # scaling.py keeps only the one-process configurations when fewer GPUs are visible
    fi
    step 240 "step time, SmolLM2-135M bf16: ours vs PEFT$([[ $GPUS -ge 2 ]] && echo ', DDP/FSDP2 x 2')" \
        "$PY" bench/scaling.py --models smollm2 --device cuda --dtype bfloat16 --variants lora,dora,qlora --peft \
        --nproc "$NPROC" --rounds 2 --steps 10 --batch 8x256
fi
say ""
say "gpu_check: $([[ $STATUS -eq 0 ]] && echo 'all steps passed' || echo 'some step failed (above)'); log: $LOG"
exit $STATUS
