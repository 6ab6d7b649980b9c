"""Data modules: reading, validation errors naming file/row/field, truncation, domains, padding."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lightning_rlhf.data import DataValidationError, DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.data.modules import truncate_pair

GOOD = {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away.", "response": " Hello!", "domain": "d1"}


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


MODULES = [
    (PreferenceDataModule, "chosen"),
    (DemonstrationDataModule, "response"),
    (PromptDataModule, "prompt"),
]


def make(cls, path, tokenizer, **kw):
    dm = cls(train_path=path, val_fraction=0.0, max_length=64, max_prompt_length=32, batch_size=2, **kw)
    dm.set_tokenizer(tokenizer)
    return dm


@pytest.mark.parametrize("cls,field", MODULES)
def test_missing_field_names_file_row_field(tmp_path, tokenizer, cls, field):
    bad = dict(GOOD)
    del bad[field]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataValidationError) as e:
        make(cls, path, tokenizer).setup("fit")
    msg = str(e.value)
    assert path in msg and "row 2" in msg and repr(field) in msg and "missing" in msg


@pytest.mark.parametrize("cls,field", MODULES)
def test_empty_value_names_file_row_field(tmp_path, tokenizer, cls, field):
    bad = dict(GOOD, **{field: "   "})
    path = write_jsonl(tmp_path / "train.jsonl.gz", [GOOD, GOOD, bad], gz=True)
    with pytest.raises(DataValidationError) as e:
        make(cls, path, tokenizer).setup("fit")
    msg = str(e.value)
    assert path in msg and "row 3" in msg and repr(field) in msg and "empty" in msg


@pytest.mark.parametrize("cls,field", MODULES)
def test_non_string_value_names_file_row_field(tmp_path, tokenizer, cls, field):
    bad = dict(GOOD, **{field: 42})
    path = write_jsonl(tmp_path / "train.jsonl", [bad, GOOD])
    with pytest.raises(DataValidationError) as e:
        make(cls, path, tokenizer).setup("fit")
    msg = str(e.value)
    assert path in msg and "row 1" in msg and repr(field) in msg and "expected a string" in msg


def test_prompt_longer_than_limit_is_an_invalid_row(tmp_path, tokenizer):
    long = dict(GOOD, prompt="word " * 200)
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, long])
    with pytest.raises(DataValidationError, match=r"row 2, field 'prompt': prompt has \d+ tokens"):
        make(PreferenceDataModule, path, tokenizer).setup("fit")
    dm = make(PreferenceDataModule, path, tokenizer, skip_invalid_rows=True)
    dm.setup("fit")
    assert dm.num_skipped == 1 and len(dm.train_dataset) == 1


def test_skip_invalid_rows_counts(tmp_path, tokenizer):
    rows = [GOOD, dict(GOOD, chosen=""), {k: v for k, v in GOOD.items() if k != "rejected"}, dict(GOOD, rejected=[1])]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(PreferenceDataModule, path, tokenizer, skip_invalid_rows=True)
    dm.setup("fit")
    assert dm.num_skipped == 3 and len(dm.train_dataset) == 1


def test_malformed_json_line_is_reported(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataValidationError, match="row 2 \\(line 2\\) is not valid JSON"):
        make(PreferenceDataModule, str(path), tokenizer).setup("fit")


def test_missing_file_is_reported(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make(PreferenceDataModule, str(tmp_path / "nope.jsonl"), tokenizer).setup("fit")


def test_truncation_keeps_the_response():
    prompt, response = list(range(100)), list(range(1000, 1010))
    p, r = truncate_pair(prompt, response, 50)
    assert r == response and len(p) + len(r) == 50 and p == prompt[-40:]
    # a response longer than the budget: the prompt keeps half, the response is cut from the right
    p, r = truncate_pair(prompt, list(range(1000, 1100)), 50)
    assert p == prompt[-25:] and r == list(range(1000, 1025))
    assert truncate_pair([1, 2], [3], 10) == ([1, 2], [3])


def test_preference_batches_masks_domains_and_padding_sides(tmp_path, tokenizer):
    rows = [dict(GOOD, domain="a"), dict(GOOD, chosen=" A much longer helpful answer here.", domain="b")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    batches = {}
    for side in ("right", "left"):
        dm = make(PreferenceDataModule, path, tokenizer, padding_side=side)
        dm.setup("fit")
        assert dm.domain_names == ["a", "b"]
        batches[side] = dm.collate([dm.train_dataset[0], dm.train_dataset[1]])
    for side, b in batches.items():
        assert b.input_ids.shape[0] == 4 and b.domain_ids.tolist() == [0, 1]
        # every row: response tokens (loss mask) end with eos and sit inside the attention mask
        for i in range(4):
            ids = b.input_ids[i][b.attention_mask[i].bool()]
            resp = b.input_ids[i][b.loss_mask[i].bool()]
            assert resp[-1].item() == tokenizer.eos_token_id
            assert torch.equal(ids[-len(resp):], resp)
    # the same tokens whichever side is padded
    r, l = batches["right"], batches["left"]
    for i in range(4):
        assert torch.equal(r.input_ids[i][r.attention_mask[i].bool()], l.input_ids[i][l.attention_mask[i].bool()])


def test_prompt_batches_are_left_padded_with_stable_ids(tmp_path, tokenizer):
    rows = [dict(GOOD), dict(GOOD, prompt="\n\nHuman: A longer question about many things?\n\nAssistant:")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(PromptDataModule, path, tokenizer)
    dm.setup("fit")
    batch = dm.collate([dm.train_dataset[0], dm.train_dataset[1]])
    assert batch.attention_mask[:, -1].tolist() == [1, 1]  # left padded: last column is real
    assert batch.attention_mask[0, 0].item() == 0
    from lightning_rlhf.data.sources import prompt_id

    assert batch.prompt_ids == [prompt_id(rows[0]["prompt"]), prompt_id(rows[1]["prompt"])]


def test_csv_parquet_and_column_names(tmp_path, tokenizer):
    import datasets

    rows = [{"q": GOOD["prompt"], "good": " yes", "bad": " no", "topic": "t"}] * 3
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "p.csv"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for name in ("p.csv", "p.parquet"):
        dm = make(
            PreferenceDataModule, str(tmp_path / name), tokenizer, prompt_column="q", chosen_column="good",
            rejected_column="bad", domain_column="topic",
        )
        dm.setup("fit")
        assert len(dm.train_dataset) == 3 and dm.domain_names == ["t"]


def test_validation_split_by_prompt_hash(tmp_path, tokenizer):
    rows = [dict(GOOD, prompt=f"\n\nHuman: question {i}\n\nAssistant:") for i in range(200)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = PreferenceDataModule(train_path=path, val_fraction=0.2, max_length=64, max_prompt_length=32)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    train_prompts, val_prompts = set(dm.train_dataset["prompt"]), set(dm.val_dataset["prompt"])
    assert not train_prompts & val_prompts and 15 < len(val_prompts) < 70


def test_chat_template_is_applied_when_present(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    path = write_jsonl(tmp_path / "train.jsonl", [dict(GOOD, prompt="Hi")])
    dm = make(DemonstrationDataModule, path, tok)
    dm.setup("fit")
    row = dm.train_dataset[0]
    prompt_text = tok.decode(row["input_ids"][: row["seq_prompt_len"]])
    assert prompt_text == "<|user|>Hi<|assistant|>"
    dm2 = make(DemonstrationDataModule, path, tok, apply_chat_template=False)
    dm2.setup("fit")
    assert tok.decode(dm2.train_dataset[0]["input_ids"][: dm2.train_dataset[0]["seq_prompt_len"]]) == "Hi"


def test_builtin_dataset_has_domains_and_test_split(tokenizer):
    dm = PreferenceDataModule(max_length=512, max_prompt_length=448)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2000 and len(dm.val_dataset) == 400
    assert all(d.startswith("hh_") for d in dm.domain_names) and len(dm.domain_names) == 4


def test_row_limit_applies_to_valid_rows(tmp_path, tokenizer):
    rows = [dict(GOOD, prompt=f"\n\nHuman: q{i}\n\nAssistant:") for i in range(20)]
    rows += [dict(GOOD, prompt="word " * 200) for _ in range(20)]  # too long: skipped
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(PreferenceDataModule, path, tokenizer, skip_invalid_rows=True, max_train_rows=15)
    dm.setup("fit")
    assert len(dm.train_dataset) == 15 and dm.num_skipped == 20
