"""Process-level settings every stage shares: seeding, device choice, threads, peak memory.

Peak memory is what the report calls "memory": on CUDA `torch.cuda.max_memory_allocated`,
on CPU the peak resident set size (RSS) of the process during the measured section — the
kernel's high-water mark (VmHWM) is reset first through /proc/self/clear_refs, so model
loading before the section does not count twice; where that is not possible the
process-lifetime peak (getrusage) is reported.
"""

from __future__ import annotations

import itertools
import os
import random
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda, but no CUDA device is available")
    return torch.device(choice)


def configure_cpu() -> None:
    # Denormal floats make CPU arithmetic 10-100x slower (docs/pipeline.md: generation crawls).
    torch.set_flush_denormal(True)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS would still count
    what model loading or LoftQ's SVDs freed before the measured section)."""
    import gc

    import pipeline

    gc.collect()
    if pipeline.STAGE_PROCESS:
        # What survives (libraries, the model) lives until the stage ends: later collections
        # need not walk it again (see pipeline/__init__.py).
        gc.freeze()
        gc.enable()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_resident(module: torch.nn.Module) -> None:
    """Read every CPU parameter and buffer of `module` once, so file-mapped pages become resident."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.sum()


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _vm_hwm_bytes() -> int | None:
    return _status_bytes("VmHWM")


def _vm_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


@dataclass
class PeakMemory:
    """Measure peak memory of a code section: `with PeakMemory(device) as peak: ...; peak.bytes`.

    `bytes` is the peak itself; `increment` the peak above what was resident when the section
    started (on CPU: activations, gradients, optimizer state — without the libraries, the base
    weights and whatever earlier work left in the allocator).

    Pass the model as `resident`: weights loaded from safetensors are memory-mapped and only
    count in RSS once touched, so without it the first forward pass would page the base in
    inside the section and `increment` would count the base weights a second time (for every
    method whose build did not already read all weights — LoRA's does not, DoRA's does).
    """

    device: torch.device
    resident: torch.nn.Module | None = None
    bytes: int = 0
    increment: int = 0
    method: str = ""
    seconds: float = 0.0

    def __enter__(self) -> PeakMemory:
        self._started = time.perf_counter()
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            if self.resident is not None:
                make_resident(self.resident)
            self._start = _vm_rss_bytes() or 0
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # reset the RSS high-water mark
                self.method = "rss (VmHWM, reset at start)"
            except OSError:
                self.method = "rss (ru_maxrss, process lifetime)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            hwm = _vm_hwm_bytes() if "VmHWM" in self.method else None
            self.bytes = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.increment = max(0, self.bytes - self._start)
        self.seconds = time.perf_counter() - self._started


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress lines with an ETA, for long loops in stage logs (no terminal control codes)."""

    def __init__(self, label: str, total: int, every: int = 1):
        self.label, self.total, self.every = label, total, max(1, every)
        self.started = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else 0.0
        print(f"[{self.label}] {done}/{self.total} {extra} elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}",
              flush=True)


def repo_root() -> os.PathLike[str]:
    """The repository that owns this run; for DVC's queued/temp experiments (run in
    <repo>/.dvc/tmp/exps/<tmp>/), the original repository, so shared stores stay shared."""
    from pathlib import Path

    here = Path.cwd().resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """Unix time at which this process (the stage) started: /proc/self/stat's start time in
    clock ticks after boot, set against /proc/uptime (10 ms resolution); elsewhere, the time
    this module was imported. MLflow runs start here, so their duration is the stage's."""
    try:
        with open("/proc/self/stat") as handle:
            # field 22 (starttime); the command name (field 2) may hold spaces, so split after ")"
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        started = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT
    return min(started, _IMPORTED_AT)
