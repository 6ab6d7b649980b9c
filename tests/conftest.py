"""Shared test fixtures. Tests never read ../shared: they use the embedded assets and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "lightning_rlhf" / "assets" / "tokenizer"


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Materialise built-in models in a per-session cache, never in the user's home."""
    path = os.environ.get("LIGHTNING_RLHF_TEST_CACHE") or str(tmp_path_factory.mktemp("lrcache"))
    os.environ["LIGHTNING_RLHF_CACHE"] = path
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return Path(path)


@pytest.fixture()
def single_thread():
    """One intra-op thread for generation-heavy tests: on a busy 2-core machine, 2 spinning OpenMP threads made
    them ~15x slower. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_rlhf.models.factory import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run a test from an empty temporary directory (CLI runs write runs/ there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny random Llama (vocabulary 64; pad 0, bos 1, eos 2) in train mode, for the generation tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model
