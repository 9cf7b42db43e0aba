"""Statistics over seeds and test items: hierarchical bootstrap, Holm–Bonferroni, detectable effect.

The building blocks of the seeds-and-corrected-statistics report (issue 11); pure functions on
arrays, no pipeline I/O. A method's result is an error table E[s, i] (seed s, test item i) with
the item's length L[i] (phoneme error rate: edits and reference phonemes; exact match: misses
and 1). Its error rate on one seed is  r_s = Σ_i E[s, i] / Σ_i L[i],  and the method's value
is the mean over seeds  r̄ = (1/S) Σ_s r_s.

Hierarchical bootstrap (two levels, as the sampling was: seeds, then test items). One resample:
draw S seed indices with replacement, then n item indices with replacement; the statistic is
the mean over the drawn seeds of Σ E / Σ L on the drawn items. The items are drawn once per
resample and shared by the drawn seeds, not drawn again for each seed: seeds and items are
crossed (every seed is evaluated on the same test words), and independent item draws per seed
would count S seeds as S test sets — with seeds that agree exactly, the interval would shrink
by √S although nothing new was measured. Both sources of variance enter: with one seed the
seed level is a no-op and only the item variance is measured, which `Estimate.seeds` lets the
report say. For a difference against a
reference method the same seed and item indices are drawn for both (the seeds are paired:
seed s gives both methods the same data order; the items are the same test words).

Two-sided bootstrap p-value of a difference Δ:  p = min(1, 2 · min(P*(Δ* ≤ 0), P*(Δ* ≥ 0))),
with P* the fraction of resamples (plus one in numerator and denominator, so p > 0).

Holm (1979): with m p-values sorted ascending p_(1) ≤ … ≤ p_(m), the adjusted values are
p̃_(k) = max_{j ≤ k} min(1, (m − j + 1) · p_(j)); a hypothesis is rejected at level α when
p̃ ≤ α. This controls the family-wise error rate for any dependence between the tests.

Smallest detectable difference (normal approximation, two-sided level α/m for the strictest
Holm step, power 1 − β):  δ_min = (z_{1 − α/(2m)} + z_{1 − β}) · SE(Δ).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A bootstrap estimate: the point value, its 95% interval and standard error, and how many
    seeds it rests on (1: the seed-to-seed variance is unmeasured)."""

    value: float
    low: float
    high: float
    se: float
    seeds: int
    p: float | None = None  # two-sided, for a difference (H0: no difference)

    @property
    def seed_variance_measured(self) -> bool:
        return self.seeds > 1

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _as_table(errors, lengths) -> tuple[np.ndarray, np.ndarray]:
    table = np.asarray(errors, dtype=float)
    if table.ndim == 1:
        table = table[None, :]  # one seed
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"errors must be a (seeds, items) table with at least one of each, got shape {table.shape}")
    lengths = np.asarray(lengths, dtype=float)
    if lengths.shape != (table.shape[1],):
        raise ValueError(f"lengths must hold one value per test item ({table.shape[1]}), got shape {lengths.shape}")
    if not (lengths > 0).all():
        raise ValueError(f"every test item needs a positive length, got {lengths[lengths <= 0][:5].tolist()}")
    if not np.isfinite(table).all():
        raise ValueError("errors hold a NaN or infinite value")
    return table, lengths


def seed_means(errors, lengths) -> np.ndarray:
    """r_s for every seed: Σ_i E[s, i] / Σ_i L[i]."""
    table, lengths = _as_table(errors, lengths)
    return table.sum(1) / lengths.sum()


def _resample_indices(seeds: int, items: int, samples: int, rng: np.random.Generator):
    seed_idx = rng.integers(0, seeds, size=(samples, seeds))
    item_idx = rng.integers(0, items, size=(samples, items))  # shared by the drawn seeds (crossed design)
    return seed_idx, item_idx


def _resampled_rates(table: np.ndarray, lengths: np.ndarray, seed_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
    """The statistic on every resample: mean over the drawn seeds of Σ E / Σ L on the drawn items."""
    drawn = table[seed_idx[..., None], item_idx[:, None, :]]  # (samples, seeds, items)
    return (drawn.sum(-1) / lengths[item_idx].sum(-1)[:, None]).mean(-1)


def hierarchical_bootstrap(errors, lengths, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Estimate:
    """r̄ with a 95% percentile interval from resampling seeds, then items within each seed."""
    table, lengths = _as_table(errors, lengths)
    rng = np.random.default_rng(seed)
    seed_idx, item_idx = _resample_indices(table.shape[0], table.shape[1], samples, rng)
    stats = _resampled_rates(table, lengths, seed_idx, item_idx)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Estimate(float(seed_means(table, lengths).mean()), float(low), float(high), float(stats.std(ddof=1)),
                    table.shape[0])


def paired_difference(errors, reference, lengths, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Estimate:
    """r̄(errors) − r̄(reference), seeds and items resampled alike for both; with a two-sided p."""
    table, lengths = _as_table(errors, lengths)
    ref, _ = _as_table(reference, lengths)
    if ref.shape != table.shape:
        raise ValueError(f"the method and the reference must cover the same seeds and items: "
                         f"{table.shape} vs {ref.shape}")
    rng = np.random.default_rng(seed)
    seed_idx, item_idx = _resample_indices(table.shape[0], table.shape[1], samples, rng)
    diffs = (_resampled_rates(table, lengths, seed_idx, item_idx) - _resampled_rates(ref, lengths, seed_idx, item_idx))
    low, high = np.percentile(diffs, [2.5, 97.5])
    below = (np.count_nonzero(diffs <= 0) + 1) / (samples + 1)
    above = (np.count_nonzero(diffs >= 0) + 1) / (samples + 1)
    delta = float((seed_means(table, lengths) - seed_means(ref, lengths)).mean())
    return Estimate(delta, float(low), float(high), float(diffs.std(ddof=1)), table.shape[0],
                    p=min(1.0, 2 * min(below, above)))


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (same keys); reject at level α where the value is ≤ α."""
    for name, p in pvalues.items():
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"p-value of {name!r} must be in [0, 1], got {p!r}")
    order = sorted(pvalues, key=pvalues.get)
    m = len(order)
    adjusted: dict[str, float] = {}
    running = 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def detectable_difference(se: float, comparisons: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest |Δ| a two-sided test at level α/m (Holm's strictest step) finds with `power`."""
    if not se >= 0:
        raise ValueError(f"standard error must be non-negative, got {se!r}")
    if not (isinstance(comparisons, int) and comparisons >= 1):
        raise ValueError(f"comparisons must be a positive integer, got {comparisons!r}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha!r}, power={power!r}")
    z = NormalDist().inv_cdf
    return (z(1 - alpha / (2 * comparisons)) + z(power)) * se
