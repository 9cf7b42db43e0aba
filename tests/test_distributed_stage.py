"""The train stage under torchrun (train.distributed): params validation first (no processes), then
the stage script itself, run as dvc.yaml runs it, with 2 processes on gloo at 127.0.0.1 on a tiny
random Llama: outputs written once by rank 0 and equal to the one-process run's; a SIGKILLed rank
resumes from the checkpoint to a bit-identical adapter; a failing rank stops both, names itself and
its step, and leaves no outputs.

Every stage subprocess runs in a session of its own under a time limit; torchrun puts its workers
in sessions of their own too, so they are found (and killed, in `finally`) by a token in their
environment. Faults are injected through tests/stage_faults/sitecustomize.py.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stage_cmds import stage_argv
from tiny_assets import prepared_workspace, save_tiny_model, small_pipeline_params

import pipeline
from pipeline.params import ParamsError, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(pipeline.__file__).parent.parent  # where this test's pipeline/ and variants/ come from
FAULTS = Path(__file__).parent / "stage_faults"
STEPS = 6
STAGE_TIMEOUT = 120
# CPU + gloo everywhere by default; bench/gpu_check.sh sets DIST_STAGE_DEVICE=cuda on a machine with
# 2+ GPUs to run the same runs on CUDA with nccl.
DEVICE = os.environ.get("DIST_STAGE_DEVICE", "cpu")
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"
NODES = 2 if DEVICE == "cpu" else 1  # two "machines" on one host would share cuda:0 (LOCAL_RANK 0 on both)


# ----- params validation ----------------------------------------------------------------------------------
@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _dist(raw, train=None, **dist):
    raw = copy.deepcopy(raw)
    raw["train"]["distributed"].update(dist)
    raw["train"].update(train or {})
    return raw


def test_the_default_is_one_process():
    params = params_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    dist = params.train.distributed
    assert (dist.strategy, dist.nproc_per_node, dist.nnodes, dist.rdzv_endpoint, dist.backend) == (
        "none", 1, 1, None, "auto")
    assert not dist.enabled and dist.world_size == 1


@pytest.mark.parametrize("dist, train, fragment", [
    ({"strategy": "zero3"}, {}, "train.distributed.strategy must be one of none, ddp, fsdp, got 'zero3'"),
    ({"nprocs": 2}, {}, "train.distributed.nprocs: unknown key"),
    ({"nproc_per_node": 0}, {}, "train.distributed.nproc_per_node must be a positive integer, got 0"),
    ({"backend": "mpi"}, {}, "train.distributed.backend must be one of auto, gloo, nccl, got 'mpi'"),
    ({"strategy": "none", "nproc_per_node": 2}, {}, "train.distributed.strategy is none (one process), but "
                                                      "nproc_per_node x nnodes = 2 x 1"),
    ({"strategy": "none", "nnodes": 2, "rdzv_endpoint": "h:1"}, {}, "strategy is none (one process)"),
    ({"strategy": "ddp", "nnodes": 2}, {}, "train.distributed.nnodes is 2, so train.distributed.rdzv_endpoint "
                                           "must name the host:port"),
    ({"strategy": "ddp", "rdzv_endpoint": "node0"}, {}, "train.distributed.rdzv_endpoint must be host:port "
                                                        "(port 1-65535), got 'node0'"),
    ({"strategy": "fsdp", "rdzv_endpoint": "node0:99999"}, {}, "got 'node0:99999'"),
    ({"strategy": "ddp", "rdzv_endpoint": "node 0:29500"}, {}, "got 'node 0:29500'"),
    ({"strategy": "ddp", "backend": "nccl"}, {"device": "cpu"}, "train.distributed.backend nccl needs CUDA "
                                                                "devices, but train.device is cpu"),
    ({"strategy": "ddp", "nproc_per_node": 4}, {"batch_size": 3, "device": "cpu"},
     "train.batch_size (3) must be at least the number of processes (4"),
])
def test_invalid_distributed_settings_name_the_key_and_the_reason(raw, dist, train, fragment):
    with pytest.raises(ParamsError) as err:
        params_from_dict(_dist(raw, train, **dist))
    assert fragment in str(err.value)


def test_nccl_without_a_visible_gpu_is_refused(raw, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="backend nccl needs CUDA devices, and none is visible here"):
        params_from_dict(_dist(raw, strategy="fsdp", backend="nccl"))


def test_more_processes_per_node_than_gpus_is_refused(raw, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ParamsError, match=r"nproc_per_node is 8, but only 2 CUDA device\(s\) are visible"):
        params_from_dict(_dist(raw, strategy="fsdp", nproc_per_node=8))
    params_from_dict(_dist(raw, strategy="fsdp", nproc_per_node=2))  # one GPU each: fine


def test_a_method_the_strategy_cannot_serve_is_refused_before_launch(raw, monkeypatch):
    import variants.distributed

    def refuse(spec, strategy):
        if spec.layer == "vera":
            raise ValueError(f"{spec.label}: the shared pair cannot be {strategy}-sharded (a test refusal)")

    monkeypatch.setattr(variants.distributed, "check_strategy", refuse)
    with pytest.raises(ParamsError, match=r"train.distributed.strategy fsdp cannot train variants.vera: .*"
                                          r"cannot be fsdp-sharded"):
        params_from_dict(_dist(raw, strategy="fsdp", nproc_per_node=2, rdzv_endpoint="127.0.0.1:29500"))


def test_valid_distributed_settings_load(raw):
    two_nodes = params_from_dict(_dist(raw, strategy="fsdp", nproc_per_node=2, nnodes=2,
                                       rdzv_endpoint="node0.cluster:29500", backend="gloo"))
    assert two_nodes.train.distributed.world_size == 4 and two_nodes.train.distributed.enabled
    assert params_from_dict(_dist(raw, strategy="ddp", nproc_per_node=2, rdzv_endpoint="[::1]:29500"))


def test_torchrun_command_line():
    from pipeline.launch import torchrun_command
    from pipeline.params import DistributedConfig

    one = torchrun_command(DistributedConfig("ddp", 2), "pipeline.train", ["lora", "--data", "d"], "train-lora")
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--max_restarts", "0",
                       "--standalone", "-m", "pipeline.train", "lora", "--data", "d"]
    two = torchrun_command(DistributedConfig("fsdp", 8, 2, "node0:29500"), "pipeline.train", ["lora"], "train-lora")
    assert two[two.index("--nnodes") + 1] == "2" and "--standalone" not in two
    assert two[two.index("--rdzv_backend"):two.index("-m", 3)] == [
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29500", "--rdzv_id", "train-lora"]


# ----- the report and the 7B projection ---------------------------------------------------------------------
def test_fsdp_projection_shards_base_and_codes_and_keeps_quant_state_and_adapter_whole():
    from pipeline.params import load_params
    from pipeline.projection import project

    params = load_params(ROOT / "params.yaml")
    lora = project("lora", params.variants["lora"].spec, "bf16")
    whole = lora.adapter_bytes + lora.gradient_bytes + lora.optimizer_bytes
    assert lora.per_gpu_bytes(1) == lora.total_bytes
    assert lora.per_gpu_bytes(8) == lora.base_bytes / 8 + whole
    qlora = project("qlora", params.variants["qlora"].spec, "4bit")
    # what stays whole: per weight 1 B of absmax per 64 and 4 B per 64*256 (double quantization); per
    # layer the code tables (16 + 256 fp32) and the offset -- Llama-2-7B's 32 x 7 linear layers
    state = qlora.base_replicated_bytes
    weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert state == weights * (1 / 64 + 4 / (64 * 256)) + 32 * 7 * (16 * 4 + 256 * 4 + 4)
    assert qlora.per_gpu_bytes(2) == (qlora.base_bytes - state) / 2 + state + (
        qlora.adapter_bytes + qlora.gradient_bytes + qlora.optimizer_bytes)
    delta = project("delta_lora", params.variants["delta_lora"].spec, "bf16")
    assert delta.per_gpu_bytes(2) - lora.per_gpu_bytes(2) == pytest.approx(delta.extra_bytes / 2)  # W's residual


def test_the_report_shows_distributed_runs_only_when_there_are_some(tmp_path):
    from pipeline import compare

    run = {"strategy": "fsdp", "world_size": 2, "backend": "nccl", "nnodes": 1, "nproc_per_node": 2,
           "per_rank": [{"rank": 1, "peak_memory_bytes": 3 * 2**30, "base_weight_bytes": 60 * 2**20},
                        {"rank": 0, "peak_memory_bytes": 2 * 2**30, "base_weight_bytes": 70 * 2**20}]}

    def method(name, summary):  # the chosen cell of one seed, as compare reads it
        return compare.Method(name=name, lr_multiple="1", lr=2e-3, seeds=(0,), rows=[{}], predictions=[[]],
                              summaries=[summary], curve=None)

    found = compare.distributed_runs({"lora": method("lora", {"distributed": run}), "dora": method("dora", {})})
    assert found == {"lora": run}
    rows = {"lora": {"base_weight_bytes": 140 * 2**20, "peak_memory_method": "cuda.max_memory_allocated"}}
    en = compare.distributed_section("en", rows, found)
    assert en[0] == "## 3c. Distributed training (measured)"
    assert "| lora | fsdp (nccl) | 2 (1 node(s) × 2) | 70.0 MiB / 60.0 MiB (0.50×) | 2.00 GiB / 3.00 GiB |" in en
    zh = compare.distributed_section("zh", rows, found)
    assert zh[0] == "## 3c. 分布式训练（实测）"
    assert "| lora | fsdp (nccl) | 2（1 个节点 × 2） | 70.0 MiB / 60.0 MiB (0.50×) | 2.00 GiB / 3.00 GiB |" in zh
    assert compare.distributed_section("en", rows, {}) == []  # one process: nothing in the report


# ----- the stage under torchrun -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tagged(token: str) -> None:
    """SIGKILL every process whose environment carries this run's token (torchrun and its workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"STAGE_TEST_TOKEN={token}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


class Workspace:
    def __init__(self, root: Path, params: dict):
        self.root, self.params = root, params

    def write_params(self, name: str, **dist) -> str:
        params = copy.deepcopy(self.params)
        params["train"]["distributed"].update(dist)
        (self.root / name).write_text(yaml.safe_dump(params, sort_keys=False))
        return name

    def distributed(self, strategy: str, nnodes: int = 1) -> str:
        """A params file for 2 processes: 1 node x 2, or (the README's recipe) 2 nodes x 1 meeting at 127.0.0.1."""
        return self.write_params(f"{strategy}-{nnodes}.yaml", strategy=strategy, nproc_per_node=2 // nnodes,
                                 nnodes=nnodes, backend=BACKEND, rdzv_endpoint=f"127.0.0.1:{_free_port()}")

    def argv(self, params_file: str, out: str) -> list[str]:
        return stage_argv("train@lora-0-1", "--params", params_file, "--adapter", f"models/adapters/{out}",
                          "--curve", f"reports/curves/{out}.csv", "--checkpoints", f"models/checkpoints/{out}")

    def stage(self, params_file: str, out: str, fault: str | None = None, nodes: int = 1) -> dict:
        """Run the train stage as DVC does (`python -m pipeline.train ...`), bounded in time; with
        `nodes` 2, the same command twice at once, as on two machines."""
        token = uuid.uuid4().hex
        stamp = self.root / f"fault-{token}"
        paths = ([str(FAULTS)] if fault else []) + [str(CODE)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "STAGE_TEST_TOKEN": token,
               "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        if fault:
            env.update(STAGE_FAULT=fault, STAGE_FAULT_STAMP=str(stamp))
        started = time.time()
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline.train", *self.argv(params_file, out)],
                                  cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True) for _ in range(nodes)]
        results: list[tuple] = [("", "", None)] * nodes

        def wait(i: int, proc: subprocess.Popen) -> None:
            try:
                stdout, stderr = proc.communicate(timeout=STAGE_TIMEOUT)
                results[i] = (stdout, stderr, time.time())
            except subprocess.TimeoutExpired:
                pass

        waiters = [threading.Thread(target=wait, args=(i, proc)) for i, proc in enumerate(procs)]
        try:
            for waiter in waiters:
                waiter.start()
            for waiter in waiters:
                waiter.join(STAGE_TIMEOUT + 5)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            _kill_tagged(token)
            for waiter in waiters:
                waiter.join(10)
        ended = time.time()
        assert all(p.returncode is not None for p in procs) and all(r[2] for r in results), "a stage timed out"
        return {"rc": max(abs(p.returncode) for p in procs), "out": "".join(r[0] for r in results),
                "err": "".join(r[1] for r in results), "ended": ended, "seconds": ended - started,
                "each_ended": [r[2] for r in results],
                "fault_at": float(stamp.read_text()) if stamp.exists() else None}

    def adapter(self, out: str) -> dict[str, torch.Tensor]:
        return load_file(self.root / "models" / "adapters" / out / "adapter.safetensors")

    def outputs(self, out: str) -> list[Path]:
        return [p for p in (self.root / "models/adapters" / out, self.root / "reports/curves" / f"{out}.csv")
                if p.exists()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A stage-ready folder (tiny Llama, prepared data), the one-process run and an uninterrupted FSDP2 run
    over two "machines" (two stage processes, one rank each, meeting at 127.0.0.1: the README's recipe)."""
    base = tmp_path_factory.mktemp("dist-stage")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = small_pipeline_params(raw, save_tiny_model(base / "tiny-model"), {"lora": {"r": 4}}, steps=STEPS,
                                   checkpoint_interval=2, eval_interval=3)
    params["tracking"]["enabled"] = False
    params["train"]["device"] = DEVICE
    workspace = Workspace(prepared_workspace(base / "repo", params), params)

    from pipeline import train

    cwd = os.getcwd()
    os.chdir(workspace.root)
    try:
        assert train.main(workspace.argv("params.yaml", "single")) == 0
    finally:
        os.chdir(cwd)
    # the reference distributed run also talks to MLflow (the repository's sqlite store)
    workspace.params["tracking"]["enabled"] = True
    # rank 0 writes 3 s late: no machine's stage may end before the outputs exist (torchrun's exit barrier;
    # DVC on another machine of a shared filesystem looks for them when its stage ends)
    workspace.uninterrupted = workspace.stage(workspace.distributed("fsdp", nnodes=NODES), "fsdp", nodes=NODES,
                                              fault="0:0:slowwrite")
    workspace.params["tracking"]["enabled"] = False
    return workspace


def test_two_node_fsdp_run_writes_once_from_rank_0_and_equals_the_one_process_run(ws):
    run = ws.uninterrupted
    assert run["rc"] == 0, run["out"][-3000:] + run["err"][-3000:]
    assert run["out"].count(f"strategy fsdp: {2 // NODES} process(es) x {NODES} node(s) under torchrun, rendezvous "
                            "at 127.0.0.1:") == NODES
    for rank in (0, 1):
        assert f"[lora rank {rank}/2] {STEPS}/{STEPS} loss" in run["out"]  # every rank prints its progress
    assert run["out"].count("] done in ") == 1 and "[lora rank 0/2] done in " in run["out"]
    written = (ws.root / "models/adapters/fsdp/train_summary.json").stat().st_mtime
    assert run["fault_at"] + 3 <= written <= min(run["each_ended"]), (run["fault_at"], written, run["each_ended"])
    single, fsdp = ws.adapter("single"), ws.adapter("fsdp")
    assert single.keys() == fsdp.keys() and single
    for key in single:
        assert torch.allclose(single[key], fsdp[key], rtol=0, atol=1e-5), key
    curve = (ws.root / "reports/curves/fsdp.csv").read_text().splitlines()
    assert len(curve) == 1 + STEPS  # one header, one row per step: written once
    import pandas as pd

    one, two = pd.read_csv(ws.root / "reports/curves/single.csv"), pd.read_csv(ws.root / "reports/curves/fsdp.csv")
    assert list(two["step"]) == list(range(1, STEPS + 1)) and two["val_loss"].notna().sum() == 2
    assert (one["loss"] - two["loss"]).abs().max() < 1e-5  # the global-batch loss, not rank 0's share
    assert not (ws.root / "models/checkpoints/fsdp").exists()  # cleared by rank 0 at the end

    summary = json.loads((ws.root / "models/adapters/fsdp/train_summary.json").read_text())
    dist = summary["distributed"]
    assert (dist["strategy"], dist["world_size"], dist["backend"], dist["nnodes"]) == ("fsdp", 2, BACKEND, NODES)
    assert [r["rank"] for r in dist["per_rank"]] == [0, 1]
    for entry in dist["per_rank"]:
        assert entry["peak_memory_bytes"] > 0 and entry["device"].startswith(DEVICE)
        # FSDP2 shards every base parameter: each rank holds about half (rotary buffers stay whole)
        assert 0.4 * summary["base_weight_bytes"] < entry["base_weight_bytes"] < 0.6 * summary["base_weight_bytes"]
    assert "distributed" not in json.loads((ws.root / "models/adapters/single/train_summary.json").read_text())

    with sqlite3.connect(ws.root / "mlflow.db") as db:  # one run, opened by rank 0 only
        assert db.execute("select count(*) from runs").fetchone()[0] == 1
        metrics = {k for (k,) in db.execute("select distinct key from metrics")}
        params = dict(db.execute("select key, value from params"))
    assert {"world_size", "peak_memory_bytes.rank0", "peak_memory_bytes.rank1", "base_weight_bytes.rank0",
            "base_weight_bytes.rank1"} <= metrics
    assert params["train.distributed.strategy"] == "fsdp" and params["train.distributed.nnodes"] == str(NODES)


def test_sigkill_of_rank_1_then_rerun_resumes_to_a_bit_identical_adapter(ws):
    """One machine x 2 processes this time: the same world (fsdp, 2 ranks) as the reference run."""
    params_file = ws.distributed("fsdp")
    killed = ws.stage(params_file, "killed", fault="1:4:kill")  # in training step 4; the last checkpoint: step 2
    assert killed["rc"] != 0 and killed["fault_at"] is not None, killed["out"][-2000:] + killed["err"][-2000:]
    assert ws.outputs("killed") == []
    state = json.loads((ws.root / "models/checkpoints/killed/current/state.json").read_text())
    assert state["step"] == 2

    resumed = ws.stage(ws.distributed("fsdp"), "killed")  # the rerun (a new rendezvous port, same run)
    assert resumed["rc"] == 0, resumed["out"][-3000:] + resumed["err"][-3000:]
    for rank in (0, 1):
        assert f"[lora rank {rank}/2] resuming from the checkpoint at step 2 of {STEPS}" in resumed["out"]
    reference, again = ws.adapter("fsdp"), ws.adapter("killed")
    assert reference.keys() == again.keys()
    for key in reference:
        assert torch.equal(reference[key], again[key]), key


@pytest.mark.parametrize("kind, message", [
    ("raise", "RuntimeError: injected fault in training call 3"),
    ("nan", "NonFiniteLossError: lora: loss is nan at step 2"),
])
def test_a_failing_rank_stops_every_rank_promptly_and_nothing_is_written(ws, kind, message):
    run = ws.stage(ws.distributed("ddp"), f"fault-{kind}", fault=f"1:3:{kind}")
    text = run["out"] + run["err"]
    assert run["rc"] != 0 and run["fault_at"] is not None, text[-3000:]
    assert f"train@lora-0-1 [rank 1/2]: stopped after 2 of {STEPS} steps: {message}" in run["err"], text[-3000:]
    if kind == "nan":  # the loss is global: every rank sees the NaN at the same step
        assert f"train@lora-0-1 [rank 0/2]: stopped after 2 of {STEPS} steps: {message}" in run["err"]
    else:  # rank 0 waited in a collective: torchrun tore the group down, naming the failed rank
        assert "rank: 1" in run["err"] and "injected fault" in run["err"]
    assert run["ended"] - run["fault_at"] < 30, run["ended"] - run["fault_at"]
    assert ws.outputs(f"fault-{kind}") == []
