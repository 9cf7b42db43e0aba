"""The command lines of dvc.yaml's stages, for tests that run a stage script directly: tests call
the scripts exactly as `dvc repro` does (same paths, same arguments), so they stay in step with
dvc.yaml."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from pipeline.declared import stage_entry, substitute
from pipeline.params import SAFE_LOADER

ROOT = Path(__file__).resolve().parents[1]


def stage_cmd(stage: str, variant: str = "lora", dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """The resolved `cmd:` of `stage` ("train@lora-0-1", "select@lora", "evaluate_base", ...) as an argument list."""
    entry, values = stage_entry(stage, yaml.load(dvc_yaml.read_text(), Loader=SAFE_LOADER)["stages"])
    cmd = substitute(entry["cmd"], values).replace("${variant}", variant)
    assert "${" not in cmd, cmd
    return shlex.split(cmd)


def stage_argv(stage: str, *extra: str, variant: str = "lora") -> list[str]:
    """The arguments after `python -m pipeline.<module>` (what the module's main() takes)."""
    words = stage_cmd(stage, variant)
    assert words[:2] == ["python", "-m"], words
    return [*words[3:], *extra]
