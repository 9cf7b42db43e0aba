"""Per-stage overhead: a stage's wall time minus the compute it reports, for one or more checkouts.

Overhead is everything a stage process spends outside the work it is there for: interpreter
start-up and imports, loading the base model and tokenizer, MLflow, writing outputs, exit.
The compute a stage reports is read from its outputs:

- train@...: `wall_seconds` of train_summary.json in its --adapter folder (training steps + validation);
- evaluate@..., evaluate_base: `eval_seconds` of its --metrics file (eval loss + generation);
- any other stage (compare, focus, ...): none, its whole wall time counts.

Each stage runs as DVC runs it (its `cmd:` from the checkout's dvc.yaml, foreach/matrix items filled in,
cwd = the checkout), without DVC's own bookkeeping. Checkouts and stages are interleaved round
by round, so background load hits them alike; the table gives the median and the range. The
checkouts must be ready to run the stages (data/prepared, models/base, and for evaluate/compare
the outputs of the stages before them).

    python bench/stage_overhead.py --repo /tmp/before --repo . --stage train@lora-0-1 --stage evaluate@lora-0 \\
        --stage evaluate_base --stage compare --rounds 3

The stages write their outputs where dvc.yaml says, in the checkout: afterwards `dvc repro` (which
restores them from the run-cache) puts the real results back. With the warm start of
pipeline/run.py the stage runs in a child of the warm server, so "process CPU" (this script's
children) counts only the thin client there: compare wall times.

`--set train.steps=4 --set eval.max_new_tokens=4` shrinks the compute (not the overhead) so that
more rounds fit: each checkout's stages then read a copy of its params.yaml with those values
(passed as `--params`, which every stage accepts), written outside the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this project's pipeline package


def stage_command(repo: Path, stage: str, params_file: Path | None = None) -> str:
    """The `cmd:` DVC would run for `stage` (`name`, `name@key` of a foreach stage, or
    `name@v1-v2-...` of a matrix stage), reading `params_file` instead of the checkout's
    params.yaml if given. Resolved with this project's pipeline.declared, which reads old
    checkouts' dvc.yaml (foreach over a mapping) as well as the grid's."""
    from pipeline.declared import UndeclaredParamError, stage_entry, substitute

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    try:
        entry, values = stage_entry(stage, stages, f"{repo}/dvc.yaml")
    except UndeclaredParamError as err:
        raise SystemExit(str(err)) from None
    cmd = substitute(" ".join(entry["cmd"].split()), values)
    params = yaml.safe_load((params_file or repo / "params.yaml").read_text())
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), cmd)  # e.g. focus's ${variant}
    return cmd + (f" --params {params_file}" if params_file else "")


def overridden_params(repo: Path, settings: list[str], folder: Path) -> Path | None:
    """A copy of the checkout's params.yaml with `key.path=value` settings (values read as YAML)."""
    if not settings:
        return None
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for setting in settings:
        path, sep, value = setting.partition("=")
        if not sep:
            raise SystemExit(f"--set {setting!r}: expected key.path=value")
        *parents, leaf = path.split(".")
        node = params
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise SystemExit(f"--set {setting!r}: {repo}/params.yaml has no section {key!r}")
            node = node[key]
        if leaf not in node:
            raise SystemExit(f"--set {setting!r}: {repo}/params.yaml has no key {path!r}")
        node[leaf] = yaml.safe_load(value)
    out = folder / f"params-{len(list(folder.iterdir()))}.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def reported_compute(repo: Path, stage: str, cmd: str) -> float:
    """The compute the stage reports, found through the paths on its own command line (any layout)."""
    words = cmd.split()
    def path_of(flag: str) -> Path | None:
        return repo / words[words.index(flag) + 1] if flag in words else None
    if stage.startswith("train@") and path_of("--adapter"):
        return json.loads((path_of("--adapter") / "train_summary.json").read_text())["wall_seconds"]
    if stage.startswith("evaluate") and path_of("--metrics"):
        return json.loads(path_of("--metrics").read_text())["eval_seconds"]
    return 0.0


def run_once(repo: Path, stage: str, params_file: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, reported compute seconds, CPU seconds of the process) of one run of the stage."""
    cmd = stage_command(repo, stage, params_file)
    # `python` in the command is this interpreter (the virtualenv's), as under an activated venv
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)  # the checkout's own code (cwd first on sys.path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed in {repo} ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall, reported_compute(repo, stage, cmd), cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", type=Path, required=True, help="a checkout (repeatable)")
    parser.add_argument("--stage", action="append", required=True, help="e.g. train@lora, evaluate_base (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml value for every stage run, e.g. train.steps=4 (repeatable)")
    args = parser.parse_args(argv)
    repos = [r.resolve() for r in args.repo]
    scratch = Path(tempfile.mkdtemp(prefix="stage-overhead-"))
    params_files = {repo: overridden_params(repo, args.set, scratch) for repo in repos}
    for repo in repos:
        for stage in args.stage:
            stage_command(repo, stage, params_files[repo])  # fail on a bad name before running anything
    results: dict[tuple[str, Path], list[tuple[float, float, float]]] = {}
    for round_ in range(args.rounds):
        for stage in args.stage:
            for repo in repos:
                wall, compute, cpu = run_once(repo, stage, params_files[repo])
                results.setdefault((stage, repo), []).append((wall, compute, cpu))
                print(f"round {round_ + 1} {stage:16s} {repo}: wall {wall:6.1f} s, compute {compute:6.1f} s, "
                      f"overhead {wall - compute:5.1f} s, process CPU {cpu:6.1f} s", file=sys.stderr, flush=True)
    # CPU seconds say more than wall seconds on a shared machine; with a tiny compute budget
    # (a few steps, a few test rows) they are nearly all overhead.
    print("| stage | checkout | wall s | compute s | overhead s: median (min-max) | process CPU s: median (min-max) |")
    print("|---|---|---|---|---|---|")
    for stage in args.stage:
        for repo in repos:
            runs = results[(stage, repo)]
            over = [w - c for w, c, _ in runs]
            cpu = [u for _, _, u in runs]
            print(f"| {stage} | {repo} | {statistics.median(w for w, _, _ in runs):.1f} | "
                  f"{statistics.median(c for _, c, _ in runs):.1f} | "
                  f"{statistics.median(over):.1f} ({min(over):.1f}-{max(over):.1f}) | "
                  f"{statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
