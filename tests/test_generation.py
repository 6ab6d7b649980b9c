"""Rollout generation on a tiny random Llama: left padding, EOS truncation, seeding, train/eval mode."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.rollout.generation import GenerationOutput, Generator, HFGenerator, response_lengths, truncate_at_eos

PAD, BOS, EOS = 0, 1, 2  # the special ids of conftest's tiny_llama fixture


pytestmark = pytest.mark.usefixtures("single_thread")


def _left_pad(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_truncate_at_eos_hand_example():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 7, 3]])
    ids, mask, stopped = truncate_at_eos(responses, eos_token_id=[2, 3], pad_token_id=0)
    torch.testing.assert_close(ids, torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 3]]))
    torch.testing.assert_close(mask, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]))
    assert stopped.tolist() == [True, False, True, True]
    torch.testing.assert_close(response_lengths(mask), torch.tensor([2, 4, 1, 4]))


def test_left_padding_gives_same_greedy_continuation(tiny_llama):
    gen = HFGenerator(max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert isinstance(gen, Generator)
    prompt = [BOS, 11, 12, 13]
    alone = gen.generate(tiny_llama, *_left_pad([prompt], 4))
    batched = gen.generate(tiny_llama, *_left_pad([prompt, [BOS, 20, 21, 22, 23, 24, 25]], 7))
    padded_more = gen.generate(tiny_llama, *_left_pad([[BOS, 30], prompt], 10))
    cont = alone.sequences[0, 4:]
    n = int(alone.action_mask[0].sum())
    assert torch.equal(batched.sequences[0, 7 : 7 + n], cont[:n])
    assert torch.equal(padded_more.sequences[1, 10 : 10 + n], cont[:n])
    assert batched.prompt_length == 7 and padded_more.prompt_length == 10
    # full attention mask = prompt mask ++ action mask
    assert torch.equal(batched.attention_mask[:, 7:], batched.action_mask)
    assert batched.attention_mask[0, :3].sum() == 0


def test_right_padding_is_rejected(tiny_llama):
    gen = HFGenerator(max_new_tokens=2, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    ids = torch.tensor([[BOS, 5, PAD]])
    with pytest.raises(ValueError, match="LEFT"):
        gen.generate(tiny_llama, ids, (ids != PAD).long())


def test_everything_after_eos_is_masked_and_padded(tiny_llama):
    prompts = _left_pad([[BOS, 3, 4], [BOS, 5, 6, 7], [BOS, 8]], 4)
    greedy = HFGenerator(max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    free = greedy.generate(tiny_llama, *prompts)
    # declare the 3rd greedy token of row 0 to be "EOS": row 0 must stop there, the rest masked
    eos = int(free.sequences[0, 4 + 2])
    gen = HFGenerator(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    out: GenerationOutput = gen.generate(tiny_llama, *prompts)
    responses = out.sequences[:, out.prompt_length :]
    first = int((free.sequences[0, 4:] == eos).nonzero()[0])  # may be <= 2 if the token occurs earlier
    assert out.stopped_by_eos[0]
    assert out.action_mask[0, : first + 1].all() and not out.action_mask[0, first + 1 :].any()
    assert responses[0, first] == eos
    for i in range(3):
        after = out.action_mask[i] == 0
        assert (responses[i][after] == PAD).all()
        assert (out.attention_mask[i, out.prompt_length :] == out.action_mask[i]).all()
        hits = (responses[i] == eos).nonzero()
        if len(hits):  # exactly one EOS kept: the first, and it is the last masked-in token
            assert len(hits) == 1 and int(out.action_mask[i].sum()) == int(hits[0]) + 1
        else:
            assert not out.stopped_by_eos[i] and out.action_mask[i].all()
    assert out.action_mask.shape[1] <= 8


def test_same_seed_same_samples_and_global_rng_untouched(tiny_llama):
    prompts = _left_pad([[BOS, 3, 4], [BOS, 5, 6, 7]] * 2, 4)
    gen = HFGenerator(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, temperature=1.5, pad_to_max_new_tokens=True)
    torch.manual_seed(123)
    a = gen.generate(tiny_llama, *prompts, seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(999)  # different global state: no effect on seeded samples
    b = gen.generate(tiny_llama, *prompts, seed=7)
    c = gen.generate(tiny_llama, *prompts, seed=8)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert a.sequences.shape[1] == 4 + 12  # padded to max_new_tokens
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_a)  # generating did not advance the global RNG
    # base seed + call counter: two generators with the same seed give the same stream, calls differ
    g1 = HFGenerator(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, seed=5)
    g2 = HFGenerator(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, seed=5)
    s1 = [g1.generate(tiny_llama, *prompts).sequences for _ in range(2)]
    s2 = [g2.generate(tiny_llama, *prompts).sequences for _ in range(2)]
    assert torch.equal(s1[0], s2[0]) and torch.equal(s1[1], s2[1]) and not torch.equal(s1[0], s1[1])


def test_generate_restores_train_mode_and_needs_no_grad(tiny_llama):
    gen = HFGenerator(max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD, seed=0)
    tiny_llama.train()
    out = gen.generate(tiny_llama, *_left_pad([[BOS, 3]], 2))
    assert tiny_llama.training and not out.sequences.requires_grad
    tiny_llama.eval()
    gen.generate(tiny_llama, *_left_pad([[BOS, 3]], 2))
    assert not tiny_llama.training
    tiny_llama.train()
