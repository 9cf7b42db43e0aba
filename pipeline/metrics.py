"""Evaluation metrics for G2P and generic prompt/response generations.

- ``edit_distance(a, b)``: Levenshtein distance over tokens (insert, delete, substitute: cost 1).
- ``phoneme_error_rate(preds, refs)`` (PER), corpus level:

      PER = sum_i edit_distance(pred_i.split(), ref_i.split()) / sum_i len(ref_i.split())

  It can exceed 1 (a prediction longer than its reference costs one insertion per extra phone),
  which is what the untrained base model does (about 1.3: docs/pipeline.md).
- ``exact_match(preds, refs)``: fraction of pairs that are equal after whitespace normalisation.
- ``normalize_generation(text)``: the part of a greedy generation that is compared: its first
  line, stripped, with runs of whitespace collapsed to one space.

Phones are compared as whole tokens, so with stress kept "AE" vs "AE1" is one substitution.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["edit_distance", "exact_match", "normalize_generation", "phoneme_error_rate"]


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two token sequences, O(len(a) * len(b)) time, two rows."""
    if len(a) < len(b):
        # The distance is symmetric; keeping the shorter sequence on the inside bounds the row size.
        a, b = b, a
    previous = list(range(len(b) + 1))  # distance from a[:0] to each prefix of b
    for i, token_a in enumerate(a, start=1):
        current = [i]
        for j, token_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete token_a
                    current[j - 1] + 1,  # insert token_b
                    previous[j - 1] + (token_a != token_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not references:
        raise ValueError("no references: a metric over zero examples is undefined")
    for kind, texts in (("prediction", predictions), ("reference", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{kind} {i} must be a string, got {type(text).__name__} {text!r}")


def phoneme_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level PER: total edit distance over total reference phones (whitespace tokens)."""
    _check_pairs(predictions, references)
    errors = 0
    phones = 0
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        ref_phones = ref.split()
        if not ref_phones:
            raise ValueError(f"reference {i} has no phones: {ref!r}")
        errors += edit_distance(pred.split(), ref_phones)
        phones += len(ref_phones)
    return errors / phones


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of pairs whose whitespace-normalised strings are equal."""
    _check_pairs(predictions, references)
    hits = sum(p.split() == r.split() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def normalize_generation(text: str) -> str:
    """First line of a generation, stripped, with whitespace runs collapsed to single spaces.

    The model is trained to stop after the answer but may go on with a new line (another
    "Spell:" prompt, say); only the first line is the answer. The caller decodes with
    ``skip_special_tokens=True``, so EOS text never reaches this function.
    """
    if not isinstance(text, str):
        raise ValueError(f"generation must be a string, got {type(text).__name__} {text!r}")
    lines = text.splitlines()  # \n, \r\n, \r and the other Unicode line breaks
    return " ".join(lines[0].split()) if lines else ""
