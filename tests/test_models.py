"""Model factories: the built-in offline model, and reward-model scores read where transformers reads them."""

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


def test_reward_score_is_read_where_transformers_reads_it_for_both_paddings(tokenizer):
    torch.manual_seed(0)
    rm = load_scalar_model("builtin:tiny-llama", pad_token_id=tokenizer.pad_token_id).eval()
    pad = tokenizer.pad_token_id  # == eos: a trailing eos is read like padding, as transformers does
    seqs = [[5, 6, 7, pad], [8, 9], [pad, 4, pad]]  # ends with eos; plain; eos inside and at the end
    read_at = [2, 1, 1]  # the last token that is not the pad id
    T = 6
    right = torch.full((3, T), pad)
    left = torch.full((3, T), pad)
    mr = torch.zeros(3, T, dtype=torch.long)
    ml = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, : len(s)] = torch.tensor(s)
        mr[i, : len(s)] = 1
        left[i, T - len(s) :] = torch.tensor(s)
        ml[i, T - len(s) :] = 1
    with torch.no_grad():
        sr = rm(right, mr)
        sl = rm(left, ml)
        # independent references: each sequence alone and unpadded, read at the hand-picked position; and the
        # transformers model's own sequence-classification logits on the right-padded batch
        ref = torch.stack([rm.token_values(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, k]
                           for s, k in zip(seqs, read_at)])
        hf = rm.hf_model(input_ids=right, attention_mask=mr).logits[:, 0].float()
    torch.testing.assert_close(sr, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sr, hf, atol=1e-5, rtol=1e-5)


def test_score_index_falls_back_to_the_last_real_token():
    from lightning_rlhf.rollout.scoring import score_token_index

    ids = torch.tensor([[0, 0, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert score_token_index(ids, mask, 0).tolist() == [1, 0]  # row 0 is all pad ids: its last real token
    assert score_token_index(ids, mask, None).tolist() == [1, 2]


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
