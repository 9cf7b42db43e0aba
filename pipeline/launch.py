"""The train stage under torchrun: the relaunch, each worker's process group, and who writes.

The stage is one dvc.yaml line whatever `train.distributed` says. With strategy ddp or fsdp,
once params are validated, the stage process replaces itself (exec, so DVC waits on torchrun
and gets its exit status) with PyTorch's own launcher:

    python -m torch.distributed.run --nproc_per_node N --nnodes M --max_restarts 0 \
        (--standalone | --rdzv_backend c10d --rdzv_endpoint host:port --rdzv_id train-<variant>-<seed>-<lr>) \
        -m pipeline.train <the same arguments>

`--standalone` (one machine, no endpoint) lets torchrun pick a free local port; otherwise the
c10d rendezvous at the endpoint gathers the machines (each runs the same command) and assigns
node ranks. `--max_restarts 0`: a failure is a failure (the next `dvc repro` resumes from the
last checkpoint instead). When a worker fails, torchrun stops the others at once (group
teardown) and exits non-zero; the worker's `record`-wrapped entry point leaves its traceback in
torchrun's error file, so the summary names the failing rank, and the stage prints the step.

Each worker runs the stage again (`is_worker()` tells it apart from the launching process) and
calls `start_worker`: backend auto is nccl on CUDA, gloo on CPU; on CUDA each worker trains on
cuda:LOCAL_RANK. Nothing here imports torch.distributed's launcher or errors modules unless
a strategy is set: the default single-process stage stays as it was.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from pipeline.params import DistributedConfig, ParamsError

TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def is_worker() -> bool:
    """Whether this process was started by torchrun (it sets these for every worker)."""
    return all(key in os.environ for key in TORCHRUN_ENV)


def torchrun_command(cfg: DistributedConfig, module: str, argv: list[str], run_id: str) -> list[str]:
    """The command line that runs `python -m <module> <argv>` as cfg.world_size torchrun workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.nproc_per_node),
               "--nnodes", str(cfg.nnodes), "--max_restarts", "0"]
    if cfg.rdzv_endpoint is None:
        command.append("--standalone")  # params validation allows this only for nnodes 1
    else:
        command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", cfg.rdzv_endpoint, "--rdzv_id", run_id]
    return [*command, "-m", module, *argv]


def relaunch(cfg: DistributedConfig, module: str, argv: list[str], run_id: str, label: str) -> NoReturn:
    """Replace this process with torchrun running `module` on every rank."""
    command = torchrun_command(cfg, module, argv, run_id)
    where = f"rendezvous at {cfg.rdzv_endpoint}" if cfg.rdzv_endpoint else "on this machine"
    print(f"[{label}] strategy {cfg.strategy}: {cfg.nproc_per_node} process(es) x {cfg.nnodes} node(s) under "
          f"torchrun, {where}", flush=True)
    sys.stderr.flush()
    os.execv(command[0], command)


@dataclass(frozen=True)
class Worker:
    """This process's place in the training world (a torchrun worker with its process group started)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    strategy: str

    @property
    def writes(self) -> bool:
        """Only rank 0 writes outputs, checkpoints' clean-up and MLflow."""
        return self.rank == 0

    def label(self, name: str) -> str:
        return f"{name} rank {self.rank}/{self.world_size}"

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def finish(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _resolve_backend(cfg: DistributedConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def start_worker(cfg: DistributedConfig, device_choice: str) -> Worker:
    """Join the process group torchrun prepared; the device is cuda:LOCAL_RANK on GPUs."""
    # torchrun runs workers unbuffered (-u): print() would then write a line and its newline separately,
    # and the ranks' lines, sharing one pipe, interleave. One write per line keeps every line whole.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=False)
    world_size, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if world_size != cfg.world_size:
        raise ParamsError(f"params.yaml: train.distributed asks for {cfg.nproc_per_node} x {cfg.nnodes} = "
                          f"{cfg.world_size} processes, but torchrun started {world_size}")
    cuda = device_choice == "cuda" or device_choice == "auto" and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = _resolve_backend(cfg, device)
    torch.distributed.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return Worker(rank, world_size, local_rank, device, backend, cfg.strategy)


def refuse_stray_worker(cfg: DistributedConfig) -> None:
    """A torchrun worker of a world of several with strategy none would write the outputs N times."""
    if is_worker() and int(os.environ["WORLD_SIZE"]) > 1 and not cfg.enabled:
        raise ParamsError(f"params.yaml: train.distributed.strategy is none, but this process is one of "
                          f"{os.environ['WORLD_SIZE']} torchrun workers; set strategy to ddp or fsdp "
                          "(the stage starts torchrun itself)")


def recorded(fn):
    """`fn` under torchrun's error recording: an uncaught exception goes to torchrun's error file (its
    summary then shows the failing rank's traceback) before it propagates."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)
