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


def split_cmd(words: list[str]) -> tuple[str, list[str]]:
    """(module, arguments) of a stage command `python -m pipeline.run <stage> <arguments>`
    (pipeline/run.py starts `pipeline.<stage>` with those arguments)."""
    assert words[:3] == ["python", "-m", "pipeline.run"] and len(words) > 3, words
    return f"pipeline.{words[3]}", words[4:]


def stage_argv(stage: str, *extra: str, variant: str = "lora") -> list[str]:
    """The arguments the stage's module gets (what its main() takes)."""
    return [*split_cmd(stage_cmd(stage, variant))[1], *extra]
