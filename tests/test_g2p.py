"""Task data: CMUdict pairs, prompts, word-disjoint splits, and the user-data readers."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pipeline.errors import DataError
from pipeline.g2p import (
    DEFAULT_TEMPLATE,
    format_prompt,
    load_cmudict_pairs,
    read_hf_dataset,
    read_jsonl,
    split_by_word,
    split_records,
)


@pytest.fixture(scope="module")
def stressed():
    return load_cmudict_pairs(keep_stress=True)


@pytest.fixture(scope="module")
def unstressed():
    return load_cmudict_pairs(keep_stress=False)


# ---------------------------------------------------------------- load_cmudict_pairs


def test_cmudict_keeps_only_alphabetic_words_sorted(stressed):
    words = [r["word"] for r in stressed]
    assert len(words) == 117_493  # of 126,052 entries; 8,559 have ' - or .
    assert words == sorted(words)
    assert len(set(words)) == len(words)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    by_word = {r["word"]: r for r in stressed}
    for dropped in ("'bout", "ray's", "self-destructing", "i.s"):
        assert dropped not in by_word


def test_cmudict_first_pronunciation_with_and_without_stress(stressed, unstressed):
    by_word = {r["word"]: r for r in stressed}
    assert by_word["fan"] == {"word": "fan", "phones": "F AE1 N", "pronunciations": ["F AE1 N"]}
    # "read" has two pronunciations; the first is the target and max_variants=1 keeps only it.
    assert by_word["read"]["phones"] == "R EH1 D"
    assert by_word["read"]["pronunciations"] == ["R EH1 D"]
    plain = {r["word"]: r for r in unstressed}
    assert plain["fan"]["phones"] == "F AE N"
    assert not any(ch.isdigit() for r in unstressed for ch in r["phones"])
    assert [r["word"] for r in unstressed] == [r["word"] for r in stressed]


def test_cmudict_max_variants_keeps_distinct_pronunciations_in_order():
    by_word = {r["word"]: r for r in load_cmudict_pairs(keep_stress=True, max_variants=3)}
    assert by_word["read"]["pronunciations"] == ["R EH1 D", "R IY1 D"]
    assert by_word["record"]["pronunciations"] == ["R AH0 K AO1 R D", "R EH1 K ER0 D", "R IH0 K AO1 R D"]
    assert by_word["record"]["phones"] == "R AH0 K AO1 R D"
    # Without stress, "abstract"'s two pronunciations (stress on either syllable) coincide.
    plain = {r["word"]: r for r in load_cmudict_pairs(keep_stress=False, max_variants=3)}
    assert plain["abstract"]["pronunciations"] == ["AE B S T R AE K T"]
    assert plain["record"]["pronunciations"] == ["R AH K AO R D", "R EH K ER D", "R IH K AO R D"]


@pytest.mark.parametrize("bad", [0, -1, 1.0, True])
def test_cmudict_rejects_bad_max_variants(bad):
    with pytest.raises(ValueError, match=rf"max_variants .* got {bad!r}"):
        load_cmudict_pairs(keep_stress=True, max_variants=bad)


def test_cmudict_returns_fresh_records(stressed):
    # The dictionary is cached; mutating one result must not leak into the next call.
    first = load_cmudict_pairs(keep_stress=True)
    first[0]["phones"] = "MUTATED"
    assert load_cmudict_pairs(keep_stress=True)[0]["phones"] != "MUTATED"


# ---------------------------------------------------------------- format_prompt


def test_default_template_spells_the_word():
    assert DEFAULT_TEMPLATE == "Spell: {letters}\nARPAbet:"
    assert format_prompt("fan", DEFAULT_TEMPLATE) == "Spell: f a n\nARPAbet:"


def test_template_with_word_and_letters():
    assert format_prompt("ox", "{word} = {letters}:") == "ox = o x:"
    assert format_prompt("ox", "Pronounce in ARPAbet: {word}\nPhonemes:") == "Pronounce in ARPAbet: ox\nPhonemes:"


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("Spell: {lettres}", r"\{lettres\}"),
        ("{word} {}", r"\{\}"),
        ("{word.upper}", r"\{word.upper\}"),
        ("{a}{b}{word}", r"\{a\}, \{b\}"),
    ],
)
def test_unknown_placeholders_are_named(template, named):
    with pytest.raises(ValueError, match=rf"unknown placeholder\(s\) {named}"):
        format_prompt("fan", template)


def test_template_without_placeholder_or_broken_braces():
    with pytest.raises(ValueError, match="no {word} or {letters} placeholder"):
        format_prompt("fan", "Spell it:")
    with pytest.raises(ValueError, match="not a valid format string"):
        format_prompt("fan", "Spell: {letters")
    with pytest.raises(ValueError, match="non-empty string"):
        format_prompt("", DEFAULT_TEMPLATE)


# ---------------------------------------------------------------- split_by_word


def _pairs(n):
    return [{"word": f"w{i:03d}", "phones": f"P{i} Q"} for i in range(n)]


def test_split_by_word_sizes_disjoint_and_record_format():
    splits = split_by_word(_pairs(50), n_train=20, n_validation=5, n_test=10, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "validation": 5, "test": 10}
    words = [r["word"] for recs in splits.values() for r in recs]
    assert len(set(words)) == len(words) == 35
    rec = splits["train"][0]
    assert set(rec) == {"id", "prompt", "response", "word"}
    i = int(rec["word"][1:])
    assert rec["id"] == f"cmudict:{rec['word']}"
    assert rec["prompt"] == "Spell: " + " ".join(rec["word"]) + "\nARPAbet:"
    assert rec["response"] == f" P{i} Q"


def test_split_by_word_is_deterministic_and_order_independent():
    pairs = _pairs(60)
    a = split_by_word(pairs, 10, 5, 5, seed=7)
    b = split_by_word(list(reversed(pairs)), 10, 5, 5, seed=7)
    c = split_by_word(pairs, 10, 5, 5, seed=8)
    assert a == b
    assert a != c


def test_growing_train_keeps_held_out_words():
    pairs = _pairs(100)
    small = split_by_word(pairs, 10, 5, 5, seed=3)
    large = split_by_word(pairs, 80, 5, 5, seed=3)
    assert small["test"] == large["test"]
    assert small["validation"] == large["validation"]
    assert large["train"][:10] == small["train"]


def test_split_by_word_on_the_real_dictionary(unstressed):
    splits = split_by_word(unstressed, n_train=1000, n_validation=60, n_test=60, seed=0)
    words = {split: {r["word"] for r in recs} for split, recs in splits.items()}
    assert not words["train"] & words["test"]
    assert not words["train"] & words["validation"]
    assert not words["validation"] & words["test"]
    assert all(r["response"].startswith(" ") and not r["response"].startswith("  ") for r in splits["test"])


def test_split_by_word_too_few_words():
    with pytest.raises(ValueError, match=r"requested 12 words .* only 10 are available"):
        split_by_word(_pairs(10), 10, 1, 1, seed=0)


def test_split_by_word_rejects_duplicates_and_bad_counts():
    with pytest.raises(ValueError, match="word 'w001' appears more than once"):
        split_by_word(_pairs(3) + [{"word": "w001", "phones": "X"}], 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="n_validation must be an integer >= 0, got -1"):
        split_by_word(_pairs(3), 1, -1, 1, seed=0)
    with pytest.raises(ValueError, match=r"record 1 \('w001'\): 'phones'"):
        split_by_word([{"word": "w000", "phones": "A"}, {"word": "w001", "phones": " "}], 1, 0, 0, seed=0)
    with pytest.raises(ValueError, match="unknown placeholder"):
        split_by_word(_pairs(3), 1, 1, 1, seed=0, template="{wrd}")


# ---------------------------------------------------------------- read_jsonl


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return path


def test_read_jsonl_ids_and_blank_lines(tmp_path):
    path = _write(
        tmp_path,
        "mine.jsonl",
        [
            json.dumps({"prompt": "p1", "response": " r1", "extra": 1}),
            "",
            json.dumps({"id": "custom", "prompt": "p2", "response": " r2"}),
            "   ",
            json.dumps({"prompt": "p3", "response": " r3"}),
            "",
        ],
    )
    assert read_jsonl(path) == [
        {"id": "mine:1", "prompt": "p1", "response": " r1"},
        {"id": "custom", "prompt": "p2", "response": " r2"},
        {"id": "mine:5", "prompt": "p3", "response": " r3"},
    ]


def test_read_jsonl_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "é", "response": "ü"}).encode())
    assert read_jsonl(path) == [{"id": "bom:1", "prompt": "é", "response": "ü"}]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (b'{"prompt": "p", "response": ', r"line 3: invalid JSON"),
        (b'["prompt", "response"]', r"line 3: expected a JSON object, got list"),
        (b'{"prompt": "p"}', r"line 3: missing field 'response'"),
        (b'{"response": "r"}', r"line 3: missing field 'prompt'"),
        (b'{"prompt": 5, "response": "r"}', r"line 3: field 'prompt' must be a string, got int 5"),
        (b'{"prompt": "p", "response": null}', r"line 3: field 'response' must be a string, got NoneType"),
        (b'{"id": 7, "prompt": "p", "response": "r"}', r"line 3: field 'id' must be a string, got int 7"),
        (b'{"prompt": "caf\xe9", "response": "r"}', r"line 3: not valid UTF-8 \(byte 0xe9 at column 16\)"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    path = _write(tmp_path, "x.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'x.jsonl'} {message}"):
        read_jsonl(path)


def test_read_jsonl_zero_rows_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(_write(tmp_path, "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "absent.jsonl")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- split_records


def _records(n):
    return [{"id": f"r{i:03d}", "prompt": f"p{i}", "response": f" {i}"} for i in range(n)]


def test_split_records_fractions_give_remainder_to_train():
    splits = split_records(_records(95), {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 77, "validation": 9, "test": 9}
    ids = [r["id"] for recs in splits.values() for r in recs]
    assert sorted(ids) == [r["id"] for r in _records(95)]


def test_split_records_fractions_below_one_and_float_noise():
    splits = split_records(_records(100), {"train": 0.29, "validation": 0.1, "test": 0.1}, seed=0)
    # 0.29 * 100 is 28.999999999999996 in floating point; it must still mean 29 rows.
    assert {k: len(v) for k, v in splits.items()} == {"train": 29, "validation": 10, "test": 10}


def test_split_records_counts_deterministic_by_id():
    recs = _records(30)
    a = split_records(recs, {"train": 10, "validation": 5, "test": 5}, seed=1)
    b = split_records(list(reversed(recs)), {"train": 10, "validation": 5, "test": 5}, seed=1)
    c = split_records(recs, {"train": 10, "validation": 5, "test": 5}, seed=2)
    assert a == b
    assert a != c
    bigger = split_records(recs, {"train": 20, "validation": 5, "test": 5}, seed=1)
    assert bigger["test"] == a["test"]


def test_split_records_keeps_duplicate_ids():
    recs = _records(10) + [{"id": "r003", "prompt": "again", "response": " x"}]
    splits = split_records(recs, {"train": 11, "validation": 0, "test": 0}, seed=0)
    assert [r["id"] for r in splits["train"]].count("r003") == 2


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"train": 0.8, "test": 0.2}, r"exactly the keys \['train', 'validation', 'test'\]"),
        ({"train": 0.8, "validation": 0.2, "test": 0.2}, r"sum to at most 1, got 1.2"),
        ({"train": 1.5, "validation": 0.0, "test": 0.0}, r"sizes\['train'\] must be in \[0, 1\], got 1.5"),
        ({"train": 8, "validation": -1, "test": 1}, r"sizes\['validation'\] must be a number >= 0, got -1"),
        ({"train": 8, "validation": 2, "test": 1}, r"requested 11 records .* only 10 are available"),
        ({"train": 0.9, "validation": 0.05, "test": 0.05}, r"split 'validation' would be empty"),
        ({"train": 8, "validation": True, "test": 1}, r"sizes\['validation'\] must be a number"),
    ],
)
def test_split_records_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        split_records(_records(10), sizes, seed=0)


# ---------------------------------------------------------------- read_hf_dataset


def test_read_hf_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        read_hf_dataset("org/data", "train", "question", "answer")


def _fake_datasets(rows, calls):
    def load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return rows

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_read_hf_dataset_maps_fields(monkeypatch):
    calls = []
    rows = [{"question": "q0", "answer": " a0", "other": 1}, {"question": "q1", "answer": " a1"}]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, calls))
    out = read_hf_dataset("org/data", "train[:2]", "question", "answer", revision="abc123")
    assert calls == [("org/data", "train[:2]", "abc123")]
    assert out == [
        {"id": "org/data:train[:2]:0", "prompt": "q0", "response": " a0"},
        {"id": "org/data:train[:2]:1", "prompt": "q1", "response": " a1"},
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "answer": "a"}, {"question": "q"}], r"row 1: missing field 'answer'"),
        ([{"question": "q", "answer": 3}], r"row 0: field 'answer' must be a string, got int 3"),
        ([], r"no rows"),
    ],
)
def test_read_hf_dataset_bad_rows(monkeypatch, rows, message):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, []))
    with pytest.raises(DataError, match=message):
        read_hf_dataset("org/data", "train", "question", "answer")
