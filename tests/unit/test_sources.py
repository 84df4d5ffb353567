"""Dataset sources beyond JSONL: Parquet, `save_to_disk` folders, `hf:` names and the training-set presets.

Nothing here touches the network: every dataset is a tiny local fixture with the real set's schema, and the one
test of the hub path replaces `datasets.load_dataset` to check which name, config and split would be asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nemo_igrpo.config import DataConfig
from nemo_igrpo.data.dataset import DatasetError, Example
from nemo_igrpo.data.presets import PRESETS, RowError, dapo_row, math_row, problem_answer_row, strip_dapo_instructions
from nemo_igrpo.data.sources import load_examples, load_preset, parse_hf_source

datasets = pytest.importorskip("datasets")  # the optional dependency behind every source in this file
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path: Path, splits: dict[str, list[dict]] | list[dict]) -> Path:
    """A `save_to_disk` folder: of a DatasetDict when given splits, else of a single Dataset."""
    if isinstance(splits, dict):
        splits = {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
        datasets.DatasetDict(splits).save_to_disk(path)
    else:
        datasets.Dataset.from_list(splits).save_to_disk(path)
    return path


# ---------------------------------------------------------------------------------------------- generic sources


def test_parquet_with_field_mapping(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [
        {"question": "1 + 1?", "final": 2, "worked": "1 + 1 = \\boxed{2}", "id": "a", "noise": [1.0]},
        {"question": "2 + 2?", "final": 4, "worked": None, "id": "b", "noise": [2.0]},
    ])
    config = DataConfig(problem_key="question", answer_key="final", solution_key="worked")
    assert load_examples(str(path), config, "train") == [
        Example(problem="1 + 1?", answer="2", solution="1 + 1 = \\boxed{2}", id="a"),  # numeric answers become text
        Example(problem="2 + 2?", answer="4", solution=None, id="b"),
    ]


def test_parquet_errors_name_the_file_and_row(tmp_path):
    rows = [{"problem": "p0", "answer": "0"}, {"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": None}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DatasetError, match=re.escape(f"{path}[2]: missing key 'answer'")):
        load_examples(str(path), DataConfig(), "train")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: no column 'question' (columns: problem, answer)")):
        load_examples(str(path), DataConfig(problem_key="question"), "train")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    with pytest.raises(DatasetError, match=re.escape(f"{empty}: the dataset contains no examples")):
        load_examples(str(empty), DataConfig(), "train")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_examples(str(broken), DataConfig(), "train")


def test_save_to_disk_folder_uses_the_configured_split(tmp_path):
    folder = save_dataset(tmp_path / "ds", {
        "train": [{"q": "train problem", "a": "1"}],
        "test": [{"q": "test problem", "a": "2"}],
        "validation": [{"q": "validation problem", "a": "3"}],
    })
    config = DataConfig(problem_key="q", answer_key="a")
    assert [e.problem for e in load_examples(str(folder), config, "train")] == ["train problem"]
    assert [e.problem for e in load_examples(str(folder), config, "eval")] == ["test problem"]  # data.eval_split
    config.eval_split = "validation"
    assert [e.problem for e in load_examples(str(folder), config, "eval")] == ["validation problem"]
    assert [e.problem for e in load_examples(f"hf:{folder}@train", config, "eval")] == ["train problem"]
    with pytest.raises(DatasetError, match=r"no split 'dev' \(splits: train, test, validation\)"):
        load_examples(f"hf:{folder}@dev", config, "eval")


def test_save_to_disk_single_dataset_and_row_errors(tmp_path):
    folder = save_dataset(tmp_path / "single", [{"problem": "p", "answer": "1"}, {"problem": None, "answer": "2"}])
    with pytest.raises(DatasetError, match=re.escape(f"{folder}[1]: missing key 'problem'")):
        load_examples(str(folder), DataConfig(), "train")
    ok = save_dataset(tmp_path / "ok", [{"problem": "p", "answer": 3.5}])
    assert load_examples(str(ok), DataConfig(), "eval") == [Example(problem="p", answer="3.5")]


def test_hub_names_are_loaded_lazily_with_the_right_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list([{"problem": "p", "answer": "1", "unused": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = DataConfig(train_split="train_sft")
    load_examples("hf:org/set", config, "train")
    load_examples("hf:org/set", config, "eval")
    load_examples("hf:org/set@dev", config, "eval")
    assert calls == [("org/set", None, "train_sft"), ("org/set", None, "test"), ("org/set", None, "dev")]
    assert parse_hf_source("hf:/data/a@b/set@test") == ("/data/a@b/set", "test")
    assert parse_hf_source("hf:org/set") == ("org/set", None)


def test_unsupported_source_says_what_is_accepted():
    with pytest.raises(DatasetError, match=r"data\.train: unsupported source 'problems\.csv' \(expected .*preset:NAME"):
        load_examples("problems.csv", DataConfig(), "train")


# ---------------------------------------------------------------------------------------------- presets

DAPO_WRAPPED = ("Solve the following math problem step by step. The last line of your response should be of the form "
                "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
                'Remember to put your answer on its own line after "Answer:".')


def dapo_record(problem: str, answer: str, index: int) -> dict:
    """A row with DAPO-Math-17k's schema (data/dapo-math-17k.parquet)."""
    return {"data_source": "math_dapo", "prompt": [{"content": DAPO_WRAPPED.format(problem), "role": "user"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"id-{index}"}}


def test_dapo_rows_are_unwrapped_and_deduplicated(tmp_path):
    problems = [("Find $x$ if $2x = 6$.", "3"), ("How many primes are below 10?", "4")]
    rows = [dapo_record(p, a, i) for i, (p, a) in enumerate(problems * 3)]  # the upstream file repeats problems
    path = write_parquet(tmp_path / "dapo-math-17k.parquet", rows)
    assert load_preset("dapo_math_17k", path) == [Example(problem=p, answer=a) for p, a in problems]
    assert strip_dapo_instructions("already bare") == "already bare"


def test_dapo_row_errors_name_the_row(tmp_path):
    rows = [dapo_record("p", "1", 0), {**dapo_record("q", "2", 1), "reward_model": None}]
    path = write_parquet(tmp_path / "dapo.parquet", rows)
    with pytest.raises(DatasetError, match=re.escape(f"{path}[1]: missing field 'reward_model.ground_truth'")):
        load_preset("dapo_math_17k", path)
    with pytest.raises(RowError, match="has no user message"):
        dapo_row({"prompt": [{"role": "system", "content": "x"}], "reward_model": {"ground_truth": "1"}})


def test_math_train_answer_is_the_last_boxed_of_the_solution(tmp_path):
    rows = [
        {"problem": "Halve 1.", "level": "Level 1", "type": "Algebra",
         "solution": "First $\\boxed{2}$ is wrong; the answer is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "No box.", "level": "Level 2", "type": "Geometry", "solution": "The answer is 5."},
    ]
    folder = save_dataset(tmp_path / "math", {"train": rows, "test": rows[:1]})
    examples = load_preset("math_train", folder)
    assert examples == [Example(problem="Halve 1.", answer="\\frac{1}{2}", solution=rows[0]["solution"])]
    assert math_row(rows[1]) is None  # no verifiable gold answer: skipped, not an error


def test_acereason_and_openr1_rows(tmp_path):
    rows = [{"problem": "A?", "answer": "7"}, {"problem": "B?", "answer": " "}]  # a blank answer is skipped
    acereason = save_dataset(tmp_path / "acereason", rows)
    assert load_preset("acereason_math", acereason) == [Example(problem="A?", answer="7")]
    openr1 = write_parquet(tmp_path / "openr1.parquet", [{
        "problem": "C?", "solution": "worked", "answer": "\\sqrt{2}", "problem_type": "Algebra",
        "question_type": "math-word-problem", "source": "olympiads", "uuid": "u", "is_reasoning_complete": [True],
        "generations": ["<think>long</think>"], "correctness_math_verify": [True], "correctness_count": 1,
        "messages": [{"content": "C?", "role": "user"}]}])
    assert load_preset("openr1_math", openr1) == [Example(problem="C?", answer="\\sqrt{2}")]
    with pytest.raises(DatasetError, match=r"no column 'answer'"):
        load_preset("openr1_math", write_parquet(tmp_path / "bad.parquet", [{"problem": "C?"}]))
    with pytest.raises(RowError, match="missing field 'answer'"):
        problem_answer_row({"problem": "C?", "answer": None})


def test_preset_source_asks_the_hub_for_the_preset_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config_name=None, split=None):
        calls.append((name, config_name, split))
        return datasets.Dataset.from_list([dapo_record("p", "1", 0), dapo_record("p", "1", 1)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_examples("preset:dapo_math_17k", DataConfig(), "train") == [Example(problem="p", answer="1")]
    assert calls == [("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")]
    assert {name: (p.hub_name, p.config_name, p.split) for name, p in PRESETS.items()} == {
        "math_train": ("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
        "acereason_math": ("nvidia/AceReason-Math", None, "train"),
        "dapo_math_17k": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train"),
        "openr1_math": ("open-r1/OpenR1-Math-220k", "default", "train"),
    }
    with pytest.raises(DatasetError, match="unknown dataset preset 'gsm8k'; known: math_train"):
        load_examples("preset:gsm8k", DataConfig(), "train")
