"""pipeline/stats.py on constructed data with known answers: a pure seed effect, a pure item effect,
Holm's adjustment against a hand computation, the one-seed case, the detectable difference."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import stats

B = stats.BOOTSTRAP_SAMPLES


def _draws(seeds: int, items: int, seed: int = 0):
    """The resample indices the functions draw (same generator, same order)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, seeds, size=(B, seeds)), rng.integers(0, items, size=(B, items))


def test_a_pure_seed_effect_gives_the_bootstrap_of_the_seed_means():
    lengths = np.arange(1, 41, dtype=float)  # items of different lengths
    rates = np.array([0.2, 0.3, 0.5, 0.6])   # each seed's error rate, the same on every item
    errors = rates[:, None] * lengths[None, :]
    est = stats.hierarchical_bootstrap(errors, lengths)
    seed_idx, _ = _draws(4, 40)
    low, high = np.percentile(rates[seed_idx].mean(1), [2.5, 97.5])  # item draws cannot matter here
    assert est.value == pytest.approx(rates.mean())
    assert (est.low, est.high) == pytest.approx((low, high))
    assert est.high - est.low > 0.1 and est.seed_variance_measured
    # any single seed alone: no item variance at all, so the interval is a point
    alone = stats.hierarchical_bootstrap(errors[2], lengths)
    assert alone.low == pytest.approx(0.5) and alone.high == pytest.approx(0.5)


def test_a_pure_item_effect_is_not_narrowed_by_seeds_that_agree():
    rng = np.random.default_rng(7)
    lengths = rng.integers(3, 9, size=60).astype(float)
    per_item = rng.integers(0, 4, size=60).astype(float)
    one = stats.hierarchical_bootstrap(per_item, lengths)
    four = stats.hierarchical_bootstrap(np.tile(per_item, (4, 1)), lengths)
    # the known answer: the item bootstrap of the one table, whatever the number of identical seeds
    _, item_idx = _draws(4, 60)
    expected = np.percentile(per_item[item_idx].sum(1) / lengths[item_idx].sum(1), [2.5, 97.5])
    assert (four.low, four.high) == pytest.approx(tuple(expected))
    assert four.value == pytest.approx(one.value) == pytest.approx(per_item.sum() / lengths.sum())
    # independent item draws per seed would shrink it by ~sqrt(4) = 2
    assert 0.8 < (four.high - four.low) / (one.high - one.low) < 1.25


def test_one_seed_is_the_plain_item_bootstrap_and_says_seed_variance_is_unmeasured():
    lengths = np.full(30, 5.0)
    errors = np.r_[np.zeros(15), np.full(15, 2.0)]
    est = stats.hierarchical_bootstrap(errors, lengths)
    _, item_idx = _draws(1, 30)
    expected = np.percentile(errors[item_idx].sum(1) / lengths[item_idx].sum(1), [2.5, 97.5])
    assert (est.low, est.high) == pytest.approx(tuple(expected))
    assert est.seeds == 1 and not est.seed_variance_measured
    assert est.value == pytest.approx(0.2)


def test_paired_difference_of_identical_methods_is_zero_with_p_one():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 9, size=50).astype(float)
    errors = rng.integers(0, 3, size=(3, 50)).astype(float)
    diff = stats.paired_difference(errors, errors.copy(), lengths)
    assert (diff.value, diff.low, diff.high, diff.p) == (0.0, 0.0, 0.0, 1.0)
    assert not diff.excludes_zero


def test_paired_difference_finds_a_method_worse_on_every_seed_and_item():
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 9, size=50).astype(float)
    reference = rng.integers(0, 3, size=(3, 50)).astype(float)
    worse = reference + 1.0
    diff = stats.paired_difference(worse, reference, lengths)
    assert diff.value == pytest.approx(50 / lengths.sum())
    assert diff.excludes_zero and diff.low > 0
    assert diff.p == pytest.approx(2 / (B + 1))  # no resample at or below zero: the smallest p there is


def test_holm_against_a_hand_computation():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    # sorted: d 0.005*4 = 0.02; a 0.01*3 = 0.03; c 0.03*2 = 0.06; b max(0.06, 0.04*1) = 0.06
    assert stats.holm(p) == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert stats.holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert stats.holm({}) == {}
    with pytest.raises(ValueError, match="'z'.*1.5"):
        stats.holm({"z": 1.5})


def test_detectable_difference_is_the_normal_power_formula():
    # z_{0.975} + z_{0.8} = 1.95996 + 0.84162
    assert stats.detectable_difference(1.0, 1) == pytest.approx(2.80158, abs=1e-4)
    # ten comparisons: z_{1 - 0.0025} = 2.80703
    assert stats.detectable_difference(0.01, 10) == pytest.approx(0.01 * (2.80703 + 0.84162), abs=1e-6)
    with pytest.raises(ValueError, match="comparisons"):
        stats.detectable_difference(0.01, 0)


@pytest.mark.parametrize("errors, lengths, match", [
    (np.zeros((2, 3)), np.ones(4), "one value per test item"),
    (np.zeros((2, 3)), np.array([1.0, 0.0, 1.0]), "positive length"),
    (np.array([[np.nan, 0.0, 0.0]]), np.ones(3), "NaN"),
    (np.zeros((0, 3)), np.ones(3), "at least one"),
])
def test_bad_tables_are_refused_by_name(errors, lengths, match):
    with pytest.raises(ValueError, match=match):
        stats.hierarchical_bootstrap(errors, lengths)


def test_a_difference_needs_the_same_seeds_and_items():
    with pytest.raises(ValueError, match=r"same seeds and items: \(3, 4\) vs \(2, 4\)"):
        stats.paired_difference(np.zeros((3, 4)), np.zeros((2, 4)), np.ones(4))
