"""Checks of the embedded default dataset and offline tokenizer shipped in lightning_rlhf/assets.

These tests only read the packaged assets (never the external data bundle they were built from).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "lightning_rlhf" / "assets"
DATA = ASSETS / "data"
TOKENIZER = ASSETS / "tokenizer"

HH_DOMAINS = {
    "hh_harmless_base",
    "hh_helpful_base",
    "hh_helpful_online",
    "hh_helpful_rejection_sampled",
}
FIELDS = {
    "preferences": ("prompt", "chosen", "rejected", "domain"),
    "demonstrations": ("prompt", "response", "domain"),
    "prompts": ("prompt", "domain"),
}
SPLITS = ("train", "test")


def _load(kind: str, split: str) -> list:
    path = DATA / f"hh_{kind}_{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", sorted(FIELDS))
def test_files_load_with_expected_fields(kind: str, split: str) -> None:
    rows = _load(kind, split)
    assert len(rows) >= (1000 if split == "train" else 200)
    for row in rows:
        assert tuple(row) == FIELDS[kind]
        for key in FIELDS[kind]:
            assert isinstance(row[key], str) and row[key].strip(), (key, row)
        assert row["domain"] in HH_DOMAINS
        assert row["prompt"].startswith("\n\nHuman:")
        assert row["prompt"].endswith("\n\nAssistant:")
    assert {r["domain"] for r in rows} == HH_DOMAINS


@pytest.mark.parametrize("split", SPLITS)
def test_preferences_are_real_pairs(split: str) -> None:
    for row in _load("preferences", split):
        assert row["chosen"].strip() != row["rejected"].strip()
        # HH replies keep their leading space so prompt + reply is the original transcript.
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")


@pytest.mark.parametrize("split", SPLITS)
def test_demonstrations_and_prompts_derive_from_preferences(split: str) -> None:
    prefs = _load("preferences", split)
    pairs = {(r["prompt"], r["chosen"]) for r in prefs}
    demos = _load("demonstrations", split)
    assert {(r["prompt"], r["response"]) for r in demos} == pairs
    prompts = [r["prompt"] for r in _load("prompts", split)]
    assert len(prompts) == len(set(prompts))
    assert set(prompts) == {r["prompt"] for r in prefs}


def test_train_and_test_prompts_are_disjoint() -> None:
    for kind in FIELDS:
        train = {r["prompt"] for r in _load(kind, "train")}
        test = {r["prompt"] for r in _load(kind, "test")}
        assert not train & test, kind


def test_rows_are_not_grouped_by_domain() -> None:
    domains = [r["domain"] for r in _load("preferences", "train")]
    changes = sum(a != b for a, b in zip(domains, domains[1:]))
    assert changes > len(domains) // 4


def test_attribution_and_size() -> None:
    text = (DATA / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert "Copyright (c) 2022 Anthropic" in text
    assert "https://github.com/anthropics/hh-rlhf" in text
    assert "MIT" in text
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total < 1.5 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 0
    assert len(tokenizer) == 4096
    assert tokenizer.model_max_length == 2048
    assert not getattr(tokenizer, "chat_template", None)
    # No special tokens are added implicitly.
    assert 0 not in tokenizer("Hello there")["input_ids"]


def test_tokenizer_round_trips_text(tokenizer) -> None:
    samples = [
        "Hello  world!\n\n\tTabs, ünïcödé, 中文, emoji 🙂 and trailing space ",
        " leading space",
        "",
    ]
    for kind, split in (("preferences", "train"), ("preferences", "test")):
        for row in _load(kind, split)[:100]:
            samples += [row["prompt"], row["chosen"], row["rejected"],
                        row["prompt"] + row["chosen"]]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tokenizer_is_compact_on_hh(tokenizer) -> None:
    rows = _load("preferences", "test")[:100]
    text = "".join(r["prompt"] + r["chosen"] for r in rows)
    ids = tokenizer(text)["input_ids"]
    assert len(text) / len(ids) > 3.0  # bytes-per-token of a trained BPE, not raw bytes
