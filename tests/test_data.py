"""Prompt data: validation errors with file/row/field, chat formatting, and the resumable sampler."""

import json

import pytest

from drpo_trainer.io.data import DataError, PromptSampler, SamplerState, load_problems


class FakeTokenizer:
    """Whitespace tokenizer with a recognisable chat template (the real one is tested elsewhere)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_text_and_chat_prompts_are_formatted_and_long_ones_dropped(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "what is 1+1", "answer": "2"},
            {"prompt": [{"role": "user", "content": "say 3"}], "answer": 3},
            {"prompt": "a " * 50, "answer": "x"},
        ],
    )
    probs, stats = load_problems([path], FakeTokenizer(), system_prompt="be brief", max_prompt_tokens=20)
    assert stats.rows == 3 and stats.dropped_too_long == 1
    assert [p.answer for p in probs] == ["2", "3"]  # numeric answers become strings
    assert probs[0].prompt_text == "<system> be brief <user> what is 1+1 <assistant>"
    assert probs[1].prompt_text == "<system> be brief <user> say 3 <assistant>"
    assert probs[0].prompt_ids == [len(w) for w in probs[0].prompt_text.split()]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"answer": "1"}, "row 2: missing field 'prompt'"),
        ({"prompt": "q"}, "row 2: missing field 'answer'"),
        ({"prompt": 5, "answer": "1"}, "row 2: field 'prompt' must be text or a list of chat messages"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "row 2: field 'prompt' message 0"),
        ({"prompt": "q", "answer": ""}, "row 2: field 'answer' must be a non-empty string"),
    ],
)
def test_malformed_rows_name_file_row_and_field(tmp_path, row, expected):
    path = _write(tmp_path, [{"prompt": "fine", "answer": "1"}, row])
    with pytest.raises(DataError) as e:
        load_problems([path], FakeTokenizer())
    assert path in str(e.value) and expected in str(e.value)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_problems([str(tmp_path / "nope.jsonl")], FakeTokenizer())
    bad = tmp_path / "d.csv"
    bad.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems([str(bad)], FakeTokenizer())


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n',
            "line 2: not valid JSON (Expecting ',' delimiter",
        ),
        ('{"prompt": "a", "answer": "1"}\n\n[1, 2]\n', "line 3: a JSON list, not an object with fields"),
        ("", "the file is empty (no rows)"),
        ("\n  \n", "the file is empty (no rows)"),
    ],
)
def test_broken_jsonl_names_the_line(tmp_path, text, expected):
    p = tmp_path / "broken.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        load_problems([str(p)], FakeTokenizer())
    assert str(p) in str(e.value) and expected in str(e.value)


def test_parquet_files_load(tmp_path):
    import datasets

    p = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}]).to_parquet(str(p))
    probs, _ = load_problems([str(p)], FakeTokenizer(), apply_chat_template=False)
    assert [(x.prompt_text, x.answer) for x in probs] == [("q1", "1"), ("q2", "2")]


def test_sampler_covers_each_epoch_once_and_resumes_exactly():
    s = PromptSampler(num_problems=10, prompts_per_step=4, seed=3)
    draws = [s.next_indices() for _ in range(5)]
    # epoch 0 = steps 1-2 (8 prompts, 2 left over are skipped), epoch 1 = steps 3-4, epoch 2 starts at step 5
    assert len(set(draws[0] + draws[1])) == 8 and len(set(draws[2] + draws[3])) == 8
    assert draws[0] + draws[1] != draws[2] + draws[3]  # a new permutation per epoch
    assert s.state == SamplerState(epoch=2, index=4)
    # resume from the state after step 3: steps 4-5 are identical
    r = PromptSampler(num_problems=10, prompts_per_step=4, seed=3, state=SamplerState(epoch=1, index=4))
    assert [r.next_indices(), r.next_indices()] == draws[3:5]
    assert PromptSampler(10, 4, seed=4).next_indices() != draws[0]


def test_rank_slices_partition_the_draw():
    draw = list(range(12))
    parts = [PromptSampler.rank_slice(draw, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_too_few_prompts_is_a_clear_error():
    with pytest.raises(DataError, match="prompts_per_step=8 exceeds the 5"):
        PromptSampler(num_problems=5, prompts_per_step=8)


def test_loading_data_leaves_the_process_environment_alone(tmp_path, monkeypatch):
    """Reading a local file must not switch the whole process offline for datasets (or anything else)."""
    import os

    from drpo_trainer.io.data import _load_rows

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n')
    before = dict(os.environ)
    assert _load_rows(str(path)) == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]
    assert dict(os.environ) == before
