"""Model factories: the built-in offline model and reward-model scoring at the last non-pad token."""

from __future__ import annotations

import torch

from lightning_rlhf.models.factory import load_causal_lm, resolve_pretrained
from lightning_rlhf.models.value import load_scalar_model


def test_builtin_model_is_deterministic_and_loads_with_from_pretrained(tmp_path, monkeypatch):
    a = load_causal_lm("builtin:tiny-llama")
    monkeypatch.setenv("LIGHTNING_RLHF_CACHE", str(tmp_path))  # a second, fresh build
    b = load_causal_lm("builtin:tiny-llama")
    assert resolve_pretrained("builtin:tiny-llama").startswith(str(tmp_path))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_reward_score_is_read_at_last_non_pad_token_for_both_paddings(tokenizer):
    torch.manual_seed(0)
    rm = load_scalar_model("builtin:tiny-llama", pad_token_id=tokenizer.pad_token_id).eval()
    pad = tokenizer.pad_token_id  # == eos: a sequence ending in eos must still be read at its real last token
    seqs = [[5, 6, 7, pad], [8, 9]]  # first ends with eos (== pad id)
    T = 6
    right = torch.full((2, T), pad)
    left = torch.full((2, T), pad)
    mr = torch.zeros(2, T, dtype=torch.long)
    ml = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = torch.tensor(s)
        mr[i, : len(s)] = 1
        left[i, T - len(s) :] = torch.tensor(s)
        ml[i, T - len(s) :] = 1
    with torch.no_grad():
        sr = rm(right, mr)
        sl = rm(left, ml)
        # independent reference: each sequence alone, unpadded, read at its last position
        ref = torch.stack([rm.token_values(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1] for s in seqs])
    torch.testing.assert_close(sr, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl, ref, atol=1e-5, rtol=1e-5)


def test_reward_model_export_round_trip(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    rm = load_scalar_model("builtin:tiny-llama", pad_token_id=tokenizer.pad_token_id).eval()
    rm.save_pretrained(str(tmp_path))
    again = load_scalar_model(str(tmp_path)).eval()
    assert isinstance(again.hf_model, AutoModelForSequenceClassification._model_mapping[type(rm.config)])
    x = torch.tensor([[5, 6, 7]])
    m = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(rm(x, m), again(x, m))
