"""The report's derived numbers: Holm-corrected quality labels, memory labels, use cases, number formats,
and the Llama-2-7B memory projection (pipeline/report.py, pipeline/projection.py)."""

from __future__ import annotations

import numpy as np
import pytest

import variants
from pipeline import report as R
from pipeline import stats
from pipeline.projection import project
from variants.quant import quantized_bytes

# ----- quality: intervals, differences to LoRA, Holm labels --------------------------------------------


def _predictions(edits):
    return [{"id": f"w{i}", "edits": e, "ref_len": 5, "exact": e == 0} for i, e in enumerate(edits)]


def test_quality_labels_come_from_the_holm_adjusted_p():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 4, size=80).tolist()
    flip = rng.permutation(80)[:6]
    noisy = [e + (1 if i in flip[:3] else -1 if (i in flip[3:] and e > 0) else 0) for i, e in enumerate(base)]
    predictions = {
        "lora": [_predictions(base)],
        "good": [_predictions([max(e - 1, 0) for e in base])],   # clearly better on most items
        "same": [_predictions(base)],                            # exactly LoRA
        "noise": [_predictions(noisy)],                          # three items up, three down
        "bad": [_predictions([e + 2 for e in base])],
    }
    q = R.quality(predictions, g2p=True)
    assert q.labels == {"lora": "baseline", "good": "better", "same": "comparable", "noise": "comparable",
                        "bad": "worse"}
    assert q.deltas["bad"].value == pytest.approx(2 / 5) and q.deltas["same"].value == 0
    assert set(q.p_holm) == {"good", "same", "noise", "bad"}  # one family: every comparison of the run
    assert q.p_holm == pytest.approx(stats.holm({n: d.p for n, d in q.deltas.items()}))
    assert q.p_holm["good"] <= R.ALPHA < q.p_holm["noise"]
    # exact-match error when the task has no phonemes: every example is either right or wrong
    assert R.quality(predictions, g2p=False).labels["bad"] == "worse"


def test_quality_without_lora_has_no_reference_and_no_differences():
    q = R.quality({"dora": [_predictions([1, 2, 3])], "vera": [_predictions([3, 3, 3])]}, g2p=True)
    assert q.reference is None and q.deltas == {} and q.detectable is None
    assert q.labels == {"dora": "no_reference", "vera": "no_reference"}
    assert q.estimates["vera"].value == pytest.approx(9 / 15)


def test_quality_refuses_predictions_over_different_examples():
    predictions = {"lora": [_predictions([1, 2, 3])], "other": [_predictions([1, 2])]}
    with pytest.raises(ValueError, match="predictions of other cover different test examples"):
        R.quality(predictions, g2p=True)


# ----- memory labels and use cases -------------------------------------------------------------------


def _row(memory=1000, params=100, tps=100.0):
    return {"training_memory_bytes": memory, "trainable_params": params, "tokens_per_second": tps}


def test_memory_labels_follow_the_ratio_to_lora_outside_the_margin():
    m = R.MEMORY_MARGIN
    rows = {"lora": _row(1000), "a": _row(1000 * (1 - m) - 20), "b": _row(1000 * (1 - m) - 1),
            "c": _row(1000 * (1 + m) - 1), "d": _row(1000 * (1 + m) + 1)}
    assert R.memory_labels(rows) == {"lora": "medium", "a": "lowest", "b": "low", "c": "medium", "d": "high"}
    # the minimum is only "lowest" when it is itself below the band
    assert R.memory_labels({"lora": _row(1000), "e": _row(990)})["e"] == "medium"
    assert set(R.memory_labels({"x": _row(1), "y": _row(5)}).values()) == {"no_reference"}  # no LoRA


def test_the_memory_margin_is_wider_than_the_noise_that_flipped_the_old_labels():
    # the committed one-seed run: rsLoRA (LoRA's very tensors) 1.84 GiB against LoRA's 1.75 GiB; the old
    # +-5% band called it "medium" only by 0.003 GiB, and lora_plus (1.85 GiB, same tensors too) "high"
    gib = 2**30
    rows = {"lora": _row(1.75 * gib), "rslora": _row(1.84 * gib), "lora_plus": _row(1.85 * gib),
            "qlora": _row(1.48 * gib), "vera": _row(2.09 * gib)}
    assert R.memory_labels(rows) == {"lora": "medium", "rslora": "medium", "lora_plus": "medium",
                                     "qlora": "lowest", "vera": "high"}
    # several seeds: a method whose memory moved 8% between seeds widens the band to 16%
    assert R.memory_margin({"lora": [1.0, 1.0], "dora": [1.0, 1.08]}) == pytest.approx(2 * 0.08 / 1.04)
    assert R.memory_margin({"lora": [1.0]}) == R.MEMORY_MARGIN  # one seed: the measured floor


def test_use_cases_are_derived_from_the_numbers():
    margin = R.SPEED_MARGIN
    rows = {"lora": _row(1000, 100, 100.0), "tiny": _row(1000, 25, 100.0), "fast": _row(1000, 100, 100 * margin),
            "lean": _row(850, 100, 100 * margin - 1), "plain": _row(1000, 26, 100.0)}
    memories = R.memory_labels(rows)
    qualities = dict.fromkeys(rows, "comparable")
    qualities["lean"] = "worse"
    cases = R.use_cases(rows, qualities, memories)
    assert cases["lora"] == ["general"]
    assert cases["tiny"] == ["few_params"]
    assert cases["fast"] == ["speed"]  # exactly the speed margin counts, just below it does not
    assert cases["lean"] == ["memory", "avoid_here"]
    assert cases["plain"] == ["general"]


def test_a_slow_reference_stage_does_not_make_the_field_faster():
    # one run measured LoRA's stage at 126 tokens/s while the others ran 144-202 (LoRA ran 201 in
    # the run before): against LoRA alone, most methods would have been labelled faster
    tps = {"lora": 126, "rslora": 185, "dora": 144, "lora_fa": 202, "lora_plus": 176, "qlora": 168, "sora": 167}
    rows = {name: _row(1000, 100, float(t)) for name, t in tps.items()}
    rows["base model"] = _row(1000, 0, 0.0)  # not trained: no speed, left out of the field
    assert not any(R.is_faster(rows, name) for name in rows)
    # another run: rsLoRA (the same computation as LoRA) at 179 against LoRA's 132 and a median of 140
    other = {"lora": 132, "rslora": 179, "dora": 140, "vera": 96, "lora_fa": 146, "lora_plus": 138,
             "delta_lora": 151, "qlora": 142, "loftq": 140, "adalora": 125, "sora": 131}
    assert not any(R.is_faster({n: _row(1000, 100, float(t)) for n, t in other.items()}, n) for n in other)
    rows["really_fast"] = _row(1000, 100, R.SPEED_MARGIN * 202.0)  # margin x the fastest, so x the median too
    assert R.is_faster(rows, "really_fast")
    assert not R.is_faster(rows, "lora")  # the reference is never faster than itself
    qualities = dict.fromkeys(rows, "comparable")
    cases = R.use_cases(rows, qualities, R.memory_labels(rows))
    assert [name for name, c in cases.items() if "speed" in c] == ["really_fast"]


def test_imported_adapters_get_no_training_cost_label_and_leave_the_others_unchanged():
    # an adapter imported with `peft_adapter` was not trained here: no memory, no speed (train stage's summary)
    rows = {"lora": _row(1000, 100, 100.0), "plain": _row(1000, 100, 100.0), "lean": _row(850, 100, 170.0),
            "mine": _row(None, 20, 0.0)}
    trained = {name: row for name, row in rows.items() if name != "mine"}
    memories = R.memory_labels(rows, imported={"mine"})
    assert memories == {"lora": "medium", "plain": "medium", "lean": "lowest", "mine": "imported"}
    assert list(memories) == list(rows)
    assert {n: memories[n] for n in trained} == R.memory_labels(trained)
    # an imported reference: the trained ones have nothing to be measured against
    assert R.memory_labels(rows, imported={"lora"})["lora"] == "imported"
    fast_import = {**rows, "mine": _row(None, 20, 1000.0)}  # whatever speed it claims
    assert not R.is_faster(fast_import, "mine", imported={"mine"})
    assert R.is_faster(fast_import, "lean", imported={"mine"})  # median of the trained field: 100
    assert not R.is_faster(fast_import, "lean")  # were it in the field, the median would be 135
    qualities = dict.fromkeys(rows, "comparable")
    cases = R.use_cases(rows, qualities, memories, imported={"mine"})
    assert cases["mine"] == ["few_params"]  # the adapter's own size still counts; training costs do not
    assert cases["lean"] == ["memory", "speed"]


# ----- Llama-2-7B projection -------------------------------------------------------------------------

LLAMA2_7B_PARAMS = 6_738_415_616  # the published parameter count of Llama-2-7B


def test_projection_of_lora_on_q_and_v_matches_the_known_counts():
    proj = project("lora", variants.get("lora", r=8, alpha=16, target_modules="q_proj,v_proj"))
    assert proj.base_params == LLAMA2_7B_PARAMS
    assert proj.trainable_params == 4_194_304  # 32 layers x 2 modules x 8 x (4096 + 4096)
    assert proj.base_bytes == 2 * LLAMA2_7B_PARAMS
    assert proj.adapter_bytes == proj.gradient_bytes == 4 * 4_194_304
    assert proj.optimizer_bytes == 8 * 4_194_304
    assert proj.extra_bytes == 0
    assert proj.total_bytes == 2 * LLAMA2_7B_PARAMS + 16 * 4_194_304


def test_projection_of_a_4bit_base_counts_nf4_bytes_for_the_adapted_linears_only():
    spec = variants.get("qlora", r=8, alpha=16, target_modules="all-linear")
    proj = project("qlora", spec, base_bits="4bit", blocksize=64, double_quant=True)
    per_layer = {(4096, 4096): 4 * 32, (4096, 11008): 3 * 32}  # q,k,v,o and gate,up,down per layer
    linear = sum(n * a * b for (a, b), n in per_layer.items())
    quantized = sum(n * quantized_bytes(a * b, 64, True) for (a, b), n in per_layer.items())
    assert proj.base_bytes == quantized + 2 * (LLAMA2_7B_PARAMS - linear)
    assert 4.12 < 8 * quantized / linear < 4.13  # NF4 + double quantization: about 4.127 bits/param
    assert proj.total_gib < 0.35 * project("lora", variants.get("lora", r=8, alpha=16,
                                                                 target_modules="all-linear")).total_gib


def test_projection_counts_delta_loras_fp32_residual_and_veras_shared_pair():
    delta = project("delta_lora", variants.get("delta_lora", r=8, alpha=16, target_modules="q_proj"))
    assert delta.extra_bytes == 4 * 32 * 4096 * 4096
    vera = project("vera", variants.get("vera", r=256, target_modules="q_proj"))
    assert vera.trainable_params == 32 * (4096 + 256)  # λ_b (out) + λ_d (r) per layer
    # adapter bytes include the one frozen shared pair A (r x in) and B (out x r)
    assert vera.adapter_bytes == 4 * (32 * (4096 + 256) + 256 * 4096 + 4096 * 256)


# ----- plot labels ---------------------------------------------------------------------------------


def test_labels_of_coinciding_points_do_not_overprint():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.compare import label_points

    fig, ax = plt.subplots(figsize=(7, 5))
    points = [(name, 2.44e6, 0.53 + 0.004 * i) for i, name in enumerate(
        ["lora", "rslora", "dora", "lora_plus", "delta_lora", "loftq", "sora"])] + [("vera", 2e5, 1.14)]
    ax.scatter([x for _, x, _ in points], [y for _, _, y in points])
    ax.set_xscale("log")
    label_points(ax, points)
    fig.canvas.draw()  # resolves the annotations' offsets into positions
    renderer = fig.canvas.get_renderer()
    # the text's own box (Annotation.get_window_extent would include the leader line)
    boxes = [matplotlib.text.Text.get_window_extent(text, renderer) for text in ax.texts]
    assert [text.get_text() for text in ax.texts] and len(boxes) == len(points)
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    plt.close(fig)
    assert not overlaps, overlaps


def test_number_formats():
    assert [R.fmt_params(n) for n in (0, 512, 209_280, 2_442_240)] == ["0", "512", "209.3k", "2.44M"]
    assert [R.fmt_bytes(n) for n in (512, 9_813_168, 538_060_288, 2_509_395_456)] == [
        "0.5 KiB", "9.4 MiB", "513.1 MiB", "2.34 GiB"]
