"""Stage `prepare`: raw data -> data/prepared/{train,validation,test}.jsonl.

    python -m pipeline.prepare --out data/prepared

Sources (params `data.source`): the CMU Pronouncing Dictionary (default G2P task, split by
word), a user JSONL file of prompt/response pairs, or a Hugging Face dataset. The three
splits are validated together by the `PreparedData` pandera schema (non-empty prompt and
response, unique ids, no word/prompt in two splits) before anything is written; on any
failure the stage exits with pandera's message (column, check, failing rows) and the
previous data/prepared is left untouched.
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from pipeline import g2p
from pipeline.errors import DataError
from pipeline.files import atomic_folder
from pipeline.schemas import validate_prepared
from pipeline.splits import split_file
from pipeline.stage import start


def build_splits(params) -> dict[str, list[dict]]:
    data = params.data
    sizes = {"train": data.n_train, "validation": data.n_validation, "test": data.n_test}
    if data.source == "cmudict":
        pairs = g2p.load_cmudict_pairs(keep_stress=data.keep_stress)
        return g2p.split_by_word(pairs, data.n_train, data.n_validation, data.n_test, params.seed, data.template)
    if data.source == "jsonl":
        records = g2p.read_jsonl(data.path)
    else:
        records = g2p.read_hf_dataset(data.hf_name, data.hf_split, data.prompt_field, data.response_field)
    return g2p.split_records(records, sizes, params.seed)


def to_frame(splits: dict[str, list[dict]]) -> pd.DataFrame:
    rows = [{**rec, "split": split} for split, records in splits.items() for rec in records]
    frame = pd.DataFrame(rows)
    columns = ["id", "prompt", "response", "split"] + (["word"] if "word" in frame.columns else [])
    return frame[columns]


def write(frame: pd.DataFrame, out: str) -> None:
    with atomic_folder(out) as tmp:
        for split in g2p.SPLITS:
            part = frame[frame["split"] == split].drop(columns=["split"])
            lines = [json.dumps(row, ensure_ascii=False) for row in part.to_dict(orient="records")]
            split_file(tmp, split).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args, params = start("prepare", __doc__, argv, outputs={"--out": "the prepared data folder"})
    if params is None:
        return 1
    try:
        frame = validate_prepared(to_frame(build_splits(params)))
    except (DataError, ValueError, ImportError) as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 1
    write(frame, args.out)
    counts = frame["split"].value_counts().to_dict()
    print(f"prepare: wrote {args.out}: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in g2p.SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
