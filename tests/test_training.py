"""The reference training loop: it learns, calls every hook of every part in order, and stops on NaN."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import calibrate_if_needed, tiny_llama, token_batch

import variants
from variants.parts import Part, register
from variants.training import TrainSettings, lr_factor

CALLS: list[tuple[str, int]] = []


@register
class RecordingStep(Part):
    """A step part that only records the order in which the loop calls it (test-only)."""

    slot = "step"
    name = "test_recording"

    def param_groups(self, adapted, groups):
        CALLS.append(("param_groups", -1))
        return groups

    def extra_loss(self, adapted, step):
        CALLS.append(("extra_loss", step))
        return adapted.layers[next(iter(adapted.layers))].lora_B.sum() * 0.0

    def before_optimizer_step(self, adapted, step, optimizer):
        CALLS.append(("before", step))
        assert all(p.grad is not None for p in adapted.trainable_parameters())

    def after_optimizer_step(self, adapted, step, optimizer):
        CALLS.append(("after", step))
        assert all(p.grad is not None for p in adapted.trainable_parameters()), "zero_grad ran before the hook"

    def finalize(self, adapted):
        CALLS.append(("finalize", -1))


def _batches(n=2):
    ids = token_batch(4, 16)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * n


@pytest.mark.parametrize("name", variants.names())
def test_every_preset_learns_a_repeated_batch(name):
    model = tiny_llama()
    args = {"r": 4, "alpha": 8} if name != "vera" else {"r": 32}
    if name == "adalora":
        args.update(total_step=12, target_r=2)
    adapted = variants.build(model, {"preset": name, **args})
    calibrate_if_needed(adapted, _batches(adapted.calibration_batches()))
    lr = {"vera": 5e-2, "adalora": 5e-2}.get(name, 2e-2)
    records = variants.train(adapted, _batches(), TrainSettings(steps=12, lr=lr, warmup_steps=1))
    assert len(records) == 12
    assert records[-1].loss < records[0].loss - 0.05, [round(r.loss, 3) for r in records]
    assert all(r.tokens == 4 * 16 and math.isfinite(r.grad_norm) for r in records)


def test_hooks_run_in_order_every_step():
    CALLS.clear()
    adapted = variants.build(tiny_llama(), {"step": "test_recording", "r": 4})
    variants.train(adapted, _batches(), TrainSettings(steps=3, lr=1e-3))
    expected = [("param_groups", -1)]
    for step in range(3):
        expected += [("extra_loss", step), ("before", step), ("after", step)]
    expected.append(("finalize", -1))
    assert CALLS == expected


def test_non_finite_loss_stops_training_naming_variant_and_step():
    adapted = variants.build(tiny_llama(), {"preset": "dora", "r": 4})
    batches = _batches()
    records = []
    with pytest.raises(variants.NonFiniteLossError, match=r"dora: loss is nan at step 2"):
        def poison(record):
            records.append(record)
            if record.step == 1:
                with torch.no_grad():
                    next(iter(adapted.layers.values())).lora_B.fill_(float("nan"))
        variants.train(adapted, batches, TrainSettings(steps=5, lr=1e-3), on_step=poison)
    assert [r.step for r in records] == [0, 1]


def test_learning_rate_schedules():
    f = lr_factor(TrainSettings(steps=10, lr=1.0, warmup_steps=2, schedule="linear"))
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.5, 0.0]
    c = lr_factor(TrainSettings(steps=10, lr=1.0, schedule="cosine"))
    assert c(0) == 1.0 and abs(c(5) - 0.5) < 1e-9 and c(10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"steps": 0, "lr": 1e-3}, "steps must be a positive integer, got 0"),
    ({"steps": 5, "lr": -1e-3}, "lr must be a positive number, got -0.001"),
    ({"steps": 5, "lr": 1e-3, "schedule": "step"}, "schedule must be one of"),
    ({"steps": 5, "lr": 1e-3, "grad_clip": 0}, "grad_clip must be a positive number or null, got 0"),
])
def test_bad_train_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        TrainSettings(**kwargs)


def test_an_exhausted_batch_iterator_is_an_error():
    adapted = variants.build(tiny_llama(), {"r": 4})
    with pytest.raises(ValueError, match="batches ran out"):
        variants.train(adapted, iter(_batches(1)), TrainSettings(steps=3, lr=1e-3))
