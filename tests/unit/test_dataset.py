"""JSONL loading errors name the file and line; the sampler is deterministic and resumes exactly."""

import json

import pytest

from nemo_igrpo.data.dataset import DatasetError, Example, PromptSampler, load_jsonl


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_jsonl_reads_rows_and_stringifies_numeric_answers(tmp_path):
    path = _write(
        tmp_path / "data.jsonl",
        [
            json.dumps({"question": "1+1?", "final": 2, "sol": "1+1=2", "id": 7}),
            "",
            json.dumps({"question": "half?", "final": 0.5}),
        ],
    )
    examples = load_jsonl(path, problem_key="question", answer_key="final", solution_key="sol")
    assert examples == [Example("1+1?", "2", "1+1=2", "7"), Example("half?", "0.5", None, None)]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"problem": "p", "answer": "1"}), "{not json"])
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: malformed JSON"):
        load_jsonl(path)


def test_missing_key_names_file_line_and_key(tmp_path):
    rows = [json.dumps({"problem": "p", "answer": "1"})] * 2 + [json.dumps({"problem": "p"})]
    path = _write(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DatasetError) as error:
        load_jsonl(path)
    assert str(error.value) == f"{path}:3: missing key 'answer'"
    assert isinstance(error.value, ValueError)


def test_non_object_row_is_an_error(tmp_path):
    path = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DatasetError, match=r"list\.jsonl:1: expected a JSON object"):
        load_jsonl(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: the file contains no examples"):
        load_jsonl(path)


def _examples(n):
    return [Example(f"p{i}", str(i)) for i in range(n)]


def test_sampler_visits_each_example_once_per_epoch_and_reshuffles():
    sampler = PromptSampler(_examples(10), seed=5)
    first, second = sampler.next_batch(10), sampler.next_batch(10)
    assert sorted(e.problem for e in first) == sorted(e.problem for e in second) == sorted(f"p{i}" for i in range(10))
    assert first != second
    assert sampler.state_dict() == {"epoch": 1, "position": 10}


def test_sampler_is_deterministic_and_wraps_across_epochs():
    a, b = PromptSampler(_examples(7), seed=1), PromptSampler(_examples(7), seed=1)
    assert [a.next_batch(3) for _ in range(6)] == [b.next_batch(3) for _ in range(6)]
    # One batch larger than the dataset equals the same examples drawn epoch by epoch.
    big = PromptSampler(_examples(7), seed=1).next_batch(17)
    stepwise = PromptSampler(_examples(7), seed=1)
    assert big == stepwise.next_batch(7) + stepwise.next_batch(7) + stepwise.next_batch(3)
    assert stepwise.state_dict() == {"epoch": 2, "position": 3}
    assert PromptSampler(_examples(7), seed=1).next_batch(7) != PromptSampler(_examples(7), seed=2).next_batch(7)


def test_sampler_resume_continues_with_the_same_examples():
    original = PromptSampler(_examples(9), seed=42)
    original.next_batch(4)
    original.next_batch(4)
    state = original.state_dict()
    assert state == {"epoch": 0, "position": 8}
    expected = [original.next_batch(4) for _ in range(5)]

    resumed = PromptSampler(_examples(9), seed=42)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_batch(4) for _ in range(5)] == expected
    assert resumed.state_dict() == original.state_dict()


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError):
        PromptSampler([])
    with pytest.raises(ValueError):
        PromptSampler(_examples(3)).load_state_dict({"epoch": 0, "position": 4})
