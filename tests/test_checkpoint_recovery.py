"""A damaged checkpoint never blocks a run: it is checked against its manifest before resuming, set
aside with one warning naming it, and training resumes from the previous good checkpoint (or from
scratch) to the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import tiny_llama

import variants
from variants.checkpoint import MANIFEST, STATE_JSON, STATE_TENSORS, Checkpointer

STEPS, EVERY = 8, 2


class Interrupted(Exception):
    pass


def _batches():
    out = []
    for i in range(STEPS):
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(i))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _train(folder=None, stop_after=None):
    """Train a tiny LoRA for STEPS steps (checkpointing into `folder`), or raise after step `stop_after`."""
    adapted = variants.build(tiny_llama(), variants.get("lora", r=2, alpha=4))

    def on_step(record):
        if stop_after is not None and record.step + 1 == stop_after:
            raise Interrupted

    checkpoint = Checkpointer(folder, EVERY, "run-1") if folder is not None else None
    variants.train(adapted, _batches(), variants.TrainSettings(steps=STEPS, lr=1e-2), on_step=on_step,
                   checkpoint=checkpoint)
    return adapted.adapter_state_dict(), checkpoint


@pytest.fixture(scope="module")
def reference():
    return _train()[0]


@pytest.fixture
def interrupted(tmp_path):
    """A run stopped after step 5: checkpoints of step 4 (current) and step 2 (previous)."""
    folder = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        _train(folder, stop_after=5)
    assert json.loads((folder / "current" / STATE_JSON).read_text())["step"] == 4
    assert json.loads((folder / "previous" / STATE_JSON).read_text())["step"] == 2
    return folder


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensors": (lambda f: _truncate(f / STATE_TENSORS), "state.safetensors has"),
    "corrupted json": (lambda f: (f / STATE_JSON).write_text('{"format": "lora-variants'), "state.json has"),
    "flipped byte": (lambda f: _flip_byte(f / STATE_TENSORS), "state.safetensors does not match its SHA-256"),
    "missing file": (lambda f: (f / STATE_JSON).unlink(), "state.json is missing"),
    "missing manifest": (lambda f: (f / MANIFEST).unlink(), "no manifest.json"),
}


def _assert_same(got, reference):
    assert set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k]) for k in got)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_set_aside_and_training_resumes_from_the_previous_one(
        damage, interrupted, reference, capsys):
    spoil, reason = DAMAGE[damage]
    spoil(interrupted / "current")
    capsys.readouterr()
    got, checkpoint = _train(interrupted)
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(lines) == 1, lines
    assert re.search(rf"checkpoint {re.escape(str(interrupted / 'current'))} is unusable \(.*{reason}", lines[0]), lines
    assert f"moved to {interrupted / 'current.bad'}" in lines[0] and "resuming from" in lines[0]
    assert (interrupted / "current.bad").is_dir()
    _assert_same(got, reference)
    checkpoint.clear()  # what the train stage does when the run finished: the bad one stays for inspection
    assert sorted(p.name for p in interrupted.iterdir()) == ["current.bad"]


def test_with_no_good_checkpoint_left_training_starts_from_scratch(interrupted, reference, capsys):
    _truncate(interrupted / "current" / STATE_TENSORS)
    (interrupted / "previous" / STATE_JSON).write_text("{}")
    capsys.readouterr()
    got, _ = _train(interrupted)
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(lines) == 2 and all("training starts from scratch" in line for line in lines), lines
    assert "previous is unusable" in lines[1]
    _assert_same(got, reference)


def test_a_kill_between_the_two_renames_of_a_save_resumes_from_previous(interrupted, reference, capsys):
    # the save moved `current` to `previous` and was killed before its new folder became `current`
    shutil.rmtree(interrupted / "previous")
    (interrupted / "current").rename(interrupted / "previous")
    (interrupted / ".current.tmp-killed").mkdir()
    (interrupted / ".current.tmp-killed" / STATE_TENSORS).write_bytes(b"half")
    (interrupted / ".previous.old-killed").mkdir()
    checkpoint = Checkpointer(interrupted, EVERY, "run-1")
    state = checkpoint.load()
    assert state["step"] == 4 and checkpoint.resumed_from == interrupted / "previous"
    assert "WARNING" not in capsys.readouterr().err
    assert sorted(p.name for p in interrupted.iterdir()) == ["previous"]  # the staging leftovers are gone
    _assert_same(_train(interrupted)[0], reference)


def test_a_checkpoint_of_another_run_is_ignored_without_a_warning(interrupted, capsys):
    checkpoint = Checkpointer(interrupted, EVERY, "another-run")
    assert checkpoint.load() is None
    assert "WARNING" not in capsys.readouterr().err
    assert (interrupted / "current").is_dir() and (interrupted / "previous").is_dir()
