"""The comparison report's judgements, derived from measurements, and its rendering from templates.

No sentence about a method is fixed text, and no word of the report lives here:

- quality (pipeline/stats.py on the seeds x test-items error table: phoneme edits / reference
  phonemes for G2P, else exact-match misses): each method's mean over seeds with a 95%
  hierarchical-bootstrap interval; its difference to LoRA (paired: same seeds, same items
  drawn for both) with a two-sided bootstrap p; Holm (1979) across every comparison of the
  run. "better"/"worse" only when the Holm-adjusted p <= ALPHA, else "comparable"; LoRA itself
  is the "baseline"; without LoRA in the run there is no reference ("no_reference"). The
  smallest difference the run could detect: `stats.detectable_difference` with the comparisons'
  bootstrap standard errors, at Holm's strictest level;
- memory label: mean training memory (exact base-weight bytes + the measured growth of memory
  during training) relative to LoRA's, outside a band of +-`memory_margin` ("lowest" for the
  minimum when it is below the band, "low", "high", else "medium"; "no_reference" without LoRA);
- use case: from the same numbers (fewest trainable parameters, lowest memory, measurably
  better quality, faster training by SPEED_MARGIN), falling back to "general";
- imported adapters (`peft_adapter`, trained elsewhere): compared on quality like any other,
  left out of every training-cost judgement (memory label "imported", never "faster").

The words are in pipeline/templates/report.<lang>.md.j2 (Jinja2), filled from one context that
pipeline/compare.py computes; numbers reach the text through the filters below, so a reader
edits the text without reading any statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import variants
from pipeline import stats
from variants.parts import SLOTS, part_class

ALPHA = 0.05  # family-wise error rate of the quality labels (Holm)
POWER = 0.8   # of the detectable-difference line
# Stages run one after another on a shared 2-core machine, and a whole stage can run slow: LoRA's
# stage measured 201, 126 and 132 tokens/s in three runs of the same code, and in one run rsLoRA
# (the same computation) 179 against LoRA's 132. Only a gap above the largest such spread counts.
SPEED_MARGIN = 1.6
# Memory labels: the committed one-seed run measured rsLoRA (the same tensors as LoRA, only another
# scale constant) at 1.84 GiB against LoRA's 1.75 GiB, +5.1% (0.09 GiB): the old +-5% band was
# crossed by noise alone. The band is twice that largest gap between identical computations, and
# with several seeds at least twice the largest seed-to-seed spread of any method's memory.
MEMORY_NOISE = 0.051
MEMORY_MARGIN = 2 * MEMORY_NOISE
TEMPLATES = Path(__file__).with_name("templates")


def is_faster(rows: dict[str, dict], name: str, reference: str = "lora", imported=frozenset()) -> bool:
    """True when `name` trained at least SPEED_MARGIN x faster than the reference *and* than the
    median of all trained methods.

    Stages run one after another, so a slow spell of the machine during one stage makes that
    stage slow as a whole (seen: LoRA's stage at 126 tokens/s in one run, 201 in another, same
    computation). Against an unlucky reference every method would look faster; a method that
    is really faster also stands out against the field. Imported adapters (`imported`) were not
    trained here: they are neither candidates, nor the reference, nor part of the field.
    """
    if reference not in rows or name == reference or name in imported or reference in imported:
        return False
    tps = rows[name]["tokens_per_second"]
    field = [row["tokens_per_second"] for n, row in rows.items() if row["tokens_per_second"] > 0 and n not in imported]
    return tps >= SPEED_MARGIN * rows[reference]["tokens_per_second"] and tps >= SPEED_MARGIN * float(np.median(field))


DEFAULT_PARTS = {"scaling": "standard", "base": "full", "init": "default", "optimizer": "adamw", "step": "none"}


def core_idea(spec: variants.AdapterSpec, lang: str = "en") -> str:
    """The spec's core idea: its non-default parts' ideas, or its layer kind's (the parts' own words)."""
    attr = "idea_zh" if lang == "zh" else "idea"
    ideas = []
    if spec.layer != "lora" or all(getattr(spec, s) == d for s, d in DEFAULT_PARTS.items()):
        ideas.append(getattr(part_class("layer", spec.layer), attr) or part_class("layer", spec.layer).idea)
    for slot in SLOTS[1:]:
        name = getattr(spec, slot)
        if name != DEFAULT_PARTS[slot]:
            cls = part_class(slot, name)
            ideas.append(getattr(cls, attr) or cls.idea)
    return ("；" if lang == "zh" else "; ").join(ideas)


# ----- quality ----------------------------------------------------------------------------------------
def error_table(per_seed: list[list[dict]], g2p: bool, ids: list[str] | None = None,
                name: str = "a method") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(E[seeds, items], L[items], item ids) from each seed's predictions: phoneme edits and reference
    phonemes for G2P, else exact-match misses and 1. Every seed must cover the same items (`ids`
    when given: the reference's)."""
    tables = []
    lengths: dict[str, float] = {}
    for predictions in per_seed:
        errors = {}
        for p in predictions:
            errors[p["id"]] = p["edits"] if g2p else (0 if p["exact"] else 1)
            lengths[p["id"]] = p["ref_len"] if g2p else 1
        if ids is None:
            ids = sorted(errors)
        if sorted(errors) != sorted(ids):
            raise ValueError(f"predictions of {name} cover different test examples than the others "
                             f"({len(errors)} vs {len(ids)} items)")
        tables.append([errors[i] for i in ids])
    return np.asarray(tables, dtype=float), np.asarray([lengths[i] for i in ids], dtype=float), list(ids)


@dataclass(frozen=True)
class Quality:
    """Every method's error estimate, and (with a reference) its difference to it, Holm-adjusted."""

    estimates: dict[str, stats.Estimate]
    deltas: dict[str, stats.Estimate]      # method -> difference to the reference (reference excluded)
    p_holm: dict[str, float]
    labels: dict[str, str]
    reference: str | None
    seeds: int
    detectable: tuple[float, float, float] | None  # (median, min, max) over the comparisons

    def significant(self, name: str) -> bool:
        return name in self.p_holm and self.p_holm[name] <= ALPHA


def quality(predictions: dict[str, list[list[dict]]], g2p: bool, reference: str = "lora",
            samples: int = stats.BOOTSTRAP_SAMPLES) -> Quality:
    """Estimates, paired differences to `reference` (when it is among the methods), Holm and labels.

    `predictions[name]` holds one list of predictions per seed, in the same seed order for every
    method (the seeds are paired: seed s gave every method the same data order)."""
    names = list(predictions)
    ref = reference if reference in predictions else None
    first = ref or names[0]
    _, lengths, ids = error_table(predictions[first], g2p, name=first)
    tables = {name: error_table(predictions[name], g2p, ids, name)[0] for name in names}
    seeds = {t.shape[0] for t in tables.values()}
    if len(seeds) != 1:
        raise ValueError(f"every method needs the same seeds, got {({n: t.shape[0] for n, t in tables.items()})}")
    estimates = {name: stats.hierarchical_bootstrap(tables[name], lengths, samples) for name in names}
    deltas, labels = {}, {}
    if ref is None:
        return Quality(estimates, {}, {}, dict.fromkeys(names, "no_reference"), None, seeds.pop(), None)
    for name in names:
        if name != ref:
            deltas[name] = stats.paired_difference(tables[name], tables[ref], lengths, samples)
    adjusted = stats.holm({name: d.p for name, d in deltas.items()}) if deltas else {}
    for name in names:
        if name == ref:
            labels[name] = "baseline"
        elif adjusted[name] <= ALPHA:
            labels[name] = "worse" if deltas[name].value > 0 else "better"
        else:
            labels[name] = "comparable"
    detectable = None
    # (a method whose every prediction equals the reference's has SE 0: it says nothing about the run's resolution)
    found = [stats.detectable_difference(d.se, len(deltas), ALPHA, POWER) for d in deltas.values() if d.se > 0]
    if found:
        detectable = (float(np.median(found)), min(found), max(found))
    return Quality(estimates, deltas, adjusted, labels, ref, seeds.pop(), detectable)


# ----- memory and use cases ---------------------------------------------------------------------------
def memory_margin(per_seed_memory: dict[str, list[float]]) -> float:
    """MEMORY_MARGIN, or twice the largest seed-to-seed spread (max - min over the mean) of any
    method's training memory when that is larger: no label is decided by noise this run measured."""
    spreads = [(max(v) - min(v)) / float(np.mean(v)) for v in per_seed_memory.values() if len(v) > 1 and np.mean(v) > 0]
    return max([MEMORY_MARGIN] + [2 * s for s in spreads])


def memory_labels(rows: dict[str, dict], reference: str = "lora", imported=frozenset(),
                  margin: float = MEMORY_MARGIN) -> dict[str, str]:
    """Training memory relative to the reference's, outside +-margin; "imported" for adapters not trained here."""
    out = {name: "imported" for name in rows if name in imported}
    trained = {name: row for name, row in rows.items() if name not in imported}
    if reference not in trained:  # nothing to be measured against
        return {name: out.get(name, "no_reference") for name in rows}
    ref = trained[reference]["training_memory_bytes"]
    ratios = {name: row["training_memory_bytes"] / ref for name, row in trained.items()}
    lowest = min(ratios, key=ratios.get)
    for name, ratio in ratios.items():
        if ratio < 1 - margin:
            out[name] = "lowest" if name == lowest else "low"
        elif ratio > 1 + margin:
            out[name] = "high"
        else:
            out[name] = "medium"
    return {name: out[name] for name in rows}


def use_cases(rows: dict[str, dict], qualities: dict[str, str], memories: dict[str, str], reference: str = "lora",
              imported=frozenset()) -> dict[str, list[str]]:
    """Derived use cases (keys the templates name); imported adapters get no training-cost case."""
    ref = rows.get(reference)
    out = {}
    for name, row in rows.items():
        cases = []
        if ref and name != reference:
            if row["trainable_params"] <= 0.25 * ref["trainable_params"]:
                cases.append("few_params")
            if memories[name] in ("low", "lowest"):
                cases.append("memory")
            if qualities[name] == "better":
                cases.append("quality")
            if is_faster(rows, name, reference, imported):
                cases.append("speed")
            if qualities[name] == "worse":
                cases.append("avoid_here")
        out[name] = cases or ["general"]
    return out


# ----- number formats (the templates' filters) --------------------------------------------------------
def fmt_bytes(n: float) -> str:
    if n is None:
        return "—"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def fmt_params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def fmt_interval(est: dict | None, digits: int = 3) -> str:
    """'0.531 [0.490, 0.572]' for {'value', 'low', 'high'}."""
    if est is None:
        return "—"
    return f"{est['value']:.{digits}f} [{est['low']:.{digits}f}, {est['high']:.{digits}f}]"


def fmt_pp(est: dict | None) -> str:
    """A difference of rates in percentage points with its interval: '+1.9 [-4.3, +8.7]'."""
    if est is None:
        return "—"
    return f"{100 * est['value']:+.1f} [{100 * est['low']:+.1f}, {100 * est['high']:+.1f}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_lr(lr: float | None) -> str:
    return f"{lr:.0e}" if is_finite(lr) else "—"


def fmt_fixed(x: float | None, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if is_finite(x) else "—"


def fmt_percent(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


FILTERS = {"bytes": fmt_bytes, "params": fmt_params, "interval": fmt_interval, "pp": fmt_pp, "p": fmt_p,
           "lr": fmt_lr, "fixed": fmt_fixed, "percent": fmt_percent}


# ----- rendering --------------------------------------------------------------------------------------
def environment():
    """The templates' Jinja2 environment: a missing context key is an error, nothing is escaped."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(FILTERS)
    return env


LANGUAGES = ("en", "zh")


def render(lang: str, context: dict) -> str:
    """The whole report in `lang` from the computed context."""
    if lang not in LANGUAGES:
        raise ValueError(f"no report template for language {lang!r} (have: {', '.join(LANGUAGES)})")
    return environment().get_template(f"report.{lang}.md.j2").render(**context)


def section(lang: str, name: str, *args) -> str:
    """One section of the report (a macro of the language's template), e.g. section('en', 'distributed', ctx)."""
    # (the template's body is skipped: it needs the whole context, a macro only its arguments)
    module = environment().get_template(f"report.{lang}.md.j2").make_module({"macros_only": True})
    return str(getattr(module, name)(*args))
