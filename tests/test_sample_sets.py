"""Sample-set files and SampleSetDataModule: the file format (jsonl / parquet), errors naming file, line and field
(equal ``k``, optional scores), and batches whose rows ``b*k+j`` are prompt ``b`` + its response ``j``, tokenised
independently here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_rlhf.data import SampleSetBatch, SampleSetDataModule
from lightning_rlhf.data.sources import prompt_id
from lightning_rlhf.sample_sets import SampleSetFileError, read_sample_sets, sample_set_record, write_sample_set_file

PROMPTS = ["\n\nHuman: hi there\n\nAssistant:", "\n\nHuman: why is the sky blue?\n\nAssistant:",
           "\n\nHuman: tell me a joke\n\nAssistant:", "\n\nHuman: and then?\n\nAssistant:"]


def _records(k: int = 3, scores: bool = True) -> list[dict]:
    out = []
    for i, p in enumerate(PROMPTS):
        responses = [f" answer {i}.{j}" + " more" * j for j in range(k)]
        out.append(sample_set_record(prompt_id(p), p, responses, [float(i * 10 + j) for j in range(k)] if scores
                                     else None, domain="a" if i % 2 else "b"))
    return out


def _module(path, tokenizer, **kw) -> SampleSetDataModule:
    kwargs = dict(train_path=str(path), val_fraction=0.0, max_length=64, max_prompt_length=32, batch_size=2,
                  apply_chat_template=False)
    kwargs.update(kw)
    dm = SampleSetDataModule(**kwargs)
    dm.set_tokenizer(tokenizer)
    return dm


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_rows_of_one_prompt_are_adjacent_and_tokenised_like_pairs(tmp_path, tokenizer, suffix):
    records = _records(k=3)
    path = write_sample_set_file(tmp_path / f"s.{suffix}", records)
    dm = _module(path, tokenizer)
    dm.setup("fit")
    assert dm.num_samples == 3 and dm.domain_names == ["a", "b"]
    by_id = {r["prompt_id"]: r for r in records}
    seen = set()
    for batch in dm.train_dataloader():
        assert isinstance(batch, SampleSetBatch) and batch.num_samples == 3 and batch.num_prompts == 2
        assert batch.input_ids.shape[0] == 6
        for b, pid in enumerate(batch.prompt_ids):
            rec = by_id[pid]
            seen.add(pid)
            assert dm.domain_names[int(batch.domain_ids[b])] == rec["domain"]
            p = tokenizer(rec["prompt"])["input_ids"]
            for j in range(3):
                row = b * 3 + j
                r = tokenizer(rec["responses"][j], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                n = int(batch.attention_mask[row].sum())
                assert batch.input_ids[row, :n].tolist() == p + r  # right padding, no truncation needed
                assert batch.loss_mask[row, :n].tolist() == [0] * len(p) + [1] * len(r)
                assert float(batch.scores[row]) == rec["scores"][j]
            # rows of one prompt share its prompt tokens and differ in their responses
            rows = [batch.input_ids[b * 3 + j, : int(batch.attention_mask[b * 3 + j].sum())].tolist() for j in range(3)]
            assert len({tuple(x) for x in rows}) == 3 and all(x[: len(p)] == p for x in rows)
    assert seen == set(by_id)  # batch_size 2 of 4 prompts: one epoch = every prompt once


def test_without_scores_and_micro_batch_slice(tmp_path, tokenizer):
    path = write_sample_set_file(tmp_path / "s.jsonl", _records(k=2, scores=False))
    dm = _module(path, tokenizer, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.scores is None and batch.num_samples == 2 and batch.input_ids.shape[0] == 8
    part = batch.slice(1, 3)
    assert part.prompt_ids == batch.prompt_ids[1:3]
    torch.testing.assert_close(part.input_ids, batch.input_ids[2:6, : part.input_ids.shape[1]])


def test_truncation_is_that_of_preference_pairs(tmp_path, tokenizer):
    from lightning_rlhf.data.modules import truncate_pair

    rec = sample_set_record("x", PROMPTS[1], [" word" * 40, " short"], None)
    path = write_sample_set_file(tmp_path / "s.jsonl", [rec])
    dm = _module(path, tokenizer, batch_size=1, max_length=24, max_prompt_length=20)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    p = tokenizer(PROMPTS[1])["input_ids"]
    for j, text in enumerate(rec["responses"]):
        r = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pp, rr = truncate_pair(p, r, 24)
        n = int(batch.attention_mask[j].sum())
        assert batch.input_ids[j, :n].tolist() == pp + rr and n <= 24


def test_file_round_trip_jsonl_and_parquet(tmp_path):
    records = _records(k=2)
    a = write_sample_set_file(tmp_path / "a.jsonl", reversed(records))
    b = write_sample_set_file(tmp_path / "b.parquet", records)
    lines = [json.loads(x) for x in a.read_text().splitlines()]
    assert [r["prompt_id"] for r in lines] == sorted(r["prompt_id"] for r in records)  # sorted by prompt id
    assert list(lines[0]) == ["prompt_id", "prompt", "responses", "scores", "domain"]
    rows_a, _ = read_sample_sets(a)
    rows_b, _ = read_sample_sets(b)
    assert [r.record for r in rows_a] == [r.record for r in rows_b] == sorted(records, key=lambda r: r["prompt_id"])
    assert rows_b[2].where == f"{b}: row 3" and rows_a[2].where == f"{a}, line 3"


GOOD = {"prompt_id": "p1", "prompt": "hello", "responses": ["a", "b"], "scores": [1.0, 2.0], "domain": "d"}


@pytest.mark.parametrize(
    "bad, field, message",
    [
        ({"prompt_id": ""}, "prompt_id", "missing, empty"),
        ({"prompt": None}, "prompt", "missing, empty"),
        ({"responses": "a"}, "responses", "non-empty list"),
        ({"responses": []}, "responses", "non-empty list"),
        ({"responses": ["a", 3]}, "responses", "response 1 .* not a string"),
        ({"responses": ["a", "b", "c"], "scores": [1.0, 2.0, 3.0]}, "responses", "3 responses, but .*line 1 has 2"),
        ({"scores": [1.0]}, "scores", "expected 2 numbers"),
        ({"scores": [1.0, "x"]}, "scores", "score 1 .* not a finite"),
        ({"scores": None}, "scores", "line 1 has scores but .*line 3 has none"),
        ({"domain": 3}, "domain", "string domain"),
        ({"prompt_id": "p0"}, "prompt_id", "already at .*line 1"),
    ],
)
def test_malformed_record_names_file_line_and_field(tmp_path, tokenizer, bad, field, message):
    path = tmp_path / "bad.jsonl"
    first = dict(GOOD, prompt_id="p0")
    path.write_text(json.dumps(first) + "\n\n" + json.dumps({**GOOD, **bad}) + "\n")  # the bad record: line 3
    with pytest.raises(SampleSetFileError, match=message) as err:
        read_sample_sets(path)
    assert f"{path}, line 3, field {field!r}" in str(err.value)
    with pytest.raises(SampleSetFileError, match="line 3"):  # the data module reads with the same checks
        _module(path, tokenizer).setup("fit")
    rows, skipped = read_sample_sets(path, skip_invalid_rows=True)
    assert [r.record["prompt_id"] for r in rows] == ["p0"] and len(skipped) == 1


def test_invalid_json_and_missing_file_and_builtin_are_refused(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(SampleSetFileError, match=f"{path}, line 2: invalid JSON"):
        read_sample_sets(path)
    with pytest.raises(FileNotFoundError, match="policy_samples"):
        read_sample_sets(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="data.train_path.*no built-in sample set"):
        SampleSetDataModule(train_path="builtin:hh-rlhf")


def test_val_files_must_have_the_training_k(tmp_path, tokenizer):
    train = write_sample_set_file(tmp_path / "t.jsonl", _records(k=3))
    val = write_sample_set_file(tmp_path / "v.jsonl", _records(k=2))
    with pytest.raises(Exception, match="2 responses per prompt, but the training files have 3"):
        _module(train, tokenizer, val_path=str(val)).setup("fit")
