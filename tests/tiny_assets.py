"""Tiny, offline stand-ins for the pipeline's real inputs: a word-level tokenizer that covers
the G2P prompts (letters, ARPAbet phones) and a random tiny Llama saved as a model folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PHONES = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z "
          "ZH").split()


def g2p_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "</s>", "Spell:", "ARPAbet:"] + list("abcdefghijklmnopqrstuvwxyz") + PHONES
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with the G2P tokenizer, as a transformers folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = g2p_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_pipeline_params(root_params: dict, model_dir: Path, variants: dict, **train) -> dict:
    """The repository's params.yaml shrunk for tests: the tiny model, 64 training rows, a few steps."""
    import copy

    params = copy.deepcopy(root_params)
    params["model"]["source"] = str(model_dir)
    params["data"].update(n_train=64, n_validation=8, n_test=8, max_length=32)
    params["train"].update({"batch_size": 4, "warmup_steps": 1, "eval_interval": 2, **train})
    params["eval"].update(batch_size=8, max_new_tokens=8)
    params["variants"] = {name: {**params["variants"].get(name, {}), **extra} for name, extra in variants.items()}
    params["variant"] = next(iter(variants))
    params["run"] = list(variants)  # the grid spans exactly these (params.yaml's run lists the whole catalog)
    return params


def prepared_workspace(root: Path, params: dict) -> Path:
    """A stage-ready folder: models/base (the tiny Llama, with the base stage's summary.json),
    params.yaml and data/prepared (made by the prepare stage, called as dvc.yaml calls it)."""
    import os

    import yaml
    from stage_cmds import stage_argv

    save_tiny_model(root / "models" / "base")
    (root / "models" / "base" / "summary.json").write_text("{}")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from pipeline import prepare

        assert prepare.main(stage_argv("prepare")) == 0
    finally:
        os.chdir(cwd)
    return root


PROJECT_FILES = ("variants", "pipeline", "dvc.yaml", ".dvcignore", ".gitignore")


def project_repo(repo: Path, params: dict, run) -> Path:
    """A fresh git + DVC repository at `repo` holding this project's code and `params`, committed;
    `run(args, cwd)` runs each command (the caller's, with its environment and time limits)."""
    import shutil

    import yaml

    root = Path(__file__).resolve().parents[1]
    repo.mkdir(parents=True, exist_ok=True)
    for item in PROJECT_FILES:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(args, repo)
    return repo


def command_env(extra: dict | None = None) -> dict:
    """The environment the end-to-end tests run dvc and the stages in: this venv's `python`/`dvc` first,
    a committer identity for git, MLflow telemetry off, no inherited tracking URI."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONWARNINGS": "ignore", "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **(extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_command(args, cwd, check: bool = True, timeout: float = 900, env: dict | None = None):
    """Run `args` in its own session (a timeout kills everything it started, e.g. the stages under dvc);
    an AssertionError with the output's tail when it fails and `check` is set."""
    with subprocess.Popen(args, cwd=cwd, env=command_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    done = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{stdout[-5000:]}\n{stderr[-5000:]}")
    return done
